"""Rollback on a spike (PaLM's remedy): an injected NaN or loss spike makes the engine restore
model and optimizer from the newest earlier checkpoint and go on to the end with a finite
loss, never replaying the batches since that checkpoint; skips and down-weighting are
recorded; repeated spikes past the retry bound stop with a clear message; the checkpoint
directory is left as it was; and on two processes both ranks roll back together.

The two-process case runs this file as a script under Lightning's ``ddp`` strategy (gloo).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_aquila import AquilaLM
from lightning_aquila.callbacks.engine import AdaptiveTrainingEngine, RollbackError
from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.datamodules import DomainDataModule

CHECKPOINT_EVERY = 4
NAN_STEP = 10  # the step whose loss is NaN: the newest checkpoint before it is step 8


@pytest.fixture(scope="module")
def store(corpus_store) -> str:
    """The first file of every bundled corpus domain, prepared (conftest)."""
    return corpus_store


class Faulty(AquilaLM):
    """AquilaLM whose loss turns NaN (or ``spike`` times larger) at given optimizer steps,
    on all ranks or only on ``rank``; it records (step, global batch index) of each batch."""

    def __init__(self, nan_steps=(), spike_steps=(), spike: float = 5.0,
                 rank: int | None = None) -> None:
        super().__init__(preset="aquila2-tiny", warmup_steps=2, decay_steps=100)
        self.nan_steps, self.spike_steps = set(nan_steps), set(spike_steps)
        self.spike, self.only_rank = spike, rank
        self.seen: list[tuple[int, int]] = []

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        self.seen.append((self.global_step, self.trainer.datamodule.mixture.consumed_batches - 1))
        step = self.global_step + 1  # the step this batch produces
        if self.only_rank is None or self.global_rank == self.only_rank:
            factor = (float("nan") if step in self.nan_steps
                      else self.spike if step in self.spike_steps else 1.0)
            out = {"loss": out["loss"] * factor, "sample_loss": out["sample_loss"] * factor}
        return out


class Snapshot(Callback):
    """Listed after the engine: what the model and optimizer hold right after ``step``, and
    the checkpoint directory's files (with hashes) just before that step."""

    def __init__(self, step: int, directory: Path) -> None:
        self.step, self.directory = step, directory
        self.files_before: dict[str, str] = {}
        self.after: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            self.files_before = dir_hashes(self.directory)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            optimizer = trainer.optimizers[0]
            self.after = {"model": {k: v.clone() for k, v in pl_module.state_dict().items()},
                          "optimizer": copy.deepcopy(optimizer.state_dict()),
                          "lr": [g["lr"] for g in optimizer.param_groups],
                          "scheduled_lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr()}


def dir_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob("*")) if p.is_file()}


def monitor(run_dir: Path) -> TrainingStateMonitor:
    return TrainingStateMonitor(train_loss_every_n_steps=1, val_loss=False,
                                weight_stats_every_n_steps=None, throughput_every_n_steps=None,
                                spike_window=8, spike_min_history=4, spike_zscore=4.0,
                                run_dir=str(run_dir))


