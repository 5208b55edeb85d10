"""The monitor's loss by score quantile: real fits of the tiny preset on a real zarr store
whose documents carry scores, each bucket's training and held-out loss checked against a
direct computation from the per-sample losses and scores of the very same batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_aquila import AquilaLM
from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.callbacks.monitor.score_buckets import ScoreBuckets
from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.writer import DomainWriter

SEQ, DOCS, EVERY = 16, 64, 3
#: held-out documents per domain: (part, score), 3 * SEQ tokens each
HELD_OUT = [(0, 0.05), (1, 0.35), (0, 0.65), (1, 0.95), (0, 0.45), (1, 0.15)]


def train_scores(domain: int) -> np.ndarray:
    """Domain 0 scores its documents 0..1 evenly; domain 1 mostly high (sqrt)."""
    ramp = np.arange(DOCS, dtype=np.float64) / DOCS
    return (ramp if domain == 0 else np.sqrt(ramp)).astype(np.float32)


@pytest.fixture
def scored_store(tmp_path) -> str:
    """Two domains of DOCS one-window documents of random in-vocabulary tokens, each scored,
    and held-out documents of both parts with the scores of HELD_OUT."""
    url = str(tmp_path / "scored.zarr")
    rng = np.random.default_rng(0)
    for index, name in enumerate(("a", "b")):
        with DomainWriter(url, name, tokenizer={"hash": "synthetic"}, language="xx",
                          chunk_tokens=512, with_quality=True) as writer:
            for score in train_scores(index).tolist():
                writer.add_document("train", rng.integers(0, 4000, SEQ, dtype=np.uint32),
                                    quality=score)
            for part, score in HELD_OUT:
                writer.add_document("heldout", rng.integers(0, 4000, 3 * SEQ, dtype=np.uint32),
                                    quality=score, part=part)
            writer.add_source({"path": f"synthetic-{name}", "sha256": name})
            writer.commit()
    return url


def expected_edges(buckets: int = 4) -> np.ndarray:
    pooled = np.concatenate([train_scores(0), train_scores(1)])
    return np.quantile(pooled, [k / buckets for k in range(1, buckets)], method="lower")


class Recorder(Callback):
    """Every training batch's (step after it, sample losses, scores) and every held-out
    batch's (part, loss sums, tokens, scores)."""

    def __init__(self) -> None:
        self.train: list[tuple[int, np.ndarray, np.ndarray]] = []
        self.held_out: list[tuple[np.ndarray, ...]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.train.append((trainer.global_step, outputs["sample_loss"].double().numpy(),
                           batch["score"].numpy()))

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx,
                                dataloader_idx=0) -> None:
        self.held_out.append((batch["part"].numpy(), outputs["sample_loss_sum"].double().numpy(),
                              outputs["sample_tokens"].double().numpy(), batch["score"].numpy()))


def fit(store: str, run: Path, steps: int, *, quality: dict | None = None,
        callbacks: tuple = (), resume: str | None = None, checkpoint_every: int | None = None,
        **monitor_args) -> TrainingStateMonitor:
    monitor = TrainingStateMonitor(train_loss_every_n_steps=EVERY, run_dir=str(run),
                                   grad_norm_every_n_steps=None, weight_stats_every_n_steps=None,
                                   throughput_every_n_steps=None, **monitor_args)
    extra = [ModelCheckpoint(dirpath=run / "ckpt", save_top_k=-1,
                             every_n_train_steps=checkpoint_every)] if checkpoint_every else []
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, val_check_interval=steps,
                      logger=False, enable_checkpointing=bool(checkpoint_every),
                      enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=run,
                      callbacks=[monitor, *callbacks, *extra])
    torch.manual_seed(0)
    module = AquilaLM(preset="aquila2-tiny", learning_rate=1e-3, warmup_steps=1,
                      decay_steps=20)  # a schedule that does not depend on max_steps
    data = DomainDataModule(store, seq_len=SEQ, batch_size=4, num_workers=0, verify="none",
                            val_windows_per_domain=8, val_batch_size=3, quality=quality)
    trainer.fit(module, data, ckpt_path=resume)
    return monitor


