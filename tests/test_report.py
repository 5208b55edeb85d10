"""The run report, from the files a real short run writes: the PNG, the self-contained HTML
page, and the reader's handling of torn lines, resumes and rollbacks."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.report import load_run, main, read_jsonl, write_report

DOMAINS = ["code", "web", "zh"]


class Windows(Dataset):
    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed = n, seed

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        domain = i % 3
        g = torch.Generator().manual_seed(self.seed * 7919 + i)
        window = (torch.randint(0, 20, (13,), generator=g) + 20 * domain) % 64
        return {"input_ids": window[:-1], "labels": window[1:], "domain": torch.tensor(domain)}


class Data(LightningDataModule):
    def __init__(self):
        super().__init__()
        self.mixture = DomainMixture(DOMAINS, {"code": 1, "web": 1, "zh": 1})

    def train_dataloader(self):
        return DataLoader(Windows(2000), batch_size=6)

    def val_dataloader(self):
        return DataLoader(Windows(12, seed=1), batch_size=6)


class SmallLM(LightningModule):
    def __init__(self, spike_at: int | None = None):
        super().__init__()
        self.spike_at = spike_at
        self.embed = nn.Embedding(64, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.head = nn.Linear(16, 64)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        per_token = F.cross_entropy(self(batch["input_ids"]).flatten(0, 1),
                                    batch["labels"].flatten(), reduction="none")
        sample = per_token.view_as(batch["labels"]).mean(1)
        if batch_idx == self.spike_at:
            sample = sample * 8
        return {"loss": sample.mean(), "sample_loss": sample.detach()}

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class Schedule(Callback):
    """What the ATE would do: name stages and change the mixture."""

    def __init__(self, monitor):
        self.monitor = monitor

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 12:
            self.monitor.record_event("stage", name="K2")
            trainer.datamodule.mixture.set_weights({"code": 0.6, "web": 0.2, "zh": 0.2},
                                                   reason="stage K2", step=12)


def monitor_for_tests(**kwargs) -> TrainingStateMonitor:
    every = {f"{name}_every_n_steps": 2 for name in (
        "train_loss", "grad_norm", "lr", "throughput", "mixture")}
    return TrainingStateMonitor(weight_stats_every_n_steps=4, spike_window=10,
                                spike_min_history=6, flops_per_token=1e4, **every, **kwargs)


def fit(root: Path, max_steps: int, callbacks=(), ckpt_path=None, spike_at=None):
    torch.manual_seed(0)
    monitor = monitor_for_tests()
    trainer = Trainer(accelerator="cpu", max_steps=max_steps, default_root_dir=root,
                      callbacks=[monitor, Schedule(monitor), *callbacks], val_check_interval=8,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, enable_checkpointing=bool(callbacks))
    trainer.fit(SmallLM(spike_at=spike_at), Data(), ckpt_path=ckpt_path)
    return monitor


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("run")
    monitor = fit(root, max_steps=24, spike_at=18)
    assert [a.kind for a in monitor.state.anomalies] == ["spike"]
    return root


def test_report_writes_a_png_and_a_self_contained_html_page(run_dir, tmp_path):
    png_path, html_path = write_report(run_dir, output_dir=tmp_path)
    png = png_path.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(png_path).shape
    assert (width, height) == (1500, 2400)

    page = html_path.read_text(encoding="utf-8")
    embedded = re.search(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page).group(1)
    assert base64.b64decode(embedded) == png  # the figure is in the page itself
    assert not re.search(r"""(src|href)=["'](?!data:)""", page)  # nothing to fetch
    assert "<script" not in page and "<link" not in page
    for domain in DOMAINS:
        assert f"<td>{domain}</td>" in page
    assert "<td>stage</td>" in page and "&quot;name&quot;: &quot;K2&quot;" in page
    assert "<td>anomaly</td><td>spike</td>" in page


