"""The run files: ``tsm/metrics.jsonl`` (one JSON object per emission: ``step``, ``time`` and
metric values) and ``tsm/events.jsonl`` (anomalies, stages, mixture changes, sessions, and
what other callbacks pass to ``record_event``) under the run directory, written by global
rank 0 only. Both are appended a whole line at a time and flushed, so a process killed
mid-write leaves at most a torn last line, which the report's reader skips. Events recorded
before the files open (a stage named before training) wait for them. The format is
documented in ``docs/monitor.md``; ``lightning_aquila.run_record`` reads them back."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

#: Version of the run-file format written under ``<run_dir>/tsm/``.
RUN_FILES_FORMAT = 1


def resolve_run_dir(trainer: Trainer, run_dir: str | None) -> Path:
    """``run_dir``, else the first logger's own version folder when it has one (CSV and
    TensorBoard: ``trainer.log_dir``), else ``trainer.default_root_dir``. (Other loggers'
    ``save_dir``, e.g. MLflow's tracking folder, is shared by many runs.)"""
    if run_dir is not None:
        return Path(run_dir)
    if trainer.loggers and isinstance(trainer.loggers[0], (CSVLogger, TensorBoardLogger)):
        return Path(trainer.log_dir)  # every rank calls this: it broadcasts rank 0's
    return Path(trainer.default_root_dir)


class RunFiles:
    """The two files of one run; ``open`` them on every rank (only rank 0 writes)."""

    def __init__(self) -> None:
        self.metrics: JsonlAppender | None = None
        self.events: JsonlAppender | None = None
        self._waiting: list[dict[str, Any]] | None = []  # events before open; None after

    def open(self, run_dir: Path, write: bool) -> None:
        """Opens the files under ``run_dir/tsm`` when ``write`` (and they are not open yet)
        and writes the events recorded so far; without ``write`` those are dropped."""
        if write and self.metrics is None:
            self.metrics = JsonlAppender(run_dir / "tsm" / "metrics.jsonl")
            self.events = JsonlAppender(run_dir / "tsm" / "events.jsonl")
            for event in self._waiting or []:
                self.events.write(event)
        self._waiting = None

    def write_metrics(self, row: dict[str, Any]) -> None:
        if self.metrics is not None:
            self.metrics.write(row)

    def write_event(self, event: dict[str, Any]) -> None:
        if self.events is not None:
            self.events.write(event)
        elif self._waiting is not None:  # not set up yet: written when the files open
            self._waiting.append(event)

    def close(self) -> None:
        for appender in (self.metrics, self.events):
            if appender is not None:
                appender.close()
        self.metrics = self.events = None


def change_dict(change: Any) -> dict[str, Any]:
    """A mixture change (``MixtureChange`` or any object with those attributes) as an event's
    fields."""
    return {key: getattr(change, key) for key in ("batch_index", "weights", "reason", "step",
                                                  "extra") if hasattr(change, key)}


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null, tensors and tuples plain values."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class JsonlAppender:
    """Appends one JSON object per line and flushes it, so readers (and a crash) see whole
    lines only, except possibly a torn last one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held for the run)

    def write(self, record: dict[str, Any]) -> None:
        if self._file.closed:
            return
        self._file.write(json.dumps(_jsonable(record), ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


__all__ = ["RUN_FILES_FORMAT", "JsonlAppender", "RunFiles", "change_dict", "resolve_run_dir"]
