"""The run log: the one writer of a run's files (``run_files.py`` has their format), shared by
the callbacks.

The ``TrainingStateMonitor`` owns it (``monitor.run_log``) and opens it at setup; the
``AdaptiveTrainingEngine`` finds it there once and writes through it, so the two callbacks
never call each other's methods. A callback that must act on an event (the monitor starts a
stage's weight reference on ``stage`` and forgets an unread check on ``rollback``) listens to
the log instead. Only global rank 0 writes the files; events recorded before the files open
(a stage named before training) wait for them.

A run directory on object storage (``s3://bucket/run``) cannot be appended to, so the files
are written in a local copy of it (``object_store.local_copy``: under ``~/.cache``) and
uploaded whole, one PUT each, by ``sync``: at every checkpoint (the monitor calls it) and
when the log closes (fit end, an exception). ``sync`` sends only the files that changed since
they were last sent: a checkpoint event that writes two files (``save_last``) calls it twice,
and the end of a fit once for the report and once as the log closes, yet each file goes up
once. A resume first downloads them into the local copy, which they replace, and appends
there. A kill loses at most what was logged since the last checkpoint, which the resumed run
logs again.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_aquila import object_store
from lightning_aquila.tracking.run_files import encode, events_path, metrics_path

Event = dict[str, Any]


def resolve_run_dir(trainer: Trainer, run_dir: str | None) -> Path | str:
    """``run_dir``, else the first logger's own version folder when it has one (CSV and
    TensorBoard: ``trainer.log_dir``), else ``trainer.default_root_dir``. (Other loggers'
    ``save_dir``, e.g. MLflow's tracking folder, is shared by many runs.) A URL stays a
    string."""
    if run_dir is None:
        if trainer.loggers and isinstance(trainer.loggers[0], (CSVLogger, TensorBoardLogger)):
            run_dir = trainer.log_dir  # every rank calls this: it broadcasts rank 0's
        else:
            run_dir = trainer.default_root_dir
    return str(run_dir) if object_store.is_remote(run_dir) else Path(run_dir)


class RunLog:
    """A run's events and metrics. Metrics go to every logger attached to the trainer and to
    ``tsm/metrics.jsonl``; events go to ``tsm/events.jsonl`` and to the listeners. Call both
    on every rank (only global rank 0 writes; listeners run on every rank)."""

    def __init__(self) -> None:
        self._metrics: IO[str] | None = None
        self._events: IO[str] | None = None
        self._waiting: list[Event] | None = []  # events before open; None after
        self._listeners: list[Callable[[Event], None]] = []
        #: for a run directory on object storage: its URL and the local copy written to
        self.remote: str | None = None
        self.local_dir: Path | None = None
        #: each local file as it was when last uploaded: (size, mtime_ns, inode)
        self._uploaded: dict[Path, tuple[int, int, int]] = {}

    def open(self, run_dir: Path | str, write: bool) -> None:
        """Opens the files under ``run_dir/tsm`` when ``write`` (and they are not open yet)
        and writes the events recorded so far; without ``write`` those are dropped."""
        if write and self._metrics is None:
            if object_store.is_remote(run_dir):
                self.remote, self.local_dir = str(run_dir), object_store.local_copy(run_dir)
                self._uploaded = {}
                for path in (metrics_path(self.local_dir), events_path(self.local_dir)):
                    _download(self._url(path), path)
            else:
                self.local_dir = Path(run_dir)
            self._metrics = _append(metrics_path(self.local_dir))
            self._events = _append(events_path(self.local_dir))
            for event in self._waiting or []:
                _write(self._events, event)
        self._waiting = None

    def sync(self, *extra: Path) -> None:
        """Upload the files (and ``extra`` files of the local copy) to a run directory on
        object storage, each in one PUT, those that changed since their last upload; nothing
        for a local one."""
        if self.remote is None or self._metrics is None:
            return
        for path in (metrics_path(self.local_dir), events_path(self.local_dir), *extra):
            stat = path.stat()
            state = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
            if self._uploaded.get(path) == state:
                continue
            fs, key = object_store.filesystem(self._url(path))
            fs.put_file(str(path), key)
            self._uploaded[path] = state

    def _url(self, local: Path) -> str:
        return object_store.join(self.remote, *local.relative_to(self.local_dir).parts)

    def close(self) -> None:
        if self._metrics is not None:
            try:
                self.sync()
            except Exception as error:  # closing after an exception must not hide that one
                warnings.warn(f"could not upload the run files to {self.remote}: {error!r}",
                              stacklevel=2)
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


def _download(url: str, path: Path) -> None:
    """``path`` becomes the object ``url``, or empty when there is none."""
    fs, key = object_store.filesystem(url)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        data = fs.cat_file(key)
    except FileNotFoundError:
        data = b""
    path.write_bytes(data)


def _append(path: Path) -> IO[str]:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")


def _write(file: IO[str], record: Event) -> None:
    """One whole line, flushed: readers (and a crash) see whole lines only, except possibly a
    torn last one."""
    file.write(encode(record) + "\n")
    file.flush()


__all__ = ["RunLog", "resolve_run_dir"]
