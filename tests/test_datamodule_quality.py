"""DomainDataModule(quality=...): sampling by the store's document scores, from YAML-shaped
config to batches, on real zarr stores."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import DMU_DOMAIN_STRIDE

from lightning_aquila.datamodules import DataError, DomainDataModule

SEQ = 16
DOCS = 400  # documents of SEQ tokens each: document k is window k


def scored_store(make, scores=None):
    """Two domains of DOCS one-window documents; in "a", document k scores k / DOCS."""
    a = scores if scores is not None else [k / DOCS for k in range(DOCS)] + [0.25]
    return make({"a": DOCS * SEQ, "b": DOCS * SEQ}, documents=DOCS, heldout=4 * SEQ + 1,
                quality={"a": a, "b": [0.5] * (DOCS + 1)})


def module(url, quality, **kwargs):
    return DomainDataModule(url, seq_len=SEQ, batch_size=8, weights={"a": 1.0, "b": 0.0},
                            quality=quality, val_windows_per_domain=2, verify="none", **kwargs)


def batches(dm, count):
    dm.setup("fit")
    return list(itertools.islice(iter(dm.train_dataloader()), count))


def window(batch) -> torch.Tensor:
    return (batch["input_ids"][:, 0] % DMU_DOMAIN_STRIDE) // SEQ


def test_batches_carry_the_score_of_each_window(dmu_make_store):
    dm = module(scored_store(dmu_make_store), {"score": "quality", "temperature": 0.2})
    for batch in batches(dm, 20):
        assert batch["score"].dtype == torch.float32 and batch["score"].shape == (8,)
        torch.testing.assert_close(batch["score"], window(batch).float() / DOCS)


def test_held_out_batches_carry_scores_too(dmu_make_store):
    dm = module(scored_store(dmu_make_store), {"score": "quality"})
    dm.setup("fit")
    for loader in dm.val_dataloader():
        for batch in loader:
            expected = torch.where(batch["domain"] == 0, 0.25, 0.5)
            torch.testing.assert_close(batch["score"], expected)


def test_without_a_temperature_the_batches_are_those_of_an_unscored_run(dmu_make_store):
    url = scored_store(dmu_make_store)
    plain = batches(module(url, None), 60)
    scored = batches(module(url, {"score": "quality", "temperature": None}), 60)
    for a, b in zip(plain, scored):
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert "score" not in a and "score" in b


def test_higher_scored_documents_are_drawn_more_often(dmu_make_store):
    dm = module(scored_store(dmu_make_store), {"score": "quality", "temperature": 0.25})
    drawn = torch.cat([window(b) for b in batches(dm, 200)]).numpy()  # 4 epochs of "a"
    top, bottom = np.count_nonzero(drawn >= 300), np.count_nonzero(drawn < 100)
    # weights exp(k / DOCS / 0.25): the top quarter's mean over the bottom's is e^3
    expected = np.exp(np.arange(300, 400) / 100).sum() / np.exp(np.arange(100) / 100).sum()
    assert top / bottom == pytest.approx(expected, rel=0.1)


def test_the_floor_drops_the_lowest_scored_documents(dmu_make_store):
    dm = module(scored_store(dmu_make_store),
                {"score": "quality", "floor_quantile": 0.5, "max_repeats": 2})
    drawn = torch.cat([window(b) for b in batches(dm, 100)]).numpy()
    # the lower median of scores 0..399 / 400 is 199 / 400: windows 199..398 stay
    assert drawn.min() == 199 and len(np.unique(drawn)) == 200


def test_resume_with_scores_continues_the_exact_sequence(dmu_make_store):
    url = scored_store(dmu_make_store)
    quality = {"score": "quality", "temperature": {"a": 0.5}, "max_repeats": 3}
    whole = batches(module(url, quality), 40)
    first = module(url, quality)
    batches(first, 15)
    state = first.state_dict()
    resumed = module(url, quality)
    resumed.setup("fit")
    resumed.load_state_dict(state)
    for a, b in zip(whole[15:], batches(resumed, 25), strict=True):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["score"],
                                                                           b["score"])


@pytest.mark.parametrize(("quality", "match"), [
    ({"score": "fasttext_hq"}, r"quality.score: .* has no score 'fasttext_hq'; it has "
                               r"\['quality'\]"),
    ({"score": "quality", "temperature": 0}, "quality.temperature must be a positive number"),
    ({"score": "quality", "temperature": {"c": 1.0}}, r"unknown domain\(s\) \['c'\]"),
    ({"score": "quality", "floor_quantile": 1.5}, r"floor_quantile must be a number in \[0, 1\)"),
    ({"score": "quality", "max_repeats": 0}, r"max_repeats must be an integer in \[1, 255\]"),
    ({"score": "quality", "tau": 2}, r"unknown key\(s\) \['tau'\]"),
    ({"score": "quality", "temperature": 0.001}, "domain 'a': .* set quality.max_repeats"),
])
def test_bad_quality_config_is_one_line_naming_the_field(dmu_make_store, quality, match):
    url = scored_store(dmu_make_store)
    with pytest.raises(DataError, match=match) as raised:
        module(url, quality).setup("fit")
    assert "\n" not in str(raised.value)
