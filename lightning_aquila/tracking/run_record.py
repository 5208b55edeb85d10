"""Reading a run back: its two files (``run_files.py``) as one :class:`RunRecord`, for the
report (``report.py``), ``report --compare`` (``compare.py``) and scripts.

Reading is crash-tolerant: a torn line (a run killed mid-write) is skipped. The timeline is
cleaned the way training went: a ``session_start`` at step S (a resume) drops what the
previous session recorded after S (it was replayed).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from lightning_aquila.tracking.run_files import (
    EVENTS_FILE,
    METRICS_FILE,
    RUN_FILES_DIR,
    metrics_path,
    read_jsonl,
)


def find_tsm_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/tsm``, or the most recently written ``tsm`` folder below ``run_dir`` (a
    logger may have put the run in ``lightning_logs/version_N``)."""
    run_dir = Path(run_dir)
    if metrics_path(run_dir).exists():
        return run_dir / RUN_FILES_DIR
    if run_dir.name == RUN_FILES_DIR and (run_dir / METRICS_FILE).exists():
        return run_dir
    found = sorted(run_dir.glob(f"**/{RUN_FILES_DIR}/{METRICS_FILE}"),
                   key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no TSM run files under {run_dir} (looked for "
                                f"{RUN_FILES_DIR}/{METRICS_FILE}); was TrainingStateMonitor in "
                                "the run?")
    return found[-1].parent


@dataclass
class RunRecord:
    """A run's metric rows and events after the timeline clean-up."""

    tsm_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def series(self, name: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric; a step logged twice keeps its last value."""
        points: dict[int, float] = {}
        for row in self.rows:
            if name in row:
                value = row[name]
                points[int(row["step"])] = float("nan") if value is None else float(value)
        steps = sorted(points)
        return steps, [points[s] for s in steps]

    def names(self, prefix: str, suffix: str = "") -> list[str]:
        """The ``<x>`` of every metric named ``<prefix><x><suffix>``, first-seen order."""
        found: dict[str, None] = {}
        for row in self.rows:
            for key in row:
                if key.startswith(prefix) and key.endswith(suffix) and len(key) > len(prefix) + len(
                        suffix):
                    found[key[len(prefix) : len(key) - len(suffix)]] = None
        return list(found)

    def last(self, name: str) -> float | None:
        values = self.series(name)[1]
        return values[-1] if values else None

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("kind") == kind]

    def mixture_history(self) -> list[tuple[float, dict[str, float]]]:
        """``(step, weights)`` for each mixture the sampler used, from the mixture history:
        the newest ``session_start``'s (restored with the checkpoint) plus the changes
        recorded after it. A change applies from a global batch index; ``batch_index /
        batches_per_step`` is the optimizer step whose batches first use it."""
        starts = self.of_kind("session_start")
        changes: list[dict[str, Any]] = []
        since = -math.inf
        if starts:
            changes = list(starts[-1].get("mixture_history") or [])
            since = starts[-1].get("time", -math.inf)
        changes += [e for e in self.of_kind("mixture") if e.get("time", 0.0) > since]
        per_step = float(starts[-1].get("batches_per_step") or 1) if starts else 1.0
        by_batch = {int(c["batch_index"]): c["weights"] for c in changes
                    if c.get("batch_index") is not None and c.get("weights")}
        return [(batch / per_step, {k: float(v) for k, v in weights.items()})
                for batch, weights in sorted(by_batch.items())]

    def tokens_at(self, steps: Sequence[int]) -> list[float | None]:
        """Training tokens seen (``tsm/tokens_total``) at each step, linear between the
        steps that logged it (0 tokens at step 0) and, after the last one, at the last
        interval's tokens per step (a run's final evaluation may fall between two of the
        monitor's token counts; the tokens per step do not change within a run); ``None``
        before step 0 or when no count was logged."""
        known = dict(zip(*finite_points(*self.series("tsm/tokens_total"))))
        known.setdefault(0, 0.0)
        points = sorted(known.items())
        result: list[float | None] = []
        for step in steps:
            value = None
            for (s0, t0), (s1, t1) in pairwise(points):
                if s0 <= step <= s1:
                    value = t0 + (t1 - t0) * (step - s0) / (s1 - s0)
                    break
            if value is None and len(points) > 1 and step > points[-1][0]:
                (s0, t0), (s1, t1) = points[-2:]
                value = t1 + (t1 - t0) / (s1 - s0) * (step - s1)
            result.append(known.get(step, value))
        return result

    def report_part(self) -> str:
        """The held-out part reports judge the run by: ``"test"`` when the run logged it
        (``tsm/test_loss/<domain>``), else ``"val"`` (runs from before the dev/test split, or
        with ``test_windows_per_domain=0``, where the dev loss is all there is)."""
        return "test" if self.names("tsm/test_loss/") else "val"

    def domains(self) -> list[str]:
        for event in reversed(self.of_kind("session_start")):
            if event.get("domains"):
                return list(event["domains"])
        names = self.names("tsm/train_loss/") + self.names("tsm/val_loss/")
        names += self.names("tsm/mixture/")
        return list(dict.fromkeys(n for n in names if "/" not in n))


def load_run(run_dir: str | os.PathLike[str]) -> RunRecord:
    tsm_dir = find_tsm_dir(run_dir)
    rows = read_jsonl(tsm_dir / METRICS_FILE)
    events = read_jsonl(tsm_dir / EVENTS_FILE)
    timeline = sorted([(r.get("time", 0.0), 0, r) for r in rows if "step" in r]
                      + [(e.get("time", 0.0), 1, e) for e in events if "step" in e],
                      key=lambda item: (item[0], item[1]))
    kept_rows: list[dict[str, Any]] = []
    kept_events: list[dict[str, Any]] = []
    for _, is_event, record in timeline:
        kind = record.get("kind") if is_event else None
        if kind == "session_start":
            start = int(record["step"])
            kept_rows = [r for r in kept_rows if r["step"] <= start]
            kept_events = [e for e in kept_events if e["step"] <= start]
        (kept_events if is_event else kept_rows).append(record)
    return RunRecord(tsm_dir, kept_rows, kept_events)


def finite_points(steps: list[int], values: list[float]) -> tuple[list[int], list[float]]:
    """The points whose value is finite (a logged NaN or inf is a gap)."""
    pairs = [(s, v) for s, v in zip(steps, values) if math.isfinite(v)]
    return [s for s, _ in pairs], [v for _, v in pairs]


__all__ = ["RunRecord", "find_tsm_dir", "finite_points", "load_run"]
