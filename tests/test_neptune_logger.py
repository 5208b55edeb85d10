"""NeptuneLogger on the real neptune 1.x client in offline mode: what a short fit writes to
the client's on-disk operation queue (``<data dir>/offline/run__*/data-*.log``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_project import BagOfTokensLM, jsonl
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.loggers import NeptuneLogger
from lightning_aquila.loggers.neptune import resolve_mode

SENTINEL_TOKEN = "sentinel-token-4f2a9c"  # a fake, to prove it is never written


class Windows(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        window = (torch.arange(9) * (i % 2 + 1) + i) % 32
        return {"input_ids": window[:-1], "labels": window[1:], "domain": torch.tensor(i % 2)}


class SmallLM(BagOfTokensLM):
    """The test project's smallest module, with hyper-parameters to log (one a secret)."""

    def __init__(self, lr: float = 0.1, api_token: str = "", note: str = "") -> None:
        super().__init__(vocab=32, lr=lr)
        self.save_hyperparameters()


def offline_operations(data_dir: Path) -> list[dict]:
    """The operations the client queued for the (single) offline run, in order."""
    [run_dir] = (data_dir / "offline").iterdir()
    operations = []
    for log in sorted(run_dir.glob("data-*.log"), key=lambda p: int(p.stem.split("-")[1])):
        operations += [json.loads(line)["obj"] for line in log.read_text().splitlines() if line]
    return operations


def field(operations: list[dict], path: str) -> list[dict]:
    return [op for op in operations if "/".join(op["path"]) == path]


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("NEPTUNE_API_TOKEN", SENTINEL_TOKEN)
    monkeypatch.delenv("NEPTUNE_PROJECT", raising=False)
    monkeypatch.delenv("NEPTUNE_DATA_DIRECTORY", raising=False)
    monkeypatch.delenv("NEPTUNE_MODE", raising=False)
    return tmp_path


def test_mode_is_online_only_with_both_a_token_and_a_project(monkeypatch):
    monkeypatch.setenv("NEPTUNE_API_TOKEN", SENTINEL_TOKEN)
    assert resolve_mode(None, "team/aquila") == "async"
    assert resolve_mode(None, None) == "offline"
    assert resolve_mode("debug", "team/aquila") == "debug"
    monkeypatch.delenv("NEPTUNE_API_TOKEN")
    assert resolve_mode(None, "team/aquila") == "offline"


def test_a_short_fit_writes_metrics_hyperparameters_checkpoints_and_files_offline(offline_env):
    tmp_path = offline_env
    data_dir = tmp_path / "neptune-data"
    logger = NeptuneLogger(name="offline-test", tags=["test"], data_directory=str(data_dir))
    assert logger.mode == "offline"
    monitor = TrainingStateMonitor(domains=["even", "odd"], train_loss_every_n_steps=2,
                                   grad_norm_every_n_steps=2, lr_every_n_steps=2,
                                   throughput_every_n_steps=2, weight_stats_every_n_steps=2,
                                   report_on_fit_end=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = Trainer(accelerator="cpu", max_steps=6, logger=logger,
                      callbacks=[monitor, checkpoint], default_root_dir=tmp_path,
                      enable_progress_bar=False, enable_model_summary=False)
    model = SmallLM(api_token=SENTINEL_TOKEN, note=f"url?token={SENTINEL_TOKEN}")
    trainer.fit(model, DataLoader(Windows(), batch_size=4))
    notes = tmp_path / "notes.txt"
    notes.write_text("a file of the user's")
    assert logger.log_file(notes) == "files/notes_txt"
    logger.run.stop()

    operations = offline_operations(data_dir)
    # metrics: the same series, steps and values the monitor wrote to its own run file
    rows = jsonl(tmp_path / "tsm" / "metrics.jsonl")
    for domain in ("even", "odd"):
        expected = {r["step"]: r[f"tsm/train_loss/{domain}"] for r in rows}
        logged = {v["step"]: v["value"]
                  for op in field(operations, f"tsm/train_loss/{domain}") for v in op["values"]}
        assert logged == pytest.approx(expected) and sorted(logged) == [2, 4, 6]
    for name in ("tsm/grad_norm", "tsm/lr", "tsm/tokens_per_sec", "tsm/weights/head/norm"):
        assert len(field(operations, name)) == 3, name
    # hyperparameters, with the secret redacted both by name and by value
    assert field(operations, "parameters/lr")[0]["value"] == 0.1
    assert field(operations, "parameters/api_token")[0]["value"] == "<redacted>"
    assert field(operations, "parameters/note")[0]["value"] == "url?token=<redacted>"
    # checkpoint paths, every one saved, and the run's status
    saved = [v["value"] for op in field(operations, "checkpoints/saved") for v in op["values"]]
    assert sorted(Path(p).name for p in saved) == ["epoch=0-step=3.ckpt", "epoch=0-step=6.ckpt"]
    assert field(operations, "lightning/status")[-1]["value"] == "success"
    # files, copied into the run's upload folder so the offline run is self-contained: the
    # run report the monitor wrote at the end of fit, and any other
    uploads = next((data_dir / "offline").iterdir()) / "upload_path"
    [page] = field(operations, "report/html")
    assert (uploads / page["tmp_file_name"]).read_bytes() == (tmp_path / "report.html").read_bytes()
    [figure] = field(operations, "report/figure")
    assert (uploads / figure["tmp_file_name"]).read_bytes()[:4] == b"\x89PNG"
    [upload] = field(operations, "files/notes_txt")
    assert (uploads / upload["tmp_file_name"]).read_text() == "a file of the user's"
    # the token is nowhere in what the logger or the monitor wrote (the checkpoints hold the
    # module's own hyperparameters, token included: that is the module's doing, not ours)
    written = [p for p in [*data_dir.rglob("*"), *(tmp_path / "tsm").rglob("*")] if p.is_file()]
    assert len(written) >= 5
    for path in written:
        assert SENTINEL_TOKEN.encode() not in path.read_bytes(), path


def test_local_folders_follow_lightning_conventions(offline_env):
    data = str(offline_env / "neptune-data")
    logger = NeptuneLogger(name="aquila", custom_run_id="run-7", data_directory=data)
    assert (logger.name, logger.version, logger.save_dir) == ("aquila", "run-7", data)
    logger = NeptuneLogger(data_directory=data, save_dir="runs/quickstart")
    assert logger.save_dir == "runs/quickstart"


def test_a_metric_name_that_clashes_in_neptune_is_skipped_with_a_warning(offline_env):
    data_dir = offline_env / "neptune-data"
    logger = NeptuneLogger(data_directory=str(data_dir))
    logger.log_metrics({"val/loss/code": 2.0, "val/loss/web": 3.0}, step=1)
    with pytest.warns(UserWarning, match="'val/loss' is not logged"):
        logger.log_metrics({"val/loss": 2.5}, step=1)
    with pytest.warns(UserWarning, match="'val/loss/web/x' is not logged"):
        logger.log_metrics({"val/loss/web/x": 1.0}, step=1)
    logger.log_metrics({"val/loss/code": 1.5}, step=2)
    logger.run.stop()
    operations = offline_operations(data_dir)
    assert [v["value"] for op in field(operations, "val/loss/code") for v in op["values"]] == [
        2.0, 1.5]
    assert field(operations, "val/loss") == []
