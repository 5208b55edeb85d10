"""TrainingStateMonitor: per-domain losses, held-out loss, grad norm, weight statistics,
throughput/MFU, anomalies, probes, checkpointed state, and a real 2-process FSDP2 run.

The project is a plain Lightning one: its modules and mixture are the test project's
(``helpers/tiny_project.py``), its data is written here, and the first test imports nothing
of ours but the monitor.
"""

from __future__ import annotations

import copy
import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.ports import free_port
from helpers.tiny_project import (
    VOCAB,
    BagOfTokensLM,
    PlainMixture,
    TinyLM,
    jsonl,
    quiet_trainer,
)
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_aquila.callbacks.monitor import TrainingStateMonitor

DOMAINS = ["code", "web", "books"]


# -- a plain Lightning project -----------------------------------------------------------------
class TaggedWindows(Dataset):
    """Windows of token ids, each tagged with a domain and a score in [0, 1) (which the
    monitor buckets only when given ``score_edges``); some labels ignored (-100) so that
    per-sample means and token-weighted means differ."""

    def __init__(self, n: int, seq_len: int = 12, seed: int = 0, domains: int = 3) -> None:
        self.n, self.seq_len, self.seed, self.domains = n, seq_len, seed, domains

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 100003 + i)
        domain = (i * 7 + i // 3) % self.domains
        window = (torch.randint(0, VOCAB // 2, (self.seq_len + 1,), generator=g)
                  + domain * (VOCAB // 4)) % VOCAB
        labels = window[1:].clone()
        labels[: i % 4] = -100
        return {"input_ids": window[:-1], "labels": labels, "domain": torch.tensor(domain),
                "score": torch.tensor((i * 3 % 10) / 10)}


class TaggedData(LightningDataModule):
    def __init__(self, train: int = 400, val: int = 18, batch_size: int = 4) -> None:
        super().__init__()
        self.train_set, self.val_set = TaggedWindows(train), TaggedWindows(val, seed=1)
        self.batch_size = batch_size
        self.mixture = PlainMixture(DOMAINS, {"code": 0.5, "web": 0.3, "books": 0.2})

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=5)


def hand_sample_losses(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss sums and counted tokens, written out loop by loop."""
    sums, counts = [], []
    with torch.no_grad():
        logits = model(batch["input_ids"])
        for row in range(len(batch["labels"])):
            total, count = 0.0, 0
            for t, target in enumerate(batch["labels"][row].tolist()):
                if target != -100:
                    total -= torch.log_softmax(logits[row, t], -1)[target].item()
                    count += 1
            sums.append(total)
            counts.append(count)
    return torch.tensor(sums, dtype=torch.float64), torch.tensor(counts, dtype=torch.float64)


def read_csv_metrics(path: Path) -> dict[str, dict[int, float]]:
    import csv

    series: dict[str, dict[int, float]] = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key.startswith("tsm/") and value:
                    series.setdefault(key, {})[int(row["step"])] = float(value)
    return series


# -- the "done when": a plain project, metrics checked against a hand computation --------
def test_per_domain_metrics_equal_a_hand_computation_on_the_same_batches(tmp_path):
    torch.manual_seed(0)
    model = TinyLM(lr=0.0)  # weights never move: every loss is a function of its batch
    frozen = copy.deepcopy(model)
    data = TaggedData()
    every, ema_decay, steps = 3, 0.8, 9
    monitor = TrainingStateMonitor(train_loss_every_n_steps=every, ema_decay=ema_decay,
                                   mixture_every_n_steps=every)
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=steps, val_check_interval=steps,
                            logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(model, data)
    logged = read_csv_metrics(Path(trainer.logger.log_dir) / "metrics.csv")

    batches = list(data.train_dataloader())[:steps]
    ema: dict[str, float] = {}
    tokens = dict.fromkeys(DOMAINS, 0)
    for end in range(every, steps + 1, every):
        sums = dict.fromkeys(DOMAINS, 0.0)
        counts = dict.fromkeys(DOMAINS, 0)
        for batch in batches[end - every : end]:
            loss_sum, count = hand_sample_losses(frozen, batch)
            for domain, per_sample in zip(batch["domain"].tolist(), (loss_sum / count).tolist()):
                sums[DOMAINS[domain]] += per_sample
                counts[DOMAINS[domain]] += 1
                tokens[DOMAINS[domain]] += batch["input_ids"].shape[1]
        for name in DOMAINS:
            if counts[name]:
                mean = sums[name] / counts[name]
                ema[name] = mean if name not in ema else ema_decay * ema[name] + (
                    1 - ema_decay) * mean
                assert logged[f"tsm/train_loss/{name}"][end] == pytest.approx(mean, rel=1e-5)
                assert logged[f"tsm/train_loss_ema/{name}"][end] == pytest.approx(ema[name],
                                                                                  rel=1e-5)
            assert logged[f"tsm/tokens/{name}"][end] == tokens[name]
        for name, weight in data.mixture.weights.items():
            assert logged[f"tsm/mixture/{name}"][end] == pytest.approx(weight)

    val_sums = dict.fromkeys(DOMAINS, 0.0)
    val_tokens = dict.fromkeys(DOMAINS, 0.0)
    for batch in data.val_dataloader():
        loss_sum, count = hand_sample_losses(frozen, batch)
        for domain, s, c in zip(batch["domain"].tolist(), loss_sum.tolist(), count.tolist()):
            val_sums[DOMAINS[domain]] += s
            val_tokens[DOMAINS[domain]] += c
    for name in DOMAINS:
        expected = val_sums[name] / val_tokens[name]
        assert logged[f"tsm/val_loss/{name}"][steps] == pytest.approx(expected, rel=1e-5)
        assert logged[f"tsm/val_ppl/{name}"][steps] == pytest.approx(math.exp(expected), rel=1e-5)
    average = sum(val_sums.values()) / sum(val_tokens.values())
    assert logged["tsm/val_loss_avg"][steps] == pytest.approx(average, rel=1e-5)
    worst = max(DOMAINS, key=lambda d: val_sums[d] / val_tokens[d])
    assert monitor.state.val_worst_domain == worst
    assert monitor.state.tokens == sum(tokens.values())


# -- anomalies ---------------------------------------------------------------------------------
def test_spike_detector_flags_an_injected_spike_and_not_normal_noise():
    from lightning_aquila.callbacks.monitor import SpikeDetector

    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2000, generator=g).mul(0.03).tolist()
    losses = [3.0 - 0.0002 * step + noise[step] for step in range(2000)]
    quiet = SpikeDetector(window=100, zscore=6.0, min_history=20)
    assert [step for step, loss in enumerate(losses) if quiet.update(loss) is not None] == []

    losses[1500] += 0.5  # ~17 standard deviations
    detector = SpikeDetector(window=100, zscore=6.0, min_history=20)
    flagged = [step for step, loss in enumerate(losses) if detector.update(loss) is not None]
    assert flagged == [1500]
    assert losses[1500] not in detector.window  # a spike does not widen the band


def test_a_spike_is_recorded_with_its_step_batch_and_domains_and_seen_by_later_callbacks(tmp_path):
    spike_batch = 14
    seen: list = []

    class LaterCallback(Callback):  # stands in for the ATE
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == spike_batch:
                seen.extend(monitor.state.anomalies)

    torch.manual_seed(0)
    data = TaggedData()
    monitor = TrainingStateMonitor(spike_window=10, spike_min_history=8, spike_zscore=6.0)
    trainer = quiet_trainer(tmp_path, [monitor, LaterCallback()], max_steps=20,
                            limit_val_batches=0)
    trainer.fit(TinyLM(lr=0.02, spike_at=spike_batch), data)

    batch = list(data.train_dataloader())[spike_batch]
    domains = sorted({DOMAINS[d] for d in batch["domain"].tolist()}, key=DOMAINS.index)
    [spike] = monitor.state.anomalies
    assert (spike.kind, spike.step, spike.batch_index) == ("spike", spike_batch + 1, spike_batch)
    assert spike.domains == domains and spike.zscore > 6.0
    assert seen == [spike]
    events = jsonl(tmp_path / "tsm" / "events.jsonl")
    [logged] = [e for e in events if e["kind"] == "anomaly"]
    assert (logged["type"], logged["step"], logged["domains"]) == ("spike", spike_batch + 1,
                                                                  domains)


def test_a_nonfinite_loss_is_flagged_at_its_step(tmp_path):
    torch.manual_seed(0)
    monitor = TrainingStateMonitor(detect_spikes=False)
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=6, limit_val_batches=0)
    trainer.fit(TinyLM(nan_at=3), TaggedData())
    first = monitor.state.anomalies[0]
    assert (first.kind, first.step, first.batch_index) == ("nonfinite_loss", 4, 3)
    kinds_at_4 = {a.kind for a in monitor.state.anomalies if a.step == 4}
    assert kinds_at_4 == {"nonfinite_loss", "nonfinite_grad"}


def test_deferred_checks_log_the_same_values_at_the_same_steps_one_step_later(tmp_path):
    """On CUDA the monitor reads each step's loss and gradient norm at the end of the next
    step (no host wait per step). The run files must not tell the difference: same values,
    same steps, and an anomaly keeps its own step, batch and domains."""
    logged = {}
    for deferred in (False, True):
        torch.manual_seed(0)
        run = tmp_path / f"deferred-{deferred}"
        monitor = TrainingStateMonitor(deferred_checks=deferred, grad_norm_every_n_steps=1,
                                       train_loss_every_n_steps=2, spike_window=10,
                                       spike_min_history=8, spike_zscore=6.0)
        trainer = quiet_trainer(run, [monitor], max_steps=20, limit_val_batches=0)
        trainer.fit(TinyLM(lr=0.02, spike_at=14), TaggedData())
        series: dict[str, dict[int, float]] = {}
        for record in jsonl(run / "tsm" / "metrics.jsonl"):
            for key, value in record.items():
                if key.startswith(("tsm/loss", "tsm/grad_norm", "tsm/anomaly")):
                    series.setdefault(key, {})[record["step"]] = value
        anomalies = [(a.kind, a.step, a.batch_index, a.domains) for a in monitor.state.anomalies]
        logged[deferred] = series, anomalies
    (immediate, anomalies), (deferred, deferred_anomalies) = logged[False], logged[True]
    assert sorted(deferred["tsm/grad_norm"]) == list(range(1, 21))  # the last one too
    assert sorted(deferred["tsm/loss"]) == list(range(2, 21, 2))
    for key, values in immediate.items():
        assert deferred[key] == pytest.approx(values, rel=1e-12), key
    assert deferred_anomalies == anomalies and anomalies[0][:3] == ("spike", 15, 14)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_deferred_host_read_of_a_cuda_tensor_is_its_value_with_later_work_queued():
    from lightning_aquila.callbacks.monitor.norms import HostRead

    values = torch.arange(4.0, device="cuda", dtype=torch.float64)
    read = HostRead(values * 2)
    values.add_(100)  # later work on the same stream must not leak into the read
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        big = big @ big / 64
    assert read.tolist() == [0.0, 2.0, 4.0, 6.0]


# -- gradients, weights, throughput ---------------------------------------------------------------
def test_grad_norm_equals_torch_clip_grad_norm_per_group_and_overall(tmp_path):
    expected: list[tuple[float, dict[str, float]]] = []
    measured: list[tuple[float, dict[str, float]]] = []

    class TorchNorms(Callback):  # runs after the monitor in the same hook
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            groups = {g["name"]: torch.nn.utils.clip_grad_norm_(g["params"], math.inf).item()
                      for g in optimizer.param_groups}
            total = torch.nn.utils.clip_grad_norm_(pl_module.parameters(), math.inf).item()
            expected.append((total, groups))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            measured.append((monitor.state.grad_norm, dict(monitor.state.grad_norm_groups)))

    torch.manual_seed(0)
    monitor = TrainingStateMonitor(grad_norm_every_n_steps=1)
    trainer = quiet_trainer(tmp_path, [monitor, TorchNorms()], max_steps=4, limit_val_batches=0,
                            gradient_clip_val=0.1)  # clipping happens after the measurement
    trainer.fit(TinyLM(optimizer="adamw"), TaggedData())
    assert len(measured) == len(expected) == 4
    for (total, groups), (ours, our_groups) in zip(expected, measured):
        assert ours == pytest.approx(total, rel=1e-6)
        assert our_groups == pytest.approx(groups, rel=1e-6)


def test_weight_norm_update_ratio_and_stage_change_equal_a_hand_computation(tmp_path):
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    stats: dict[int, dict] = {}

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step in (2, 4, 5, 6):
                snapshots[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}
            if step == 5:
                monitor.record_event("stage", name="second")
            if step % 2 == 0:
                stats[step] = copy.deepcopy(monitor.state.weight_stats)

    def layer_norm(weights, layer, minus=None):
        squares = [(w - (minus[n] if minus else 0)).pow(2).sum() for n, w in weights.items()
                   if n.startswith(layer + ".")]
        return math.sqrt(sum(squares))

    torch.manual_seed(0)
    monitor = TrainingStateMonitor(weight_stats_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, [monitor, Recorder()], max_steps=6, limit_val_batches=0)
    trainer.fit(TinyLM(lr=0.5), TaggedData())

    layers = ["embed", "blocks.0", "blocks.1", "head"]
    assert sorted(stats[2]) == sorted(layers)
    for layer in layers:
        w2, w4, w5, w6 = (snapshots[s] for s in (2, 4, 5, 6))
        assert stats[2][layer] == {"norm": pytest.approx(layer_norm(w2, layer), rel=1e-6)}
        assert stats[4][layer]["update_ratio"] == pytest.approx(
            layer_norm(w4, layer, minus=w2) / layer_norm(w2, layer), rel=1e-5)
        # until the stage boundary at step 5 the reference is the first check (step 2) ...
        assert stats[4][layer]["stage_change"] == pytest.approx(
            layer_norm(w4, layer, minus=w2) / layer_norm(w2, layer), rel=1e-5)
        # ... then the weights at the boundary
        assert stats[6][layer]["stage_change"] == pytest.approx(
            layer_norm(w6, layer, minus=w5) / layer_norm(w5, layer), rel=1e-5)
        assert stats[6][layer]["update_ratio"] == pytest.approx(
            layer_norm(w6, layer, minus=w4) / layer_norm(w4, layer), rel=1e-5)
    assert (monitor.state.stage, monitor.state.stage_step) == ("second", 5)


def test_layer_of_groups_parameters_by_block_and_ignores_wrappers():
    from lightning_aquila.callbacks.monitor import layer_of

    assert layer_of("model.layers.3.attention.q_proj.weight") == "model.layers.3"
    assert layer_of("model.layers.3._checkpoint_wrapped_module.mlp.up_proj.weight") == (
        "model.layers.3")
    assert layer_of("model.layers._orig_mod.3.mlp.up_proj.weight") == "model.layers.3"
    assert layer_of("model.embed_tokens.weight") == "model.embed_tokens"
    assert layer_of("model.norm.weight") == "model.norm"
    assert layer_of("scale") == "scale"


def test_throughput_and_mfu_follow_the_formula():
    from lightning_aquila.callbacks.monitor import throughput

    # 2 ranks of a tensor-parallel group processed 8192 tokens in 2 s: 2048 tokens/s each
    per_device, mfu = throughput(8192, 2.0, replication=2, flops_per_token=6e9,
                                 peak_flops=989e12)
    assert per_device == 2048
    assert mfu == pytest.approx(2048 * 6e9 / 989e12)
    assert throughput(100, 1.0, 1, None, 1.0) == (100.0, None)


def test_mfu_uses_the_module_config_flops_per_token_at_the_batch_length(tmp_path):
    class Config:
        def flops_per_token(self, seq_len):
            return 1000.0 * seq_len

    model = TinyLM()
    model.config = Config()
    monitor = TrainingStateMonitor(throughput_every_n_steps=2, peak_flops=1e6)
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=4, limit_val_batches=0)
    trainer.fit(model, TaggedData())
    rows = jsonl(tmp_path / "tsm" / "metrics.jsonl")
    logged = [r for r in rows if "tsm/mfu" in r]
    assert [r["step"] for r in logged] == [2, 4]
    for row in logged:  # sequence length 12
        assert row["tsm/mfu"] == pytest.approx(row["tsm/tokens_per_sec"] * 12_000 / 1e6)


def test_peak_memory_is_logged_with_throughput_where_the_allocator_counts_it(tmp_path,
                                                                            monkeypatch):
    monitor_module = importlib.import_module("lightning_aquila.callbacks.monitor.throughput")

    trainer = quiet_trainer(tmp_path / "cpu", [TrainingStateMonitor(throughput_every_n_steps=2)],
                            max_steps=2, limit_val_batches=0)
    trainer.fit(TinyLM(), TaggedData())
    assert all("tsm/peak_memory_gib" not in r for r in jsonl(tmp_path / "cpu/tsm/metrics.jsonl"))

    monkeypatch.setattr(monitor_module, "peak_memory", lambda device: 3 * 2**30)
    trainer = quiet_trainer(tmp_path / "gpu", [TrainingStateMonitor(throughput_every_n_steps=2)],
                            max_steps=4, limit_val_batches=0)
    trainer.fit(TinyLM(), TaggedData())
    rows = [r for r in jsonl(tmp_path / "gpu/tsm/metrics.jsonl") if "tsm/tokens_per_sec" in r]
    assert [(r["step"], r["tsm/peak_memory_gib"]) for r in rows] == [(2, 3.0), (4, 3.0)]


def test_loss_every_step_logs_each_steps_loss_and_keeps_the_domain_interval(tmp_path):
    class StepLosses(Callback):
        def __init__(self) -> None:
            self.losses: dict[int, float] = {}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.losses[trainer.global_step] = outputs["loss"].item()

    recorder = StepLosses()
    monitor = TrainingStateMonitor(loss_every_n_steps=1, train_loss_every_n_steps=3)
    trainer = quiet_trainer(tmp_path, [monitor, recorder], max_steps=6, limit_val_batches=0)
    trainer.fit(TinyLM(), TaggedData())
    rows = jsonl(tmp_path / "tsm" / "metrics.jsonl")
    logged = {r["step"]: r["tsm/loss"] for r in rows if "tsm/loss" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6]
    assert logged == pytest.approx(recorder.losses, rel=1e-6)
    domain_steps = [r["step"] for r in rows if "tsm/train_loss/code" in r]
    assert domain_steps == [3, 6]


# -- state and run files --------------------------------------------------------------------------
def test_monitor_state_round_trips_through_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    first = TrainingStateMonitor(train_loss_every_n_steps=2, weight_stats_every_n_steps=2,
                                 spike_min_history=3)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6)
    trainer = quiet_trainer(tmp_path, [first, checkpoint], max_steps=6, limit_val_batches=0,
                            enable_checkpointing=True)
    trainer.fit(TinyLM(spike_at=4), TaggedData())
    assert first.state.anomalies and first.state.weight_stats and first.spikes.window
    saved = copy.deepcopy(first.state_dict())

    restored: list[dict] = []

    class AtStart(Callback):
        def on_train_start(self, trainer, pl_module):
            restored.append(copy.deepcopy(second.state_dict()))

    second = TrainingStateMonitor(train_loss_every_n_steps=2, weight_stats_every_n_steps=2,
                                  spike_min_history=3)
    trainer = quiet_trainer(tmp_path, [second, AtStart()], max_steps=8, limit_val_batches=0,
                            enable_checkpointing=True)
    trainer.fit(TinyLM(), TaggedData(), ckpt_path=checkpoint.best_model_path)
    [state] = restored
    snapshots, saved_snapshots = state.pop("snapshots"), saved.pop("snapshots")
    assert state == saved
    for kind in ("previous", "stage"):
        assert snapshots[kind].keys() == saved_snapshots[kind].keys()
        for name, tensor in snapshots[kind].items():
            torch.testing.assert_close(tensor, saved_snapshots[kind][name])
    assert second.state.step == 8 and second.state.tokens > first.state.tokens



#: ``TrainingStateMonitor.state_dict()`` as the monitor wrote it before it became a package of
#: parts (commit f7e6277): 8 steps of ``BagOfTokensLM(vocab=64, width=4)`` on ``TaggedData``
#: with ``train_loss_every_n_steps=3, weight_stats_every_n_steps=2, spike_window=6,
#: spike_min_history=4``: a spike at step 7, a stage "K2" from step 4, weight snapshots, and
#: a train-loss interval two steps in.
FORMAT1_STATE = Path(__file__).parent / "data" / "monitor_state_format1.pt"


def test_a_monitor_state_written_before_the_split_loads_and_training_goes_on(tmp_path):
    saved = torch.load(FORMAT1_STATE, weights_only=True)
    monitor = TrainingStateMonitor(train_loss_every_n_steps=3, weight_stats_every_n_steps=2,
                                   spike_window=6, spike_min_history=4)
    monitor.load_state_dict(saved)
    assert (monitor.state.step, monitor.state.stage, monitor.state.stage_step) == (8, "K2", 4)
    assert [(a.kind, a.step, a.batch_index) for a in monitor.state.anomalies] == [("spike", 7, 6)]
    assert monitor.anomaly_count == 1 and list(monitor.spikes.window) == saved["spike_window"]

    torch.manual_seed(0)
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=3, limit_val_batches=0)
    trainer.fit(BagOfTokensLM(vocab=64, width=4), TaggedData())
    # the interval's restored per-domain table counted with the new steps' 3 x 4 windows of 12
    interval = sum(tokens for _, _, tokens in saved["domain_tables"][0])
    assert monitor.state.tokens == saved["state"]["tokens"] + interval + 3 * 4 * 12
    # the first weight check after the resume measures against the restored snapshots
    assert monitor.state.weight_step == 2
    for stats in monitor.state.weight_stats.values():
        assert {"norm", "update_ratio", "stage_change"} <= stats.keys()
    # and the next checkpoint is written in the same format
    again = monitor.state_dict()
    assert again.keys() == saved.keys() and again["format"] == saved["format"] == 1
    assert again["state"].keys() == saved["state"].keys()
    assert {k: v.keys() for k, v in again["snapshots"].items()} == {
        k: v.keys() for k, v in saved["snapshots"].items()}

def test_record_event_and_mixture_changes_go_to_the_event_log(tmp_path):
    from lightning_aquila.datamodules.mixture import DomainMixture

    class Engine(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                trainer.datamodule.mixture.set_weights({"code": 0.2, "web": 0.2, "books": 0.6},
                                                       reason="policy", step=2)
            if trainer.global_step == 3:
                monitor.record_event("rollback", to_step=1, reason="test")

    data = TaggedData()
    data.mixture = DomainMixture(DOMAINS, {"code": 1, "web": 1, "books": 1})
    monitor = TrainingStateMonitor(mixture_every_n_steps=1)
    monitor.record_event("stage", name="warmup")  # before fit: kept until the files open
    trainer = quiet_trainer(tmp_path, [monitor, Engine()], max_steps=4, limit_val_batches=0)
    trainer.fit(TinyLM(), data)
    events = jsonl(tmp_path / "tsm" / "events.jsonl")
    assert [e["kind"] for e in events] == ["stage", "session_start", "mixture", "rollback"]
    assert events[0]["name"] == "warmup"
    assert events[1]["mixture_history"][0]["weights"] == pytest.approx(dict.fromkeys(DOMAINS,
                                                                                  1 / 3))
    assert (events[2]["step"], events[2]["reason"]) == (2, "policy")
    assert events[2]["weights"] == {"code": 0.2, "web": 0.2, "books": 0.6}
    assert (events[3]["step"], events[3]["to_step"]) == (3, 1)
    rows = jsonl(tmp_path / "tsm" / "metrics.jsonl")
    # the engine runs after the monitor: the change made at step 2 is logged from step 3 on
    assert [r["tsm/mixture/books"] for r in rows] == pytest.approx([1 / 3, 1 / 3, 0.6, 0.6])


# -- probes ---------------------------------------------------------------------------------------
class BigramLM(LightningModule):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator()
                                              .manual_seed(3)))

    def forward(self, input_ids):
        return self.table[input_ids]


def test_multiple_choice_probe_scores_choices_by_their_log_likelihood(tmp_path):
    from lightning_aquila.callbacks.probes import MultipleChoiceProbe

    items = [{"context": "ab", "choices": ["c", "dd", "e"], "answer": 1, "lang": "en"},
             {"context": "ba", "choices": ["ee", "c"], "answer": 0, "lang": "en"},
             {"context": "cc", "choices": ["a", "b", "cde"], "answer": 2, "lang": "zh"},
             {"context": "d", "choices": ["ab", "ba"], "answer": 0, "lang": "zh"}]
    path = tmp_path / "task.jsonl"
    path.write_text("\n".join(json.dumps(item) for item in items))
    encode = lambda text: [ord(ch) - ord("a") + 1 for ch in text]  # noqa: E731  (0 is bos)
    model = BigramLM(vocab=6)
    probe = MultipleChoiceProbe(str(path), tokenizer=encode, bos_token_id=0, batch_size=3)
    results = probe(model)

    log_probs = torch.log_softmax(model.table.detach(), -1)
    hits, hits_norm, by_lang = 0, 0, {"en": [], "zh": []}
    for item in items:
        scores = []
        for choice in item["choices"]:
            ids = [0, *encode(item["context"]), *encode(choice)]
            first = len(ids) - len(choice)
            scores.append(sum(log_probs[ids[t - 1], ids[t]].item() for t in range(first,
                                                                                 len(ids))))
        best = max(range(len(scores)), key=scores.__getitem__)
        best_norm = max(range(len(scores)),
                        key=lambda i: scores[i] / len(item["choices"][i]))
        hits += best == item["answer"]
        hits_norm += best_norm == item["answer"]
        by_lang[item["lang"]].append(best == item["answer"])
    assert results == pytest.approx({
        "acc": hits / 4, "acc_norm": hits_norm / 4,
        "acc_en": sum(by_lang["en"]) / 2, "acc_zh": sum(by_lang["zh"]) / 2,
        "chance": (1 / 3 + 1 / 2 + 1 / 3 + 1 / 2) / 4})  # guessing: the mean of 1/choices
    assert model.training  # the probe restores the mode it found


def test_bundled_probe_task_is_bilingual_and_well_formed():
    from lightning_aquila.callbacks.probes import BUNDLED_TASK, load_items

    items = load_items(BUNDLED_TASK)
    assert len(items) >= 40
    assert {item["lang"] for item in items} == {"en", "zh"}
    assert len({item["context"] for item in items}) == len(items)


def test_bundled_probe_scores_an_aquila_model_with_the_bundled_tokenizer():
    pytest.importorskip("lightning_aquila.tokenizer", reason="bundled tokenizer not there yet")
    from lightning_aquila import AquilaLM
    from lightning_aquila.callbacks.probes import MultipleChoiceProbe, _encoder

    encode = _encoder(None)
    probe = MultipleChoiceProbe()
    for item in probe.items:  # every choice is scored on at least one token
        assert all(len(encode(choice)) >= 1 for choice in item["choices"]), item
    torch.manual_seed(0)
    lm = AquilaLM(preset="aquila2-tiny")
    lm.configure_model()
    results = probe(lm)
    assert set(results) == {"acc", "acc_norm", "acc_en", "acc_zh", "chance"}
    assert all(0.0 <= value <= 1.0 for value in results.values())


def test_probe_results_are_logged_every_n_steps(tmp_path):
    from lightning_aquila.callbacks.probes import Probe

    class CountingProbe(Probe):
        name = "count"

        def __init__(self):
            self.calls = 0

        def __call__(self, pl_module):
            self.calls += 1
            return {"calls": float(self.calls)}

    monitor = TrainingStateMonitor(probes=[CountingProbe()], probes_every_n_steps=2)
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=5, limit_val_batches=0)
    trainer.fit(TinyLM(), TaggedData())
    rows = jsonl(tmp_path / "tsm" / "metrics.jsonl")
    assert [(r["step"], r["tsm/probe/count/calls"]) for r in rows
            if "tsm/probe/count/calls" in r] == [(2, 1.0), (4, 2.0)]
    assert monitor.state.probes == {"count/calls": 2.0}


# -- two processes, FSDP2 (ModelParallelStrategy on CPU with gloo) --------------------------------
def test_two_process_fsdp2_and_tensor_parallel_runs_reduce_across_ranks(tmp_path):
    """Both ranks check their monitor against values computed from all ranks' batches and
    from the gathered (test-only) full weights: first data-parallel FSDP2, then one
    tensor-parallel group; see the workers below."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), __file__, str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0]["state"] == reports[1]["state"]  # every rank reads the same state
    for report in reports:
        assert report["checked"] == ["train_loss", "tokens", "val_loss", "score_buckets",
                                     "grad_norm", "weight_norm", "update_ratio"]
    assert (tmp_path / "tp_done").exists()  # the tensor-parallel run's checks passed too


class ShardedTinyLM(TinyLM):
    def configure_model(self):
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for module in (self.embed, *self.blocks, self.head):
            fully_shard(module, mesh=mesh)
        fully_shard(self, mesh=mesh)


def _fsdp2_worker(out: Path) -> None:  # pragma: no cover - runs in the torchrun processes
    import torch.distributed as dist
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    records: dict[str, list] = {"train": [], "val": [], "grad": [], "weights": {}}

    class Witness(Callback):
        """Listed after the monitor: what each rank saw, and torch's own numbers."""

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norm = torch.nn.utils.clip_grad_norm_(list(pl_module.parameters()), math.inf)
            self.norm = norm.full_tensor().item() if isinstance(norm, DTensor) else norm.item()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records["grad"].append((self.norm, monitor.state.grad_norm))
            records["train"] += list(zip(batch["domain"].tolist(),
                                         outputs["sample_loss"].tolist(),
                                         batch["score"].tolist()))
            if trainer.global_step in (2, 4):  # full weights, gathered here for the check only
                records["weights"][trainer.global_step] = {
                    name: p.full_tensor().detach().clone()
                    for name, p in pl_module.named_parameters()}

        def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                    dataloader_idx=0):
            with torch.no_grad():
                loss_sum, tokens = monitor.val_loss_fn(pl_module, batch)
            records["val"] += list(zip(batch["domain"].tolist(), loss_sum.tolist(),
                                       tokens.tolist(), batch["score"].tolist()))

    torch.manual_seed(0)
    steps = 4
    monitor = TrainingStateMonitor(train_loss_every_n_steps=steps, grad_norm_every_n_steps=1,
                                   weight_stats_every_n_steps=2, score_edges=[0.25, 0.5, 0.75])
    trainer = Trainer(accelerator="cpu", devices=2, max_steps=steps, val_check_interval=steps,
                      strategy=ModelParallelStrategy(data_parallel_size=2,
                                                     tensor_parallel_size=1),
                      callbacks=[monitor, Witness()], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=out)
    trainer.fit(ShardedTinyLM(lr=0.5), TaggedData(val=20))

    everything = [None, None]
    dist.all_gather_object(everything, {k: records[k] for k in ("train", "val")})
    train = [pair for rank in everything for pair in rank["train"]]
    val = [row for rank in everything for row in rank["val"]]
    state = monitor.state
    checked = []
    for index, name in enumerate(DOMAINS):
        losses = [loss for domain, loss, _ in train if domain == index]
        assert state.train_loss_last[name] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert state.tokens_per_domain[name] == 12 * len(losses)
    checked += ["train_loss", "tokens"]
    for index, name in enumerate(DOMAINS):
        sums = sum(s for d, s, _, _ in val if d == index)
        tokens = sum(t for d, _, t, _ in val if d == index)
        assert state.val_loss[name] == pytest.approx(sums / tokens, rel=1e-6)
    assert len(val) == 20  # the whole held-out set, split between the ranks
    checked.append("val_loss")
    logged = {k: float(v) for k, v in trainer.callback_metrics.items() if "_by_score/" in k}
    for k, (low, high) in enumerate([(0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1)]):
        losses = [loss for _, loss, score in train if low <= score < high]
        assert logged[f"tsm/train_loss_by_score/q{k + 1}"] == pytest.approx(
            sum(losses) / len(losses), rel=1e-6)
        assert logged[f"tsm/train_share_by_score/q{k + 1}"] == pytest.approx(
            len(losses) / len(train))
        rows = [(s, t) for _, s, t, score in val if low <= score < high]
        assert logged[f"tsm/val_loss_by_score/q{k + 1}"] == pytest.approx(
            sum(s for s, _ in rows) / sum(t for _, t in rows), rel=1e-6)
    checked.append("score_buckets")
    assert len(records["grad"]) == steps
    for torch_norm, ours in records["grad"]:
        assert ours == pytest.approx(torch_norm, rel=1e-5)
    checked.append("grad_norm")
    w2, w4 = records["weights"][2], records["weights"][4]
    for layer in ("embed", "blocks.0", "blocks.1", "head"):
        names = [n for n in w4 if n.startswith(layer + ".")]
        norm4 = math.sqrt(sum(w4[n].pow(2).sum().item() for n in names))
        norm2 = math.sqrt(sum(w2[n].pow(2).sum().item() for n in names))
        change = math.sqrt(sum((w4[n] - w2[n]).pow(2).sum().item() for n in names))
        assert state.weight_stats[layer]["norm"] == pytest.approx(norm4, rel=1e-5)
        assert state.weight_stats[layer]["update_ratio"] == pytest.approx(change / norm2,
                                                                          rel=1e-5)
    checked += ["weight_norm", "update_ratio"]
    state_dict = state.to_dict()
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(
        {"checked": checked, "state": {k: state_dict[k] for k in (
            "train_loss", "tokens_per_domain", "val_loss", "grad_norm", "weight_stats",
            "loss")}}))


class TensorParallelTinyLM(TinyLM):
    def configure_model(self):
        from torch.distributed.tensor import Replicate
        from torch.distributed.tensor.parallel import (
            ColwiseParallel,
            RowwiseParallel,
            parallelize_module,
        )

        mesh = self.device_mesh["tensor_parallel"]
        parallelize_module(self.blocks[0], mesh, ColwiseParallel(output_layouts=Replicate()))
        parallelize_module(self.blocks[1], mesh, RowwiseParallel(input_layouts=Replicate()))


def _tensor_parallel_worker(out: Path) -> None:  # pragma: no cover - runs under torchrun
    """Both ranks form one tensor-parallel group: they see the same batches, so tokens are
    counted once, and the sharded blocks' statistics come from their two halves."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.tensor import DTensor

    def full(t):
        return t.full_tensor() if isinstance(t, DTensor) else t

    records: dict[str, list] = {"train": [], "grad": [], "weights": []}

    class Witness(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norm = math.sqrt(sum(full(p.grad).pow(2).sum().item()
                                      for p in pl_module.parameters()))

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            records["train"] += list(zip(batch["domain"].tolist(),
                                         outputs["sample_loss"].tolist()))
            records["grad"].append((self.norm, monitor.state.grad_norm))
            records["weights"] = {n: full(p).detach().clone()
                                  for n, p in pl_module.named_parameters()}

    torch.manual_seed(0)
    monitor = TrainingStateMonitor(train_loss_every_n_steps=3, grad_norm_every_n_steps=1,
                                   weight_stats_every_n_steps=3)
    trainer = Trainer(accelerator="cpu", devices=2, max_steps=3, limit_val_batches=0,
                      strategy=ModelParallelStrategy(data_parallel_size=1,
                                                     tensor_parallel_size=2),
                      callbacks=[monitor, Witness()], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=out / "tp")
    trainer.fit(TensorParallelTinyLM(lr=0.5), TaggedData())
    assert isinstance(trainer.lightning_module.blocks[0].weight, DTensor)
    state = monitor.state
    for index, name in enumerate(DOMAINS):
        losses = [loss for domain, loss in records["train"] if domain == index]
        assert state.train_loss_last[name] == pytest.approx(sum(losses) / len(losses), rel=1e-6)
        assert state.tokens_per_domain[name] == 12 * len(losses)  # not twice: one TP group
    for torch_norm, ours in records["grad"]:
        assert ours == pytest.approx(torch_norm, rel=1e-5)
    weights = records["weights"]
    for layer in ("embed", "blocks.0", "blocks.1", "head"):
        norm = math.sqrt(sum(w.pow(2).sum().item() for n, w in weights.items()
                             if n.startswith(layer + ".")))
        assert state.weight_stats[layer]["norm"] == pytest.approx(norm, rel=1e-5)


if __name__ == "__main__":  # the torchrun processes of the two-process test
    _fsdp2_worker(Path(sys.argv[1]))
    _tensor_parallel_worker(Path(sys.argv[1]))
    (Path(sys.argv[1]) / "tp_done").touch()
    # Shut gloo down before interpreter exit: its threads alive at exit once aborted a rank
    # with "terminate called without an active exception" after all checks had passed.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
