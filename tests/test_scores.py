"""Named document scores in the store: attach, replace and remove one atomically, read it
back with ``document_scores`` (NaN where a segment has no column), refuse bad input before
writing anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lightning_aquila.datamodules.scores import (
    attach_score,
    delete_unlisted_columns,
    remove_score,
    write_columns,
)
from lightning_aquila.datamodules.shard_format import DataError
from lightning_aquila.datamodules.store import ShardStore, document_scores, iter_documents
from lightning_aquila.datamodules.writer import DomainWriter


def files(url: str) -> dict[str, bytes]:
    return {str(p.relative_to(url)): p.read_bytes() for p in Path(url).rglob("*")
            if p.is_file()}


def score_arrays(url: str) -> list[str]:
    return sorted(str(p.parent.relative_to(url)) for p in Path(url).rglob("zarr.json")
                  if "scores" in p.parent.parent.name)


def values_for(url: str, domain: str, offset: float = 0.0) -> dict[str, np.ndarray]:
    info = ShardStore(url).info(domain)
    return {split: offset + np.arange(info.documents(split), dtype=np.float32)
            for split in ("train", "heldout")}


@pytest.fixture
def store(dmu_make_store) -> str:
    return dmu_make_store({"a": 3000, "b": 2000}, documents=6)


def test_an_attached_score_reads_back_per_document_in_stream_order(store):
    values = values_for(store, "a")
    values["train"][2] = np.nan
    attach_score(store, "a", "fasttext_hq", values, about={"scorer": "test"})
    shards = ShardStore(store)
    assert shards.info("a").score_names == ["fasttext_hq"]
    assert shards.info("a").scores["fasttext_hq"]["scorer"] == "test"
    for split in ("train", "heldout"):
        bounds, got = document_scores(shards, "a", "fasttext_hq", split)
        np.testing.assert_array_equal(got, values[split])
        assert got.dtype == np.float32
        lengths = [len(doc) for doc in iter_documents(shards, "a", split)]
        np.testing.assert_array_equal(np.diff(bounds), lengths)
    assert shards.info("b").scores == {}


def test_replacing_a_score_swaps_its_column_and_deletes_the_old_arrays(store):
    attach_score(store, "a", "ppl", values_for(store, "a"))
    old = score_arrays(store)
    attach_score(store, "a", "ppl", values_for(store, "a", offset=10), replace_existing=True)
    new = score_arrays(store)
    assert len(new) == len(old) and not set(old) & set(new)
    _, got = document_scores(ShardStore(store), "a", "ppl")
    assert got[0] == 10.0


def test_attaching_an_existing_name_without_replace_is_refused(store):
    attach_score(store, "a", "ppl", values_for(store, "a"))
    before = files(store)
    with pytest.raises(DataError, match=r"domain 'a', score 'ppl' exists; pass --replace"):
        attach_score(store, "a", "ppl", values_for(store, "a"))
    assert files(store) == before


def test_removing_a_score_unlists_it_then_deletes_its_arrays(store):
    attach_score(store, "a", "ppl", values_for(store, "a"))
    attach_score(store, "a", "fasttext_hq", values_for(store, "a"))
    remove_score(store, "a", "ppl")
    shards = ShardStore(store)
    assert shards.info("a").score_names == ["fasttext_hq"]
    assert all(".".join(p.split("/")[-1:]).startswith("fasttext_hq.")
               for p in score_arrays(store))
    with pytest.raises(DataError, match=r"has no score 'ppl'; it has \['fasttext_hq'\]"):
        document_scores(shards, "a", "ppl")


def test_a_crash_before_the_commit_leaves_the_old_state_and_the_next_attach_cleans(store):
    attach_score(store, "a", "ppl", values_for(store, "a"))
    import zarr

    group = zarr.open_group(store, mode="r+")["a"]
    info = ShardStore(store).info("a")
    # the first step of an attach, then a "crash": no commit
    write_columns(group, info, "ppl.crashed", values_for(store, "a", offset=99))
    assert any(p.endswith("ppl.crashed") for p in score_arrays(store))
    _, got = document_scores(ShardStore(store), "a", "ppl")
    np.testing.assert_array_equal(got, values_for(store, "a")["train"])  # the old column
    assert ShardStore(store).info("a").score_names == ["ppl"]
    attach_score(store, "a", "other", values_for(store, "a"))
    assert not any(p.endswith("ppl.crashed") for p in score_arrays(store))
    _, got = document_scores(ShardStore(store), "a", "ppl")
    np.testing.assert_array_equal(got, values_for(store, "a")["train"])


def test_cleaning_keeps_every_listed_column(store):
    attach_score(store, "a", "ppl", values_for(store, "a"))
    before = score_arrays(store)
    import zarr

    delete_unlisted_columns(zarr.open_group(store, mode="r+")["a"], ShardStore(store).info("a"))
    assert score_arrays(store) == before


@pytest.mark.parametrize(("change", "message"), [
    (lambda v: {**v, "train": v["train"][:-1]},
     r"score 'ppl': split 'train' has 6 documents but \(5,\) values were given"),
    (lambda v: {"train": v["train"]},
     r"score 'ppl': no values for split 'heldout' \(1 documents\); both splits are scored"),
    (lambda v: {**v, "train": np.where(np.arange(6) == 3, np.inf, v["train"])},
     r"score 'ppl': split 'train' document 3 has value inf; a score is finite, or NaN"),
    (lambda v: {**v, "dev": v["train"]}, r"score 'ppl': unknown split\(s\) \['dev'\]"),
    (lambda v: {**v, "train": ["x"] * 6}, r"score 'ppl': split 'train' values are not numbers"),
])
def test_bad_values_are_one_line_naming_store_domain_score_and_value(store, change, message):
    before = files(store)
    with pytest.raises(DataError, match=message) as caught:
        attach_score(store, "a", "ppl", change(values_for(store, "a")))
    assert store in str(caught.value) and "\n" not in str(caught.value)
    assert files(store) == before


def test_bad_names_and_unknown_domains_are_refused_before_writing(store):
    before = files(store)
    with pytest.raises(DataError, match=r"has no domain 'c'; it has \['a', 'b'\]"):
        attach_score(store, "c", "ppl", {})
    with pytest.raises(DataError, match=r"invalid score name '9lives'"):
        attach_score(store, "a", "9lives", values_for(store, "a"))
    with pytest.raises(DataError, match=r"has no attached score 'nope'; it has none"):
        remove_score(store, "a", "nope")
    assert files(store) == before


def test_a_segment_prepared_after_the_attach_reads_as_nan_and_keeps_the_score(store):
    attach_score(store, "a", "ppl", values_for(store, "a"))
    with DomainWriter(store, "a", tokenizer={"hash": "synthetic"}, language="xx") as writer:
        for _ in range(3):
            writer.add_document("train", np.arange(40, dtype=np.uint32))
        writer.commit()
    shards = ShardStore(store)
    assert shards.info("a").score_names == ["ppl"]
    bounds, got = document_scores(shards, "a", "ppl")
    assert len(got) == 9 and len(bounds) == 10
    np.testing.assert_array_equal(got[:6], np.arange(6))
    assert np.isnan(got[6:]).all()
    assert bounds[-1] == shards.info("a").tokens("train")


def test_prepare_quality_column_reads_as_the_score_named_quality(tmp_path):
    url = str(tmp_path / "q.zarr")
    with DomainWriter(url, "d", tokenizer={"hash": "h"}, language="xx",
                      with_quality=True) as writer:
        writer.add_document("train", np.arange(5, dtype=np.uint32), quality=0.5)
        writer.add_document("train", np.arange(7, dtype=np.uint32))
        writer.commit()
    bounds, got = document_scores(ShardStore(url), "d", "quality")
    np.testing.assert_array_equal(bounds, [0, 5, 12])
    np.testing.assert_array_equal(got, [0.5, np.nan])
    with pytest.raises(DataError, match=r"'quality' is the column `prepare --quality-field`"):
        attach_score(url, "d", "quality", {"train": [1.0, 2.0]})


def test_a_split_without_documents_reads_as_empty(dmu_make_store):
    url = dmu_make_store({"a": 500}, heldout=0, documents=2)
    attach_score(url, "a", "ppl", {"train": [1.0, 2.0]})
    bounds, got = document_scores(ShardStore(url), "a", "ppl", "heldout")
    assert bounds.tolist() == [0] and got.shape == (0,)