def logged(run: Path) -> dict[str, dict[int, float]]:
    series: dict[str, dict[int, float]] = {}
    for line in (run / "tsm" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key.startswith("tsm/"):
                series.setdefault(key, {})[row["step"]] = value
    return series


def events(run: Path, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run / "tsm" / "events.jsonl").read_text().splitlines()]
    return [e for e in rows if e["kind"] == kind]


def by_bucket(values: np.ndarray, weights: np.ndarray, scores: np.ndarray, edges: np.ndarray
              ) -> tuple[dict[str, float], dict[str, float]]:
    """Per bucket ``q<k>``: sum(values) / sum(weights) and the share of the weights."""
    bucket = np.searchsorted(edges.astype(np.float32), scores, side="right")
    loss, share = {}, {}
    for k in range(len(edges) + 1):
        picked = bucket == k
        if weights[picked].sum() > 0:
            loss[f"q{k + 1}"] = values[picked].sum() / weights[picked].sum()
        share[f"q{k + 1}"] = weights[picked].sum() / weights.sum()
    return loss, share


QUALITY = {"score": "quality", "temperature": 0.5}


def test_training_loss_per_score_bucket_equals_a_direct_computation(scored_store, tmp_path):
    recorder = Recorder()
    monitor = fit(scored_store, tmp_path, 9, quality=QUALITY, callbacks=(recorder,))
    series = logged(tmp_path)
    edges = expected_edges()
    assert monitor._score_buckets.edges == pytest.approx(edges.tolist(), abs=0)
    for end in range(EVERY, 10, EVERY):
        rows = [r for r in recorder.train if end - EVERY < r[0] <= end]
        losses = np.concatenate([r[1] for r in rows])
        scores = np.concatenate([r[2] for r in rows])
        loss, share = by_bucket(losses, np.ones_like(losses), scores, edges)
        assert len(loss) >= 2  # the check means something: several buckets drawn
        for name in ("q1", "q2", "q3", "q4"):
            assert series.get(f"tsm/train_loss_by_score/{name}", {}).get(end) == (
                pytest.approx(loss[name], rel=1e-6) if name in loss else None)
            assert series[f"tsm/train_share_by_score/{name}"][end] == pytest.approx(share[name])


def test_dev_and_test_loss_per_score_bucket_equal_a_direct_computation(scored_store, tmp_path):
    recorder = Recorder()
    fit(scored_store, tmp_path, 3, quality=QUALITY, callbacks=(recorder,))
    series = logged(tmp_path)
    edges = expected_edges()
    part, sums, tokens, scores = (np.concatenate(c) for c in zip(*recorder.held_out))
    for name, index in (("val", 0), ("test", 1)):
        picked = part == index
        loss, share = by_bucket(sums[picked], tokens[picked], scores[picked], edges)
        assert len(loss) >= 2
        for bucket in ("q1", "q2", "q3", "q4"):
            assert series.get(f"tsm/{name}_loss_by_score/{bucket}", {}).get(3) == (
                pytest.approx(loss[bucket], rel=1e-5) if bucket in loss else None)
            assert series[f"tsm/{name}_share_by_score/{bucket}"][3] == pytest.approx(
                share[bucket])


def test_the_edges_are_recorded_in_the_run_log(scored_store, tmp_path):
    fit(scored_store, tmp_path, 1, quality=QUALITY)
    [event] = events(tmp_path, "score_buckets")
    assert event["score"] == "quality" and event["buckets"] == 4
    assert event["edges"] == expected_edges().tolist()
    assert event["documents"] == 2 * DOCS and event["source"] == "training documents"
    assert event["range"] == [0.0, float(train_scores(1).max())]


def test_a_resume_keeps_the_edges_and_the_unfinished_interval(scored_store, tmp_path,
                                                              monkeypatch):
    fit(scored_store, tmp_path / "whole", 6, quality=QUALITY)
    fit(scored_store, tmp_path / "first", 4, quality=QUALITY, checkpoint_every=4)
    [checkpoint] = (tmp_path / "first" / "ckpt").glob("*step=4.ckpt")
    # were the edges recomputed on resume, they would be these
    monkeypatch.setattr(DomainDataModule, "score_quantiles",
                        lambda self, q: ("quality", [0.0, 0.1, 0.2, 0.3, 1.0], 2))
    resumed = fit(scored_store, tmp_path / "second", 6, quality=QUALITY, resume=str(checkpoint))
    [event] = events(tmp_path / "second", "score_buckets")
    assert event["edges"] == expected_edges().tolist() and event["source"] == "checkpoint"
    assert resumed._score_buckets.edges == expected_edges().tolist()
    # the interval 4..6 straddles the checkpoint: its step-4 part came back with it
    whole, second = logged(tmp_path / "whole"), logged(tmp_path / "second")
    by_score = sorted(k for k in whole if "train_" in k and "_by_score/" in k)
    assert by_score and by_score == sorted(k for k in second if "_by_score/" in k
                                           and "train_" in k)
    for key in by_score:
        assert second[key][6] == pytest.approx(whole[key][6], rel=1e-6)


