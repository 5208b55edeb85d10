"""Resume is exact: a run stopped at step K and resumed from its checkpoint sees the very same
batches (token for token, on every rank) as a run that went to step N uninterrupted, with
weight changes and a skip before K and a weight change after K.

The two-process case runs this file as a script under Lightning's ``ddp`` strategy (gloo).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.sampler import EpochOrder

N, K = 24, 10
#: Short Lightning epochs, so the runs also cross epoch boundaries (new iterators) and the
#: checkpoint at K lies mid-epoch.
EPOCH_BATCHES = 7


class Recorder(pl.LightningModule):
    """A tiny model with optimizer state; records every batch it trains on."""

    def __init__(self, out: str, tag: str) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)
        self.out, self.tag = out, tag
        self.records: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []
        self.val_records: list[tuple[int, int, list[int]]] = []

    def training_step(self, batch, batch_idx):
        # the global batch index: the datamodule has counted this batch as consumed
        index = self.trainer.datamodule.mixture.consumed_batches - 1
        self.records.append((self.global_step, index, batch["input_ids"].clone(),
                             batch["domain"].clone()))
        features = (batch["input_ids"].float().mean(1, keepdim=True) % 97) / 97
        return self.layer(features).pow(2).mean()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        assert (batch["part"] == dataloader_idx).all()  # the dev loader, then the test one
        self.val_records.append((self.global_step, dataloader_idx, batch["domain"].tolist(),
                                 batch["input_ids"][:, 0].tolist()))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-3)

    def on_fit_end(self) -> None:
        mixture = self.trainer.datamodule.mixture
        torch.save({"records": self.records, "val": self.val_records,
                    "history": [(c.batch_index, c.weights) for c in mixture.history],
                    "skips": [(s.batch_index, s.count) for s in mixture.skips]},
                   Path(self.out) / f"{self.tag}_rank{self.global_rank}.pt")


class MixtureEvents(pl.Callback):
    """What a policy would do, at fixed training steps (on every rank alike)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mixture = trainer.datamodule.mixture
        if trainer.global_step == 3:
            mixture.set_weights({"a": 0.1, "b": 0.1, "c": 0.8}, reason="before K")
        if trainer.global_step == 6:
            mixture.skip_batches(2, reason="spike")
        if trainer.global_step == 15:
            mixture.set_weights({"a": 0.5, "b": 0.5}, reason="after K")


def run(store: str, out: str, tag: str, max_steps: int, *, devices: int = 1,
        num_workers: int = 0, resume_from: str | None = None, events: bool = True,
        weights: dict[str, float] | None = None, domains: list[str] | None = None) -> None:
    dm = DomainDataModule(store, seq_len=16, batch_size=4, num_workers=num_workers,
                          weights=weights or {"a": 0.5, "b": 0.3, "c": 0.2}, seed=7,
                          domains=domains, val_windows_per_domain=4,
                          epoch_batches=EPOCH_BATCHES)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=devices,
        strategy="ddp" if devices > 1 else "auto", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out,
        callbacks=[*([MixtureEvents()] if events else []),
                   ModelCheckpoint(dirpath=Path(out) / f"{tag}_ckpt", every_n_train_steps=K,
                                   save_top_k=-1)],
    )
    trainer.fit(Recorder(out, tag), dm, ckpt_path=resume_from)


def checkpoint_at_k(out: Path, tag: str) -> str:
    [path] = (out / f"{tag}_ckpt").glob(f"*step={K}.ckpt")
    return str(path)


def load(out: Path, tag: str, rank: int) -> dict:
    return torch.load(out / f"{tag}_rank{rank}.pt", weights_only=False)


def assert_same_batches(out: Path, rank: int) -> dict:
    whole = load(out, "whole", rank)
    first, rest = load(out, "first", rank), load(out, "resumed", rank)
    assert [r[0] for r in whole["records"]] == list(range(N))
    assert [r[0] for r in first["records"]] == list(range(K))
    assert [r[0] for r in rest["records"]] == list(range(K, N))
    for (step, index, ids, domains), (step2, index2, ids2, domains2) in zip(
            whole["records"], first["records"] + rest["records"]):
        assert (step, index) == (step2, index2)
        assert torch.equal(ids, ids2), f"rank {rank}: batch of step {step} differs"
        assert torch.equal(domains, domains2)
    assert rest["history"] == whole["history"] and rest["skips"] == whole["skips"]
    return whole


