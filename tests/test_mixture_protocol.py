"""The Mixture contract as a Protocol. A project written against its three required members
(``domains``, ``weights``, ``set_weights``) gets the monitor and the engine, rollback
included; what a mixture offers beyond them is found once, when training starts."""

from __future__ import annotations

import pytest
import torch
from helpers.tiny_project import TinyLM, jsonl, quiet_trainer
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, IterableDataset

from lightning_aquila.callbacks import (
    AdaptiveTrainingEngine,
    StaticMixture,
    TrainingStateMonitor,
)
from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.mixture_protocol import Mixture, MixtureAccess

DOMAINS = ["prose", "code"]


class WeightsOnly:
    """A foreign project's mixture: the Protocol's three members, nothing more."""

    def __init__(self) -> None:
        self.domains = list(DOMAINS)
        self._weights = {"prose": 0.5, "code": 0.5}

    @property
    def weights(self) -> dict[str, float]:
        return dict(self._weights)

    def set_weights(self, weights, reason=""):
        if set(weights) - set(self.domains) or any(w < 0 for w in weights.values()):
            raise ValueError(f"bad weights {weights}")
        self._weights = {d: float(weights.get(d, 0.0)) for d in self.domains}


class Drawn(IterableDataset):
    """Each sample's domain drawn from the mixture's weights when the sample is made."""

    def __init__(self, mixture: Mixture, seq_len: int = 12) -> None:
        self.mixture, self.seq_len = mixture, seq_len

    def __iter__(self):
        g = torch.Generator().manual_seed(0)
        while True:
            weights = torch.tensor([self.mixture.weights[d] for d in self.mixture.domains])
            domain = int(torch.multinomial(weights, 1, generator=g))
            window = torch.randint(0, 32, (self.seq_len + 1,), generator=g) + 32 * domain
            yield {"input_ids": window[:-1], "labels": window[1:].clone(),
                   "domain": torch.tensor(domain)}


class ForeignData(LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.mixture = WeightsOnly()

    def train_dataloader(self):
        return DataLoader(Drawn(self.mixture), batch_size=4)


def test_a_project_with_only_the_protocol_is_steered_monitored_and_rolled_back(tmp_path):
    data = ForeignData()
    monitor = TrainingStateMonitor(mixture_every_n_steps=1, train_loss_every_n_steps=2,
                                   spike_min_history=3, spike_zscore=10.0)
    engine = AdaptiveTrainingEngine(StaticMixture({"prose": 0.9, "code": 0.1}), rollback=True,
                                    skip_batches=2)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2,
                                  save_top_k=-1)
    trainer = quiet_trainer(tmp_path, [monitor, engine, checkpoints], max_steps=10,
                            limit_val_batches=0, enable_checkpointing=True)
    with pytest.warns(UserWarning, match="the mixture has no skip_batches"):
        trainer.fit(TinyLM(spike_at=7, spike_factor=50.0), data)

    assert data.mixture.weights == pytest.approx({"prose": 0.9, "code": 0.1})
    assert monitor.state.mixture == pytest.approx({"prose": 0.9, "code": 0.1})
    tokens = monitor.state.tokens_per_domain  # drawn from the weights the engine set
    assert tokens["code"] < tokens["prose"] / 3
    assert [(r["step"], r["restored_step"]) for r in engine.rollbacks] == [(8, 6)]
    assert engine.rollbacks[0]["skipped_ahead"] is None
    events = jsonl(tmp_path / "tsm" / "events.jsonl")
    assert [(e["kind"], e["step"]) for e in events if e["kind"] != "anomaly"] == [
        ("session_start", 0), ("stage", 0), ("mixture", 0), ("rollback", 8)]


def test_the_capabilities_beyond_the_protocol_are_found_once_per_mixture():
    plain = MixtureAccess(WeightsOnly(), "test")
    assert isinstance(WeightsOnly(), Mixture)
    assert (plain.recorded, plain.skips, plain.counts, plain.counts_tokens,
            plain.observable) == (False, False, False, False, False)
    assert plain.history() == [] and plain.consumed_batches() is None
    assert plain.natural_weights() is None and plain.budget_tokens(100) is None

    ours = DomainMixture(DOMAINS, {"prose": 1, "code": 1}, unique_tokens={"prose": 300,
                                                                          "code": 100})
    ours.tokens_per_step = 64
    full = MixtureAccess(ours, "test")
    assert (full.recorded, full.skips, full.counts, full.counts_tokens,
            full.observable) == (True, True, True, True, True)
    assert full.natural_weights() == {"prose": 0.75, "code": 0.25}
    assert full.budget_tokens(10) == 640
    full.set_weights({"prose": 0.2, "code": 0.8}, "test", step=3, policy="P")
    assert (ours.history[-1].step, ours.history[-1].extra) == (3, {"policy": "P"})


def test_a_datamodule_mixture_missing_a_required_member_is_refused_naming_it(tmp_path):
    class NoSetter:
        def __init__(self) -> None:
            self.domains, self.weights = DOMAINS, {"prose": 0.5, "code": 0.5}

    data = ForeignData()
    data.mixture = NoSetter()
    engine = AdaptiveTrainingEngine(StaticMixture("uniform"))
    trainer = quiet_trainer(tmp_path, [TrainingStateMonitor(), engine], max_steps=1)
    with pytest.raises(ValueError, match=r"NoSetter is not a Mixture \(it lacks \['set_weights'\]"):
        trainer.fit(TinyLM(), data)