def test_a_score_on_an_edge_belongs_to_the_bucket_above_and_nan_to_none():
    buckets = ScoreBuckets(None, [0.25, 0.5, 0.75])
    buckets.edges = buckets.given
    buckets._inner = torch.tensor(buckets.edges)
    scores = torch.tensor([0.0, 0.25, 0.4999, 0.5, 0.75, 2.0, float("nan")])
    assert buckets.bucket_of(scores).tolist() == [0, 1, 1, 2, 3, 3, 4]


def test_a_run_without_scores_logs_no_score_buckets_and_says_nothing(scored_store, tmp_path,
                                                                      recwarn):
    monitor = fit(scored_store, tmp_path, 3)
    assert not any("by_score" in key for key in logged(tmp_path))
    assert events(tmp_path, "score_buckets") == []
    assert "score_buckets" not in monitor.state_dict()
    found = [str(w.message) for w in recwarn  # the monitor's own lines, not the store's path
             if "'score'" in str(w.message) or "bucket" in str(w.message)]
    assert not found, found


def test_edges_given_without_scores_in_batches_warn_once(scored_store, tmp_path):
    with pytest.warns(UserWarning, match="carry no 'score'") as caught:
        fit(scored_store, tmp_path, 3, score_edges=[0.5])
    assert len([w for w in caught if "carry no 'score'" in str(w.message)]) == 1
    assert not any("by_score" in key for key in logged(tmp_path))


def test_given_edges_make_len_plus_one_buckets(scored_store, tmp_path):
    recorder = Recorder()
    fit(scored_store, tmp_path, 3, quality=QUALITY, callbacks=(recorder,), score_edges=[0.5])
    losses = np.concatenate([r[1] for r in recorder.train])
    scores = np.concatenate([r[2] for r in recorder.train])
    loss, _ = by_bucket(losses, np.ones_like(losses), scores, np.array([0.5]))
    series = logged(tmp_path)
    assert {k for k in series if k.startswith("tsm/train_loss_by_score/")} == {
        f"tsm/train_loss_by_score/{k}" for k in loss}
    for name, value in loss.items():
        assert series[f"tsm/train_loss_by_score/{name}"][3] == pytest.approx(value, rel=1e-6)


@pytest.mark.parametrize("args", [{"score_buckets": 1}, {"score_edges": [0.5, 0.5]},
                                  {"score_edges": []}, {"score_edges": [float("nan")]}])
def test_bad_bucket_options_are_one_line_naming_the_value(args):
    with pytest.raises(ValueError, match="score_"):
        TrainingStateMonitor(**args)


def test_the_report_tables_the_last_loss_per_score_bucket(scored_store, tmp_path):
    from lightning_aquila.tracking.report import render_html
    from lightning_aquila.tracking.run_record import load_run

    fit(scored_store, tmp_path, 3, quality=QUALITY)
    page = render_html(load_run(tmp_path), b"")
    series = logged(tmp_path)
    assert "<h2>Loss by score bucket (quality, last values)</h2>" in page
    edges = expected_edges()
    assert f"<td>q1</td><td>[0, {edges[0]:.4g})</td>" in page
    assert f"<td>q4</td><td>[{edges[2]:.4g}, {float(train_scores(1).max()):.4g}]</td>" in page
    assert f"<td>{series['tsm/test_loss_by_score/q1'][3]:.4g}</td>" in page


def test_a_report_of_a_run_without_scores_has_no_score_table(scored_store, tmp_path):
    from lightning_aquila.tracking.report import render_html
    from lightning_aquila.tracking.run_record import load_run

    fit(scored_store, tmp_path, 1)
    assert "score bucket" not in render_html(load_run(tmp_path), b"")
