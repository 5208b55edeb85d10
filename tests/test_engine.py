"""AdaptiveTrainingEngine with the real monitor, the real DomainDataModule on the bundled
corpus and the tiny Aquila2 preset: weights move as the policy says and every change is
logged; stages switch at the token count; a resume with another mixture or policy starts a
new stage without replaying or skipping the domains that stayed; policy state survives a
resume exactly; the callback-ordering rule is enforced."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.tiny_project import BagOfTokensLM, PlainMixture
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from lightning_aquila import AquilaLM
from lightning_aquila.callbacks.engine import AdaptiveTrainingEngine, EngineOrderError
from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.callbacks.policies import (
    BanditMixture,
    ExcessLossMixture,
    StagedMixture,
    StaticMixture,
)
from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.sampler import EpochOrder

SEQ_LEN, BATCH = 32, 4
TOKENS_PER_STEP = SEQ_LEN * BATCH
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(corpus_store) -> str:
    """The first file of every bundled corpus domain, prepared (conftest)."""
    return corpus_store


class RecordingLM(AquilaLM):
    """AquilaLM that remembers what it trained on: (step, global batch index, domain names,
    input ids) per batch."""

    def __init__(self, **kwargs) -> None:
        # decay_steps fixed: runs of different max_steps must share their LR schedule
        super().__init__(preset="aquila2-tiny", warmup_steps=2, decay_steps=100, **kwargs)
        self.seen: list[tuple[int, int, list[str], torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        mixture = self.trainer.datamodule.mixture
        names = [mixture.domains[i] for i in batch["domain"].tolist()]
        self.seen.append((self.global_step, mixture.consumed_batches - 1, names,
                          batch["input_ids"].clone()))
        return super().training_step(batch, batch_idx)


def monitor(run_dir: Path, every: int = 1) -> TrainingStateMonitor:
    return TrainingStateMonitor(train_loss_every_n_steps=every, val_loss=False,
                                grad_norm_every_n_steps=None, throughput_every_n_steps=None,
                                weight_stats_every_n_steps=None, mixture_every_n_steps=every,
                                run_dir=str(run_dir))


def data(store: str, **kwargs) -> DomainDataModule:
    kwargs.setdefault("weights", "natural")
    return DomainDataModule(store, seq_len=SEQ_LEN, batch_size=BATCH, val_windows_per_domain=0,
                            seed=3, **kwargs)


def fit(tmp_path: Path, callbacks: list, datamodule, max_steps: int, *, model=None,
        logger=False, resume: str | None = None, checkpoint_every: int | None = None):
    if checkpoint_every:
        callbacks = [*callbacks, ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1,
                                                 every_n_train_steps=checkpoint_every)]
    trainer = pl.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=logger,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
                         default_root_dir=tmp_path, enable_checkpointing=bool(checkpoint_every))
    pl.seed_everything(0, verbose=False)
    model = model or RecordingLM()
    trainer.fit(model, datamodule, ckpt_path=resume)
    return trainer, model


def events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "tsm" / "events.jsonl").read_text()
            .splitlines()]


# -- weights move and are logged --------------------------------------------------------------
def test_excess_loss_policy_moves_weight_to_the_domain_above_its_target_and_logs_it(
        store, tmp_path):
    domains = ["code_c", "en_legal", "en_prose", "zh_literature"]
    targets = {"code_c": 100.0, "en_legal": 0.0, "en_prose": 100.0, "zh_literature": 100.0}
    policy = ExcessLossMixture(targets, step_size=0.05, smoothing=0.0, update_every=2)
    engine = AdaptiveTrainingEngine(policy)
    dm = data(store, domains=domains)
    natural = dm.natural_weights()
    logger = CSVLogger(tmp_path, name="csv")
    _, model = fit(tmp_path, [monitor(tmp_path), engine], dm, 12, logger=logger)

    # en_legal has an excess from the first step that samples it, so from the next update
    # (every 2 steps) on, every update raises its weight.
    first_seen = min(step + 1 for step, _, names, _ in model.seen if "en_legal" in names)
    steps = [c["step"] for c in engine.changes]
    assert steps == list(range(first_seen + first_seen % 2, 13, 2)) and len(steps) >= 3
    legal = [c["weights"]["en_legal"] for c in engine.changes]
    assert natural["en_legal"] < legal[0] and legal == sorted(legal)
    assert len(set(legal)) == len(legal)
    for change in engine.changes:  # no excess elsewhere: the others keep their proportions
        others = {d: change["weights"][d] for d in domains if d != "en_legal"}
        total = sum(others.values())
        expected = {d: natural[d] for d in others}
        assert {d: w / total for d, w in others.items()} == pytest.approx(
            {d: w / sum(expected.values()) for d, w in expected.items()}, rel=1e-9)
    # the mixture holds each change, stamped with the step and the policy
    history = [c for c in dm.mixture.history if c.reason.startswith("ExcessLossMixture")]
    assert [(c.step, c.weights) for c in history] == [(c["step"], c["weights"])
                                                      for c in engine.changes]
    assert all(c.extra["policy"] == "ExcessLossMixture" for c in history)
    # every change went to the logger as ate/weight/<domain> at its step
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ate/weight/en_legal")]
    logged = {int(r["step"]): {d: float(r[f"ate/weight/{d}"]) for d in domains} for r in rows}
    assert logged == {c["step"]: pytest.approx(c["weights"]) for c in engine.changes}
    # and to the run's event log, with reason and policy
    mixture_events = [e for e in events(tmp_path) if e["kind"] == "mixture"
                      and e["reason"].startswith("ExcessLossMixture")]
    assert [e["step"] for e in mixture_events] == steps
    assert all(e["extra"]["policy"] == "ExcessLossMixture" for e in mixture_events)


def test_a_staged_schedule_switches_at_the_token_count_and_the_data_follows(store, tmp_path):
    stages = [{"name": "K6", "weights": {"code_c": 1, "code_python": 1},
               "until_tokens": 10 * TOKENS_PER_STEP},
              {"name": "K61", "weights": {"en_prose": 1, "zh_literature": 1}}]
    engine = AdaptiveTrainingEngine(StagedMixture(stages))
    tsm = monitor(tmp_path)
    _, model = fit(tmp_path, [tsm, engine], data(store), 16)

    assert [(s["name"], s["step"]) for s in engine.stages] == [("K6", 0), ("K61", 10)]
    assert (tsm.state.stage, tsm.state.stage_step) == ("K61", 10)
    assert [e["name"] for e in events(tmp_path) if e["kind"] == "stage"] == ["K6", "K61"]
    first, second = engine.changes
    assert first["weights"] == {**dict.fromkeys(engine.policy.domains, 0.0),
                                "code_c": 0.5, "code_python": 0.5}
    assert second["step"] == 10 and second["reason"] == "StagedMixture: stage K61"
    switch = second["batch_index"]
    assert 10 <= switch < 16
    for _, index, names, _ in model.seen:
        allowed = {"code_c", "code_python"} if index < switch else {"en_prose", "zh_literature"}
        assert set(names) <= allowed, f"batch {index} drew {names}"


# -- resumes ------------------------------------------------------------------------------------
def test_policy_state_survives_a_resume_exactly(store, tmp_path):
    domains = ["code_c", "en_prose", "zh_literature"]

    def engine() -> AdaptiveTrainingEngine:
        return AdaptiveTrainingEngine(BanditMixture(update_every=2))

    whole = engine()
    fit(tmp_path / "whole", [monitor(tmp_path / "whole", 2), whole], data(store, domains=domains),
        20)
    first = engine()
    fit(tmp_path / "first", [monitor(tmp_path / "first", 2), first],
        data(store, domains=domains), 10, checkpoint_every=10)
    [checkpoint] = (tmp_path / "first" / "ckpt").glob("*step=10.ckpt")
    resumed = engine()
    fit(tmp_path / "resumed", [monitor(tmp_path / "resumed", 2), resumed],
        data(store, domains=domains), 20, resume=str(checkpoint))

    assert resumed.policy.state_dict() == whole.policy.state_dict()
    assert resumed.changes == whole.changes
    assert [s["name"] for s in resumed.stages] == ["BanditMixture"]  # same policy: no new stage
    late = [c for c in whole.changes if c["step"] > 10]
    assert late and max(abs(w - 1 / 3) for w in late[-1]["weights"].values()) > 1e-3


def window_ids(store: str, domain: str, seq_len: int) -> dict[bytes, int]:
    """Training window id of ``domain`` by the bytes of its first ``seq_len`` tokens."""
    from lightning_aquila.datamodules.store import ShardStore

    stream = ShardStore(store).stream(domain)
    n = stream.windows(seq_len)
    tokens = stream.read(0, n * seq_len + 1).astype(np.int64)
    ids = {tokens[w * seq_len:(w + 1) * seq_len].tobytes(): w for w in range(n)}
    assert len(ids) == n, f"{domain} has repeated windows; pick another domain"
    return ids


def test_a_resume_with_a_new_mixture_and_policy_starts_a_stage_and_continues_the_domains(
        store, tmp_path):
    first_engine = AdaptiveTrainingEngine(StaticMixture("uniform"))
    first_dm = data(store, domains=["code_c", "en_prose", "zh_literature"])
    _, first = fit(tmp_path / "a", [monitor(tmp_path / "a"), first_engine], first_dm, 10,
                   checkpoint_every=10)
    [checkpoint] = (tmp_path / "a" / "ckpt").glob("*step=10.ckpt")
    # The YAML of the next stage: code_c dropped, a staged policy instead of a static one.
    engine = AdaptiveTrainingEngine(StagedMixture([
        {"name": "K62", "weights": {"en_prose": 3, "zh_literature": 1}}]))
    dm = data(store, domains=["en_prose", "zh_literature"], weights="uniform")
    tsm = monitor(tmp_path / "b")
    _, second = fit(tmp_path / "b", [tsm, engine], dm, 20, resume=str(checkpoint))

    stage = engine.stages[-1]
    assert (stage["name"], stage["step"]) == ("K62", 10)
    assert "policy changed from StaticMixture" in stage["reason"]
    assert "resume: domains changed (added [], removed ['code_c'])" in stage["reason"]
    assert (tsm.state.stage, tsm.state.stage_step) == ("K62", 10)
    assert [e["name"] for e in events(tmp_path / "b") if e["kind"] == "stage"] == ["K62"]
    latest = dm.mixture.history[-1]
    assert (latest.batch_index, latest.step) == (10, 10)
    assert latest.weights == {"en_prose": 0.75, "zh_literature": 0.25}
    assert all(index >= 10 and "code_c" not in names for _, index, names, _ in second.seen)
    # en_prose went on through its epoch order: nothing replayed, nothing skipped.
    ids = window_ids(store, "en_prose", SEQ_LEN)
    seen = [ids[row.numpy().tobytes()] for _, _, names, batch in first.seen + second.seen
            for name, row in zip(names, batch) if name == "en_prose"]
    sampler = dm.sampler
    order = EpochOrder("en_prose", seed=3, block_windows=sampler.block_windows,
                       shuffle_blocks=sampler.shuffle_blocks)
    assert seen == order.windows(0, len(ids), np.arange(len(seen))).tolist()
    assert sum(1 for _, _, names, _ in second.seen for n in names if n == "en_prose") > 0


# -- the ordering rule --------------------------------------------------------------------------
def test_an_engine_listed_before_the_monitor_is_refused(store, tmp_path):
    engine, tsm = AdaptiveTrainingEngine(StaticMixture("uniform")), monitor(tmp_path)
    with pytest.raises(EngineOrderError, match="list the monitor first"):
        fit(tmp_path, [engine, tsm], data(store), 2)


def test_an_engine_without_a_monitor_is_refused(store, tmp_path):
    with pytest.raises(EngineOrderError, match="needs a TrainingStateMonitor"):
        fit(tmp_path, [AdaptiveTrainingEngine(StaticMixture("uniform"))], data(store), 2)


def test_an_engine_reading_a_stale_state_stops_naming_both_steps(store, tmp_path):
    detached = monitor(tmp_path)  # given to the engine but not run by the trainer
    engine = AdaptiveTrainingEngine(StaticMixture("uniform"), monitor=detached)
    with pytest.raises(EngineOrderError, match="at step 1 reads a TrainingState of step 0"):
        fit(tmp_path, [engine], data(store), 2)


# -- any project with a mixture -----------------------------------------------------------------
class PlainData(pl.LightningDataModule):
    def __init__(self) -> None:
        super().__init__()
        self.mixture = PlainMixture(["a", "b"])

    def train_dataloader(self):
        g = torch.Generator().manual_seed(0)
        items = [{"input_ids": torch.randint(0, 16, (8,), generator=g),
                  "labels": torch.randint(0, 16, (8,), generator=g),
                  "domain": torch.tensor(i % 2)} for i in range(64)]
        return DataLoader(items, batch_size=4)


def test_the_engine_drives_any_datamodule_that_offers_the_mixture_contract(tmp_path):
    dm = PlainData()
    engine = AdaptiveTrainingEngine(StaticMixture({"a": 0.9, "b": 0.1}, max_weight=0.7))
    fit(tmp_path, [monitor(tmp_path), engine], dm, 3, model=BagOfTokensLM())
    assert dm.mixture.calls == [({"a": 0.7, "b": pytest.approx(0.3)}, "StaticMixture: start")]
    logged = [e for e in events(tmp_path) if e["kind"] == "mixture"]
    assert [(e["step"], e["reason"], e["policy"]) for e in logged] == [
        (0, "StaticMixture: start", "StaticMixture")]


# -- the shipped configs ------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["configs/quickstart.yaml",
                                  "configs/stages/aquila2-stages.yaml"])
def test_the_shipped_configs_put_a_valid_engine_after_the_monitor(path, tmp_path,
                                                                  monkeypatch):
    import yaml
    from jsonargparse import ArgumentParser
    from lightning.pytorch import Callback

    corpus = sorted(p.name for p in (REPO / "corpus").iterdir() if p.is_dir())
    callbacks = yaml.safe_load((REPO / path).read_text())["trainer"]["callbacks"]
    for callback in callbacks:  # a reference run's metrics where an excess-loss policy looks
        reference = ((callback.get("init_args") or {}).get("policy") or {}).get(
            "init_args", {}).get("reference")
        if reference:
            (tmp_path / reference).parent.mkdir(parents=True)
            (tmp_path / reference).write_text(json.dumps(
                {"step": 300, **{f"tsm/val_loss/{d}": 6.0 for d in corpus}}) + "\n")
    monkeypatch.chdir(tmp_path)
    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    callbacks = parser.instantiate_classes(parser.parse_object({"callbacks": callbacks})).callbacks
    kinds = [type(c).__name__ for c in callbacks]
    assert kinds.index("TrainingStateMonitor") < kinds.index("AdaptiveTrainingEngine")
    engine = callbacks[kinds.index("AdaptiveTrainingEngine")]
    if engine.policy is not None:  # none: the data's mixture stays
        engine.policy.setup(corpus, dict.fromkeys(corpus, 1.0),  # names and bounds fit
                            unique_tokens=dict.fromkeys(corpus, 1000), budget_tokens=10_000)
    assert engine.rollback