def test_report_reads_the_series_the_monitor_wrote(run_dir):
    record = load_run(run_dir)
    steps, values = record.series("tsm/train_loss/code")
    assert steps == list(range(2, 25, 2)) and all(v > 0 for v in values)
    assert record.series("tsm/val_loss_avg")[0] == [8, 16, 24]
    assert record.series("tsm/mixture/code")[1][-1] == pytest.approx(0.6)
    assert [e["name"] for e in record.of_kind("stage")] == ["K2"]
    [spike] = record.of_kind("anomaly")
    assert (spike["type"], spike["step"]) == ("spike", 19)
    assert record.domains() == DOMAINS


def test_metric_names_never_nest_so_every_logger_can_hold_them(run_dir):
    # Neptune cannot hold a value at "a/b" and a namespace "a/b/c" at once
    names = {key for row in read_jsonl(run_dir / "tsm" / "metrics.jsonl") for key in row
             if key.startswith("tsm/")}
    assert len(names) > 40
    nested = [(a, b) for a in names for b in names if b.startswith(a + "/")]
    assert nested == []


def test_a_torn_last_line_is_skipped(run_dir, tmp_path):
    copy = tmp_path / "run"
    (copy / "tsm").mkdir(parents=True)
    for name in ("metrics.jsonl", "events.jsonl"):
        text = (run_dir / "tsm" / name).read_text()
        (copy / "tsm" / name).write_text(text + text.splitlines()[-1][:25])  # killed mid-write
    assert load_run(copy).rows == load_run(run_dir).rows
    assert load_run(copy).events == load_run(run_dir).events
    assert all(path.exists() for path in write_report(copy))


def test_a_resumed_run_keeps_only_the_replayed_steps_of_the_second_session(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10,
                                 save_top_k=-1)
    fit(tmp_path, max_steps=14, callbacks=[checkpoint])  # "crashes" after step 14
    fit(tmp_path, max_steps=16, callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
        ckpt_path=tmp_path / "ckpt" / "epoch=0-step=10.ckpt")
    rows = read_jsonl(tmp_path / "tsm" / "metrics.jsonl")
    second_session = [r for r in rows if r["time"] > [
        e for e in read_jsonl(tmp_path / "tsm" / "events.jsonl")
        if e["kind"] == "session_start"][1]["time"]]
    record = load_run(tmp_path)
    steps = record.series("tsm/train_loss/web")[0]
    assert steps == [2, 4, 6, 8, 10, 12, 14, 16]
    replayed = {r["step"]: r["tsm/train_loss/web"] for r in second_session
                if "tsm/train_loss/web" in r}
    assert sorted(replayed) == [12, 14, 16]
    assert dict(zip(*record.series("tsm/train_loss/web"))).items() >= replayed.items()
    # the stage event of step 12 was replayed too: it is in the report once
    assert [e["step"] for e in record.of_kind("stage")] == [12]


def test_a_rollback_drops_the_metrics_of_the_undone_steps(tmp_path):
    class Rollback(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 8:
                monitor.record_event("rollback", to_step=4)

    torch.manual_seed(0)
    monitor = monitor_for_tests()
    Trainer(accelerator="cpu", max_steps=10, default_root_dir=tmp_path, logger=False,
            callbacks=[monitor, Rollback()], limit_val_batches=0, enable_progress_bar=False,
            enable_model_summary=False, enable_checkpointing=False).fit(SmallLM(), Data())
    record = load_run(tmp_path)
    assert record.series("tsm/loss")[0] == [2, 4, 10]
    assert [e["to_step"] for e in record.of_kind("rollback")] == [4]


def test_command_line_prints_the_paths_and_names_a_missing_run(run_dir, tmp_path, capsys):
    assert main([str(run_dir), "--output-dir", str(tmp_path)]) == 0
    assert str(tmp_path / "report.html") in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere")]) == 1
    assert "no TSM run files under" in capsys.readouterr().err