def fit(store: str, out: Path, model: Faulty, engine: AdaptiveTrainingEngine, max_steps: int,
        *extra: Callback, devices: int = 1):
    dm = DomainDataModule(store, seq_len=32, batch_size=4, val_windows_per_domain=0, seed=1)
    checkpoints = ModelCheckpoint(dirpath=out / "ckpt", every_n_train_steps=CHECKPOINT_EVERY,
                                  save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=devices,
        strategy="ddp" if devices > 1 else "auto", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=out, callbacks=[monitor(out), engine, *extra, checkpoints],
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(model, dm)
    return trainer, dm


def events(out: Path, kind: str) -> list[dict]:
    lines = (out / "tsm" / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


# -- one NaN, one rollback ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def nan_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("nan_run")
    model = Faulty(nan_steps=[NAN_STEP])
    engine = AdaptiveTrainingEngine(rollback=True, skip_batches=2, downweight_factor=0.5)
    snapshot = Snapshot(NAN_STEP, out / "ckpt")
    trainer, dm = fit(store, out, model, engine, 14, snapshot)
    return {"out": out, "model": model, "engine": engine, "snapshot": snapshot,
            "trainer": trainer, "dm": dm}


def test_a_nan_loss_rolls_back_to_the_newest_earlier_checkpoint(nan_run):
    (record,) = nan_run["engine"].rollbacks
    assert record["anomaly"] == "nonfinite_loss" and record["step"] == NAN_STEP
    assert Path(record["checkpoint"]).name == "epoch=0-step=8.ckpt"
    assert record["restored_step"] == 8
    assert record["undone_steps"] == {"start": 9, "stop": NAN_STEP + 1}


def test_training_continues_to_the_end_with_a_finite_loss(nan_run):
    trainer, model = nan_run["trainer"], nan_run["model"]
    assert trainer.global_step == 14
    assert [step for step, _ in model.seen] == list(range(14))
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_model_and_optimizer_are_the_checkpoints_but_the_lr_follows_the_step(nan_run):
    after = nan_run["snapshot"].after
    checkpoint = torch.load(nan_run["engine"].rollbacks[0]["checkpoint"], weights_only=False)
    for name, tensor in checkpoint["state_dict"].items():
        assert torch.equal(after["model"][name], tensor), name
    saved, restored = checkpoint["optimizer_states"][0]["state"], after["optimizer"]["state"]
    assert saved.keys() == restored.keys()
    for key in saved:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(saved[key][field], restored[key][field]), (key, field)
    # Step counter and schedule keep counting: the LR is the schedule's at step 10, not the
    # checkpoint's (step 8).
    assert after["lr"] == after["scheduled_lr"]
    assert after["lr"] != [g["lr"] for g in checkpoint["optimizer_states"][0]["param_groups"]]


def test_the_batches_since_the_checkpoint_are_never_replayed_and_the_skip_is_recorded(nan_run):
    record, dm, model = nan_run["engine"].rollbacks[0], nan_run["dm"], nan_run["model"]
    indices = [index for _, index in model.seen]
    assert len(indices) == len(set(indices))  # no batch trained twice
    replaced, ahead = record["skipped_batches"], record["skipped_ahead"]
    # the two batches of steps 9-10 (trained by the abandoned model), then two skipped
    assert replaced == {"start": indices[8], "stop": indices[9] + 1}
    assert ahead["stop"] - ahead["start"] == 2
    assert not set(range(ahead["start"], ahead["stop"])) & set(indices)
    assert all(index >= ahead["stop"] for index in indices[NAN_STEP:])
    (skip,) = dm.mixture.skips
    assert (skip.batch_index, skip.count, skip.reason) == (ahead["start"], 2,
                                                         "rollback: nonfinite_loss")
    (event,) = events(nan_run["out"], "rollback")
    assert event["step"] == NAN_STEP and event["skipped_batches"] == replaced
    assert event["skipped_ahead"] == ahead and event["restored_step"] == 8


def test_the_offending_domains_are_down_weighted_by_the_factor(nan_run):
    record, dm = nan_run["engine"].rollbacks[0], nan_run["dm"]
    before, after = dm.mixture.history[0].weights, dm.mixture.history[-1].weights
    assert dm.mixture.history[-1].reason.startswith("rollback: down-weight")
    offending = set(record["domains"])
    assert offending and offending < set(before)
    for d in offending:
        for o in set(before) - offending:
            assert after[d] / after[o] == pytest.approx(0.5 * before[d] / before[o])


def test_the_checkpoint_directory_keeps_everything_it_held(nan_run):
    before = nan_run["snapshot"].files_before
    assert set(before) == {"epoch=0-step=4.ckpt", "epoch=0-step=8.ckpt"}
    now = dir_hashes(nan_run["out"] / "ckpt")
    assert {name: now.get(name) for name in before} == before
    assert set(now) == {f"epoch=0-step={s}.ckpt" for s in (4, 8, 12)}


# -- spikes -------------------------------------------------------------------------------------
def test_with_deferred_checks_a_nan_rolls_back_once_to_the_same_checkpoint(store, tmp_path):
    """On CUDA the monitor finds step 10's NaN at the end of step 11: the engine still
    restores the checkpoint before step 10, once (step 11's own check, of weights just
    thrown away, is dropped), and training goes on to the end."""
    model = Faulty(nan_steps=[NAN_STEP])
    engine = AdaptiveTrainingEngine(rollback=True, skip_batches=2)
    checked = TrainingStateMonitor(deferred_checks=True, train_loss_every_n_steps=1,
                                   val_loss=False, weight_stats_every_n_steps=None,
                                   throughput_every_n_steps=None, spike_window=8,
                                   spike_min_history=4, spike_zscore=4.0, run_dir=str(tmp_path))
    dm = DomainDataModule(store, seq_len=32, batch_size=4, val_windows_per_domain=0, seed=1)
    trainer = pl.Trainer(
        max_steps=14, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=tmp_path, callbacks=[checked, engine, ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1)])
    pl.seed_everything(0, verbose=False)
    trainer.fit(model, dm)
    (record,) = engine.rollbacks
    assert (record["anomaly"], record["step"], record["restored_step"]) == (
        "nonfinite_loss", NAN_STEP, 8)
    assert trainer.global_step == 14
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_loss_spike_triggers_a_rollback(store, tmp_path):
    engine = AdaptiveTrainingEngine(rollback=True)
    trainer, _ = fit(store, tmp_path, Faulty(spike_steps=[7], spike=5.0), engine, 9)
    (record,) = engine.rollbacks
    assert (record["anomaly"], record["step"], record["restored_step"]) == ("spike", 7, 4)
    assert record["zscore"] > 4.0 and trainer.global_step == 9


def test_spikes_repeating_past_max_rollbacks_stop_naming_step_loss_and_domains(store, tmp_path):
    engine = AdaptiveTrainingEngine(rollback=True, max_rollbacks=2)
    model = Faulty(nan_steps=list(range(6, 40)))
    with pytest.raises(RollbackError, match=(
            r"nonfinite_loss at step 8 \(loss nan, domains \['[a-z_]+'.*\]\) after 2 "
            r"rollback\(s\) within the last 1000 steps \(max_rollbacks=2\); the last one "
            r"restored .*epoch=0-step=4\.ckpt \(step 4\)")):
        fit(store, tmp_path, model, engine, 30)
    assert [r["step"] for r in engine.rollbacks] == [6, 7]


def test_a_nan_with_no_earlier_checkpoint_stops_with_a_clear_message(store, tmp_path):
    engine = AdaptiveTrainingEngine(rollback=True)
    with pytest.raises(RollbackError, match=r"nonfinite_loss at step 3 .*no checkpoint at "
                                            r"step <= 2 to roll back to"):
        fit(store, tmp_path, Faulty(nan_steps=[3]), engine, 6)


# -- two processes ------------------------------------------------------------------------------
def ddp_main(store: str, out: str) -> None:
    """One rank's run: rank 1 alone sees a NaN at step 5; the monitor's reduced loss is NaN
    on both ranks, so both must roll back to step 4 together."""
    model = Faulty(nan_steps=[5], rank=1)
    engine = AdaptiveTrainingEngine(rollback=True)
    trainer, _ = fit(store, Path(out), model, engine, 7, devices=2)
    torch.save({"rollbacks": engine.rollbacks, "step": trainer.global_step,
                "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "loss": float(trainer.callback_metrics["train/loss"])},
               Path(out) / f"rank{trainer.global_rank}.pt")


def test_both_ranks_roll_back_together_under_ddp(store, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, __file__, store, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:
        (record,) = rank["rollbacks"]
        assert (record["step"], record["restored_step"]) == (5, 4)
        assert math.isnan(record.pop("loss"))  # the reduced loss: NaN on both ranks
        assert rank["step"] == 7 and math.isfinite(rank["loss"])
    assert ranks[0]["rollbacks"] == ranks[1]["rollbacks"]
    for name, tensor in ranks[0]["params"].items():
        assert torch.equal(tensor, ranks[1]["params"][name]), name


if __name__ == "__main__":
    ddp_main(sys.argv[1], sys.argv[2])
