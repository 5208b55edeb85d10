"""DomainDataModule: batches, validation loaders, the weight-change delay, bad input."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from conftest import DMU_DOMAIN_STRIDE, DMU_HELDOUT_OFFSET

from lightning_aquila.datamodules import DataError, DomainDataModule, ShardStore


class Recorder(pl.LightningModule):
    """Records every training batch; optionally carries a model's ``config``/``tokenizer``."""

    def __init__(self, config=None, tokenizer=None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.batches: list[dict[str, torch.Tensor]] = []
        if config is not None:
            self.config = config
        self.tokenizer = tokenizer

    def training_step(self, batch, batch_idx):
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return self.layer(batch["input_ids"][:, :1].float()).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def trainer(max_steps: int = 3, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def fit_fails_before_training(dm: DomainDataModule, match: str, module=None) -> None:
    module = module or Recorder()
    with pytest.raises(DataError, match=match):
        trainer().fit(module, dm)
    assert module.batches == []


def test_train_batches_follow_the_batch_contract(dmu_make_store):
    url = dmu_make_store({"a": 5000, "b": 3000})
    dm = DomainDataModule(url, seq_len=32, batch_size=6, weights="uniform")
    dm.setup("fit")
    for batch in list(iter(dm.train_dataloader()))[:20]:
        assert set(batch) == {"input_ids", "labels", "domain"}
        assert all(t.dtype == torch.int64 for t in batch.values())
        assert batch["input_ids"].shape == batch["labels"].shape == (6, 32)
        assert batch["domain"].shape == (6,)
        # labels are the inputs shifted by one: a packed window of 33 tokens
        assert torch.equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
        # the synthetic tokens say where they came from: the domain, and a window boundary
        assert torch.equal(batch["input_ids"][:, 0] // DMU_DOMAIN_STRIDE, batch["domain"])
        assert ((batch["input_ids"][:, 0] % DMU_DOMAIN_STRIDE) % 32 == 0).all()
        assert torch.equal(batch["labels"][:, -1] - batch["input_ids"][:, 0],
                           torch.full((6,), 32))


def test_the_mixture_is_available_before_setup_with_natural_weights(dmu_make_store):
    dm = DomainDataModule(dmu_make_store({"zh": 1000, "en": 3000}), seq_len=16)
    assert dm.mixture.domains == ["en", "zh"]
    assert dm.mixture.weights == pytest.approx({"en": 0.75, "zh": 0.25})
    assert DomainDataModule(dm.store_url, weights="uniform").mixture.weights == {"en": 0.5,
                                                                                "zh": 0.5}
    partial = DomainDataModule(dm.store_url, weights={"en": 3})
    assert partial.mixture.weights == {"en": 1.0, "zh": 0.0}


@pytest.mark.parametrize("hook", ["on_train_batch_start", "on_train_batch_end"])
@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_weight_change_during_batch_k_applies_from_batch_k_plus_1_plus_prefetch(
        dmu_make_store, num_workers, hook):
    url = dmu_make_store({"a": 20000, "b": 20000})
    dm = DomainDataModule(url, seq_len=16, batch_size=4, weights={"a": 1.0},
                          num_workers=num_workers, prefetch_factor=2, val_windows_per_domain=0)
    changes = []

    class Switch(pl.Callback):
        def switch(self, trainer, *args):
            if args[-1] == 4:  # batch_idx, the last argument of both hooks
                changes.append(trainer.datamodule.mixture.set_weights({"b": 1.0}))

    setattr(Switch, hook, Switch.switch)
    module = Recorder()
    trainer(max_steps=16, callbacks=[Switch()]).fit(module, dm)
    delay = 1 + 2 * num_workers  # the rule documented in docs/data.md
    assert changes[0].batch_index == 4 + delay
    domains = [int(b["domain"].max()) for b in module.batches]
    assert domains == [0] * (4 + delay) + [1] * (16 - 4 - delay)
    assert [int(b["domain"].min()) for b in module.batches] == domains


# -- bad input: each is refused before the first training step -------------------------------
@pytest.mark.parametrize(
    ("weights", "match"),
    [({"a": 0.5, "nope": 0.5}, r"unknown domain\(s\) \['nope'\]"),
     ({"a": -1.0, "b": 2.0}, "domain 'a' is negative: -1.0"),
     ({"a": math.nan, "b": 1.0}, "domain 'a' is not finite: nan"),
     ({"a": 0.0, "b": 0.0}, "all zero")],
)
def test_bad_weights_are_refused_naming_the_store_and_value(dmu_make_store, weights, match):
    url = dmu_make_store({"a": 2000, "b": 2000})
    fit_fails_before_training(DomainDataModule(url, seq_len=16, weights=weights),
                              rf"shard store '{url}'.*{match}")


def test_an_empty_domain_is_refused(dmu_make_store):
    url = dmu_make_store({"a": 2000, "b": 0})
    fit_fails_before_training(DomainDataModule(url, seq_len=16),
                              r"domain 'b', split 'train' is empty")


def test_a_seq_len_longer_than_a_domain_stream_is_refused(dmu_make_store):
    url = dmu_make_store({"a": 2000, "b": 100}, heldout=0)
    fit_fails_before_training(
        DomainDataModule(url, seq_len=128, val_windows_per_domain=0),
        r"seq_len 128 is too long for shard store .*domain 'b'.* has 100 tokens")


def test_a_held_out_split_too_short_for_one_window_is_refused(dmu_make_store):
    url = dmu_make_store({"a": 2000}, heldout=10)
    fit_fails_before_training(DomainDataModule(url, seq_len=16),
                              r"domain 'a', split 'heldout' has 10 tokens")


def test_token_ids_outside_the_model_vocabulary_are_refused(dmu_make_store):
    url = dmu_make_store({"a": 2000, "b": 2000})
    model = Recorder(config=SimpleNamespace(vocab_size=DMU_DOMAIN_STRIDE, max_seq_len=64))
    fit_fails_before_training(
        DomainDataModule(url, seq_len=16), module=model,
        match=rf"domain 'b' holds token id {DMU_DOMAIN_STRIDE + DMU_HELDOUT_OFFSET + 399}, "
              rf"outside the model's vocabulary of {DMU_DOMAIN_STRIDE}")


def test_a_seq_len_beyond_the_model_context_is_refused(dmu_make_store):
    url = dmu_make_store({"a": 2000})
    model = Recorder(config=SimpleNamespace(vocab_size=2**32, max_seq_len=64))
    fit_fails_before_training(DomainDataModule(url, seq_len=128), module=model,
                              match="seq_len 128 is longer than the model's max_seq_len 64")


def test_a_store_from_another_tokenizer_is_refused(dmu_make_store, dmu_tokenizer,
                                                   dmu_other_tokenizer):
    from lightning_aquila.tokenizer import tokenizer_hash

    url = dmu_make_store({"a": 2000}, tokenizer_hash=tokenizer_hash(dmu_tokenizer))
    fit_fails_before_training(
        DomainDataModule(url, seq_len=16), module=Recorder(tokenizer=dmu_other_tokenizer),
        match=rf"the model's tokenizer is .*hash {tokenizer_hash(dmu_other_tokenizer)[:8]}\), "
              rf"but the store .* was prepared with .*hash {tokenizer_hash(dmu_tokenizer)[:8]}\)"
              r"; leave it unset")
    module = Recorder(tokenizer=dmu_tokenizer)  # the right one trains
    trainer(max_steps=2).fit(module, DomainDataModule(url, seq_len=16))
    assert len(module.batches) == 2


def test_a_missing_chunk_is_refused_before_training(dmu_make_store):
    url = dmu_make_store({"a": 5000})
    segment = ShardStore(url).info("a").segments["train"][0].id
    (Path(url) / "a" / "train" / segment / "tokens" / "c" / "3").unlink()
    fit_fails_before_training(DomainDataModule(url, seq_len=16),
                              r"domain 'a', split 'train', segment .*missing.*c/3")


def test_a_corrupt_chunk_is_refused_before_training_with_full_verification(dmu_make_store):
    url = dmu_make_store({"a": 5000})
    segment = ShardStore(url).info("a").segments["train"][0].id
    chunk = Path(url) / "a" / "train" / segment / "tokens" / "c" / "2"
    data = bytearray(chunk.read_bytes())
    data[-10] ^= 0x55  # one flipped byte: the chunk's CRC32C no longer matches
    chunk.write_bytes(bytes(data))
    fit_fails_before_training(DomainDataModule(url, seq_len=16, verify="full"),
                              r"domain 'a', split 'train', segment .*chunk c/2")


def test_aquila_tiny_trains_from_a_store_prepared_from_the_bundled_corpus(
        corpus_store, dmu_corpus, dmu_tokenizer):
    from lightning_aquila import AquilaLM

    domains = sorted(p.name for p in dmu_corpus.iterdir() if p.is_dir())
    assert len(domains) >= 3 and ShardStore(corpus_store).domains.keys() == set(domains)
    model = AquilaLM(preset="aquila2-tiny", tokenizer=dmu_tokenizer, warmup_steps=1)
    dm = DomainDataModule(corpus_store, seq_len=64, batch_size=2, val_windows_per_domain=2)
    run = trainer(max_steps=3, limit_val_batches=1, val_check_interval=3)
    run.fit(model, dm)
    assert dm.sampler.next_batch == 3
    assert math.isfinite(float(run.callback_metrics["val/loss"]))