def assert_events_took_effect(whole: dict) -> None:
    """Not vacuous: the skip and both changes happened, and the data followed them."""
    (start, count), = whole["skips"]
    indices = [index for _, index, _, _ in whole["records"]]
    assert count == 2 and not set(range(start, start + count)) & set(indices)
    _, (before_k, _), (after_k, _) = whole["history"]
    assert indices[K - 1] < after_k <= indices[-1]  # the late change came after the resume
    late = [d for _, index, _, d in whole["records"] if index >= after_k]
    assert all((d < 2).all() for d in late)  # "c" (index 2) has weight 0 from after_k on
    middle = torch.cat([d for _, i, _, d in whole["records"] if before_k <= i < after_k])
    assert (middle == 2).float().mean() > 0.5  # "c" had weight 0.8 in between


def make_store(dmu_make_store) -> str:
    return dmu_make_store({"a": 6000, "b": 4000, "c": 3000}, heldout=16 * 8 + 1)


def test_resume_is_exact_in_one_process(dmu_make_store, tmp_path):
    store = make_store(dmu_make_store)
    run(store, str(tmp_path), "whole", N)
    run(store, str(tmp_path), "first", K)
    run(store, str(tmp_path), "resumed", N, resume_from=checkpoint_at_k(tmp_path, "first"))
    assert_events_took_effect(assert_same_batches(tmp_path, 0))


def test_resume_is_exact_in_one_process_with_loader_workers(dmu_make_store, tmp_path):
    # Workers draw 1 + prefetch_factor * num_workers batches ahead of training; the
    # checkpoint must still record the consumed position.
    store = make_store(dmu_make_store)
    run(store, str(tmp_path), "whole", N, num_workers=2)
    run(store, str(tmp_path), "first", K, num_workers=2)
    run(store, str(tmp_path), "resumed", N, num_workers=2,
        resume_from=checkpoint_at_k(tmp_path, "first"))
    assert_events_took_effect(assert_same_batches(tmp_path, 0))


def test_resume_is_exact_on_two_processes(dmu_make_store, tmp_path):
    store = make_store(dmu_make_store)

    def launch(tag: str, max_steps: int, resume_from: str | None = None) -> None:
        args = {"store": store, "out": str(tmp_path), "tag": tag, "max_steps": max_steps,
                "devices": 2, "num_workers": 1, "resume_from": resume_from}
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run([sys.executable, __file__, json.dumps(args)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]

    launch("whole", N)
    launch("first", K)
    launch("resumed", N, checkpoint_at_k(tmp_path, "first"))
    wholes = [assert_same_batches(tmp_path, rank) for rank in (0, 1)]
    for whole in wholes:
        assert_events_took_effect(whole)
    # each rank trained on its own samples
    for (_, _, ids0, _), (_, _, ids1, _) in zip(wholes[0]["records"], wholes[1]["records"]):
        assert not torch.equal(ids0, ids1)
    # and validated on its own half of each domain's 4 windows of each held-out part
    for part, domain in itertools.product((0, 1), range(3)):
        halves = [{w for step, p, ds, ws in whole["val"] if p == part and step == EPOCH_BATCHES
                   for d, w in zip(ds, ws) if d == domain} for whole in wholes]
        assert len(halves[0]) == len(halves[1]) == 2 and not halves[0] & halves[1]


def test_resuming_with_another_mixture_continues_the_domains_that_stayed(dmu_make_store,
                                                                        tmp_path):
    """A data stage across restarts: the YAML drops domain "c" and reweights the others."""
    store = make_store(dmu_make_store)
    run(store, str(tmp_path), "first", K, events=False)
    run(store, str(tmp_path), "stage2", N, events=False, domains=["a", "b"],
        weights={"a": 0.8, "b": 0.2}, resume_from=checkpoint_at_k(tmp_path, "first"))
    first, stage2 = load(tmp_path, "first", 0), load(tmp_path, "stage2", 0)
    (*_, (resumed_at, weights)) = stage2["history"]
    assert resumed_at == K and weights == {"a": 0.8, "b": 0.2}
    records = first["records"] + stage2["records"]
    assert all((d < 2).all() for _, _, _, d in stage2["records"])
    # Domain "a" (written first: its tokens are its stream positions) went on through its
    # epoch order exactly: nothing replayed, nothing skipped, across the change.
    seen = torch.cat([ids[d == 0, 0] for _, _, ids, d in records]) // 16
    order = EpochOrder("a", seed=7, block_windows=1024 // 16, shuffle_blocks=8)
    expected = order.windows(0, (6000 - 1) // 16, np.arange(len(seen)))
    assert seen.tolist() == expected.tolist()


if __name__ == "__main__":
    run(**json.loads(sys.argv[1]))
