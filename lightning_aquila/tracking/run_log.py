"""The run log: the one writer of a run's files (``run_files.py`` has their format), shared by
the callbacks.

The ``TrainingStateMonitor`` owns it (``monitor.run_log``) and opens it at setup; the
``AdaptiveTrainingEngine`` finds it there once and writes through it, so the two callbacks
never call each other's methods. A callback that must act on an event (the monitor starts a
stage's weight reference on ``stage`` and forgets an unread check on ``rollback``) listens to
the log instead. Only global rank 0 writes the files; events recorded before the files open
(a stage named before training) wait for them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_aquila.tracking.run_files import encode, events_path, metrics_path

Event = dict[str, Any]


def resolve_run_dir(trainer: Trainer, run_dir: str | None) -> Path:
    """``run_dir``, else the first logger's own version folder when it has one (CSV and
    TensorBoard: ``trainer.log_dir``), else ``trainer.default_root_dir``. (Other loggers'
    ``save_dir``, e.g. MLflow's tracking folder, is shared by many runs.)"""
    if run_dir is not None:
        return Path(run_dir)
    if trainer.loggers and isinstance(trainer.loggers[0], (CSVLogger, TensorBoardLogger)):
        return Path(trainer.log_dir)  # every rank calls this: it broadcasts rank 0's
    return Path(trainer.default_root_dir)


class RunLog:
    """A run's events and metrics. Metrics go to every logger attached to the trainer and to
    ``tsm/metrics.jsonl``; events go to ``tsm/events.jsonl`` and to the listeners. Call both
    on every rank (only global rank 0 writes; listeners run on every rank)."""

    def __init__(self) -> None:
        self._metrics: IO[str] | None = None
        self._events: IO[str] | None = None
        self._waiting: list[Event] | None = []  # events before open; None after
        self._listeners: list[Callable[[Event], None]] = []

    def open(self, run_dir: Path, write: bool) -> None:
        """Opens the files under ``run_dir/tsm`` when ``write`` (and they are not open yet)
        and writes the events recorded so far; without ``write`` those are dropped."""
        if write and self._metrics is None:
            self._metrics = _append(metrics_path(run_dir))
            self._events = _append(events_path(run_dir))
            for event in self._waiting or []:
                _write(self._events, event)
        self._waiting = None

    def close(self) -> None:
        for file in (self._metrics, self._events):
            if file is not None:
                file.close()
        self._metrics = self._events = None

    def add_listener(self, listener: Callable[[Event], None]) -> None:
        """Run ``listener(event)`` after every event."""
        self._listeners.append(listener)

    def event(self, kind: str, step: int, **fields: Any) -> Event:
        """Record an event of ``kind`` at ``step`` and return it."""
        event = {"kind": kind, "step": int(step), "time": time.time(), **fields}
        if self._events is not None:
            _write(self._events, event)
        elif self._waiting is not None:  # not open yet: written when the files open
            self._waiting.append(event)
        for listener in self._listeners:
            listener(event)
        return event

    def log_metrics(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """Log ``metrics`` at ``step``: to ``trainer.callback_metrics`` (every rank), to every
        logger and to the metrics file (global rank 0)."""
        if not metrics:
            return
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self._metrics is not None:
            _write(self._metrics, {"step": step, "time": time.time(), **metrics})


def _append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")


def _write(file: IO[str], record: Event) -> None:
    """One whole line, flushed: readers (and a crash) see whole lines only, except possibly a
    torn last one."""
    file.write(encode(record) + "\n")
    file.flush()


__all__ = ["RunLog", "resolve_run_dir"]
