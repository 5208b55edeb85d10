"""The engine changes the quality temperature at a stage (a quality curriculum): the change is
stamped with a batch index, recorded in the mixture, the engine and the run log, and a resume
replays it exactly; with fixed weights (``StagedMixture``) and on top of an adaptive policy
(``QualityCurriculum``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_aquila.callbacks.engine import AdaptiveTrainingEngine
from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.callbacks.policies import BanditMixture, QualityCurriculum, StagedMixture
from lightning_aquila.datamodules import DomainDataModule

SEQ, DOCS, STEPS, SWITCH = 16, 200, 10, 4


class Probe(pl.LightningModule):
    """A linear model on features of each window; records what every step trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(8, 1)
        self.seen: list[tuple[int, list[int], list[float]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.global_step, batch["input_ids"][:, 0].tolist(),
                          batch["score"].tolist()))
        features = (batch["input_ids"][:, :8] % 101).float() / 101
        per_sample = (self.layer(features).squeeze(1) - 0.5) ** 2
        return {"loss": per_sample.mean(), "sample_loss": per_sample.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture
def store(dmu_make_store) -> str:
    ramp = [k / DOCS for k in range(DOCS)] + [0.5]
    return dmu_make_store({"a": DOCS * SEQ, "b": DOCS * SEQ}, documents=DOCS, heldout=0,
                          quality={"a": ramp, "b": ramp})


def staged() -> StagedMixture:
    return StagedMixture([
        {"name": "broad", "weights": "uniform", "until_step": SWITCH,
         "quality_temperature": None},
        {"name": "sharp", "weights": "uniform", "quality_temperature": {"a": 0.05}},
    ])


def curriculum() -> QualityCurriculum:
    """The same temperature stages on top of a bandit that moves the weights every 3 steps."""
    return QualityCurriculum(BanditMixture(update_every=3), [
        {"name": "broad", "until_step": SWITCH, "quality_temperature": None},
        {"name": "sharp", "quality_temperature": {"a": 0.05}},
    ])


@pytest.fixture(params=[staged, curriculum], ids=["staged", "curriculum"])
def policy(request):
    return request.param


def fit(run: Path, store: str, max_steps: int, resume: str | None = None,
        checkpoint_every: int | None = None, policy=staged
        ) -> tuple[AdaptiveTrainingEngine, Probe, DomainDataModule]:
    callbacks = [TrainingStateMonitor(val_loss=False, grad_norm_every_n_steps=None,
                                      train_loss_every_n_steps=1,  # the bandit's reward
                                      throughput_every_n_steps=None,
                                      weight_stats_every_n_steps=None, run_dir=str(run)),
                 AdaptiveTrainingEngine(policy())]
    if checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=run / "ckpt", save_top_k=-1,
                                         every_n_train_steps=checkpoint_every))
    dm = DomainDataModule(store, seq_len=SEQ, batch_size=4, seed=2, val_windows_per_domain=0,
                          verify="none", quality={"score": "quality", "max_repeats": 2})
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks,
                         default_root_dir=run, enable_checkpointing=bool(checkpoint_every))
    torch.manual_seed(0)  # the same initial model in every fit: losses, and so rewards, agree
    model = Probe()
    trainer.fit(model, dm, ckpt_path=resume)
    return callbacks[1], model, dm


def test_a_stage_sets_the_quality_temperature_from_a_recorded_batch(store, tmp_path, policy):
    ate, model, dm = fit(tmp_path, store, STEPS, policy=policy)
    [change] = [c for c in ate.changes if "quality_temperature" in c]
    assert change["step"] == SWITCH and change["stage"] == "sharp"
    assert change["quality_temperature"] == {"a": 0.05, "b": None}
    recorded = dm.mixture.temperatures[-1]
    assert (recorded.batch_index, recorded.temperature) == (change["batch_index"],
                                                            {"a": 0.05, "b": None})
    assert recorded.batch_index >= SWITCH and recorded.extra["stage"] == "sharp"
    events = [json.loads(line) for line in (tmp_path / "tsm" / "events.jsonl").read_text()
              .splitlines()]
    [event] = [e for e in events if e["kind"] == "quality_temperature"]
    assert (event["step"], event["batch_index"]) == (SWITCH, change["batch_index"])
    # after the switch "a" draws its best documents (scores near 1, up to the repeat cap)
    def a_scores(after: bool) -> list[float]:
        return [s for step, ids, scores in model.seen if (step > recorded.batch_index) == after
                for i, s in zip(ids, scores) if i < 10_000_000]  # domain "a": ids < stride
    assert min(a_scores(True)) > 0.75 and sum(a_scores(False)) / len(a_scores(False)) < 0.7


def test_a_resume_replays_the_temperature_change_exactly(store, tmp_path, policy):
    whole_ate, whole, whole_dm = fit(tmp_path / "whole", store, STEPS, policy=policy)
    fit(tmp_path / "first", store, SWITCH + 2, checkpoint_every=SWITCH + 2, policy=policy)
    [checkpoint] = (tmp_path / "first" / "ckpt").glob(f"*step={SWITCH + 2}.ckpt")
    ate, resumed, dm = fit(tmp_path / "resumed", store, STEPS, resume=str(checkpoint),
                           policy=policy)
    assert resumed.seen == [s for s in whole.seen if s[0] >= SWITCH + 2]
    assert ate.policy.state_dict() == whole_ate.policy.state_dict()
    assert dm.mixture.weights == whole_dm.mixture.weights
    assert [c["step"] for c in ate.changes if "quality_temperature" in c] == [SWITCH]
    assert dm.mixture.quality_temperature == {"a": 0.05, "b": None}


def curriculum_on_update_steps() -> QualityCurriculum:
    """The stages of ``curriculum`` on a bandit due every 2 steps: the switch is an update."""
    return QualityCurriculum(BanditMixture(update_every=2), [
        {"name": "broad", "until_step": SWITCH, "quality_temperature": None},
        {"name": "sharp", "quality_temperature": {"a": 0.05}},
    ])


@pytest.mark.parametrize(("make", "weight_changes"), [(staged, 0),
                                                       (curriculum_on_update_steps, 1)],
                         ids=["same-weights", "update-step"])
def test_a_stage_change_writes_the_weights_at_most_once_and_the_temperature_once(
        store, tmp_path, make, weight_changes):
    """At the switch: the staged mixture's weights are those in force (nothing to write), the
    curriculum's bandit is due (one write); the temperature is written once either way."""
    _, _, dm = fit(tmp_path, store, STEPS, policy=make)
    assert len([c for c in dm.mixture.history if c.step == SWITCH]) == weight_changes
    assert len([t for t in dm.mixture.temperatures if t.step == SWITCH]) == 1
    events = [json.loads(line) for line in (tmp_path / "tsm" / "events.jsonl").read_text()
              .splitlines()]
    assert [e["kind"] for e in events if e["step"] == SWITCH and e["kind"] in (
        "mixture", "quality_temperature")] == ["mixture"] * weight_changes + [
            "quality_temperature"]
