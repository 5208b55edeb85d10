"""The run-file format: where a run's two files are and what one line of them holds.

``<run_dir>/tsm/metrics.jsonl`` holds one JSON object per emission (``step``, ``time`` and
metric values), ``<run_dir>/tsm/events.jsonl`` one per event (``kind``, ``step``, ``time`` and
the event's fields). Lines are strict JSON (a non-finite number is ``null``), appended whole
and flushed, so a process killed mid-write leaves at most a torn last line, which
:func:`read_jsonl` skips. ``run_log.py`` writes them, ``run_record.py`` reads a run back; the
format is documented in ``docs/monitor.md``. Nothing here imports torch or Lightning.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

#: Version of the run-file format (and of the monitor's checkpoint state).
RUN_FILES_FORMAT = 1
#: The folder under the run directory that holds the two files.
RUN_FILES_DIR = "tsm"
METRICS_FILE = "metrics.jsonl"
EVENTS_FILE = "events.jsonl"


def metrics_path(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/tsm/metrics.jsonl``."""
    return Path(run_dir) / RUN_FILES_DIR / METRICS_FILE


def events_path(run_dir: str | os.PathLike[str]) -> Path:
    """``<run_dir>/tsm/events.jsonl``."""
    return Path(run_dir) / RUN_FILES_DIR / EVENTS_FILE


def jsonable(value: Any) -> Any:
    """``value`` as strict JSON: non-finite floats become null, tensors and numpy values plain
    numbers or lists, tuples lists, dataclasses dicts, anything else its ``str``."""
    if hasattr(value, "numel") and hasattr(value, "item"):  # a tensor (torch not imported)
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy
        value = value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return jsonable(asdict(value))
    return str(value)


def encode(record: Mapping[str, Any]) -> str:
    """One line of a run file (without the newline)."""
    return json.dumps(jsonable(record), ensure_ascii=False, allow_nan=False)


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """JSON objects, one per line; lines that do not parse (a torn last line) are skipped."""
    records: list[dict[str, Any]] = []
    if not Path(path).exists():
        return records
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number < len(lines) - 1:  # not the last line: say so, it is not a crash artefact
                warnings.warn(f"{path}:{number}: skipping a line that is not JSON", stacklevel=2)
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def change_fields(change: Any) -> dict[str, Any]:
    """A mixture change (``MixtureChange`` or any object with those attributes) as an event's
    fields."""
    return {key: getattr(change, key) for key in ("batch_index", "weights", "reason", "step",
                                                  "extra") if hasattr(change, key)}


__all__ = ["EVENTS_FILE", "METRICS_FILE", "RUN_FILES_DIR", "RUN_FILES_FORMAT", "change_fields",
           "encode", "events_path", "jsonable", "metrics_path", "read_jsonl"]
