"""Which checkpoint a resume loads: the one asked for if it matches its record, else the
newest intact one beside it, else none (a one-line stop before any work).

``lightning-aquila fit --ckpt_path last`` (or an explicit path or ``s3://`` URL) goes through
``checked_resume_path`` before the trainer is built, so a truncated ``last.ckpt``, a flipped
byte or a missing shard is found before training starts, not as a ``torch.load`` error an hour
into the job, and never loaded silently. Every rank runs the same check on the same files and
so reaches the same answer; only rank 0 prints. ``ensure_loadable`` is the last guard, in the
checkpoint loaders themselves (``AtomicCheckpointIO``, ``AquilaParallelStrategy``), for runs
that do not go through the CLI. Checkpoint folders on object storage are listed and checked
through fsspec (``checkpoint_remote``), with the same answers and messages.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

from lightning_aquila import checkpoint_remote, object_store
from lightning_aquila.atomic import PARTIAL_SUFFIX
from lightning_aquila.checkpoint_record import Verdict, verify

PREFIX = "lightning-aquila fit"
#: Lightning's own test for a ``last`` checkpoint (``ModelCheckpoint._find_last_checkpoints``).
_LAST = re.compile(r"^last(-(\d+))?$")
_verified: dict[tuple, Verdict] = {}


def checked_verify(path: str | os.PathLike[str]) -> Verdict:
    """``verify``, remembered while the file is unchanged (the CLI's check and the loader's
    guard then read a checkpoint once). An object is checksummed at each call (the loader
    checks the bytes it downloads itself)."""
    if object_store.is_remote(path):
        return checkpoint_remote.verify(str(path))
    path = Path(path)
    try:
        stat = path.stat()
    except OSError:
        return verify(path)
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _verified:
        _verified[key] = verify(path)
    return _verified[key]


def ensure_loadable(path: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` (one line) when ``path`` does not match its record."""
    verdict = checked_verify(path)
    if not verdict.usable and Path(path).exists():
        raise ValueError(f"checkpoint {path} is damaged ({verdict.problem}); not loading it")


def newest_last(checkpoint_dirs: Iterable[str | os.PathLike[str]]) -> Path | str | None:
    """What Lightning resolves ``last`` to: the newest ``last*.ckpt`` in the folders (a URL
    for one on object storage)."""
    checkpoint_dirs = [str(d) for d in checkpoint_dirs]
    found: list[tuple[int, Path | str]] = [
        (_mtime(p), p) for d in checkpoint_dirs if not object_store.is_remote(d)
        and Path(d).is_dir() for p in Path(d).iterdir()
        if p.suffix == ".ckpt" and _LAST.match(p.stem)]
    remote = checkpoint_remote.newest(
        [d for d in checkpoint_dirs if object_store.is_remote(d)], _LAST)
    if remote is not None:
        found.append(remote)
    return max(found, key=lambda item: item[0], default=(0, None))[1]


def candidates(directory: Path, exclude: Path) -> list[Path]:
    """The other checkpoints of ``directory``, newest first (hidden and partial ones not)."""
    found = [p for p in directory.iterdir()
             if p.suffix == ".ckpt" and not p.name.startswith(".")
             and not p.name.endswith(PARTIAL_SUFFIX) and p != exclude]
    return sorted(found, key=lambda p: (_mtime(p), p.name), reverse=True)


def _mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def _say(message: str) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    if getattr(rank_zero_only, "rank", 0) == 0:
        print(f"{PREFIX}: {message}", file=sys.stderr, flush=True)


def checked_resume_path(ckpt_path: str | None,
                        checkpoint_dirs: Iterable[str | os.PathLike[str]]) -> str | None:
    """The checkpoint a fit should resume from, verified against its record.

    ``None`` and Lightning's other keywords (``"hpc"``, ``"registry"``) pass through
    unchanged, as does a path or URL that does not exist (Lightning reports it). A damaged
    checkpoint is replaced by the newest usable one in its folder, said in one line; with
    none, ``SystemExit`` with one line. An object whose newer upload did not complete is
    used, and that is said in one line.
    """
    if ckpt_path is None:
        return None
    text = str(ckpt_path)
    if text == "last":
        chosen = newest_last(checkpoint_dirs)
        if chosen is None:
            return ckpt_path
    elif object_store.is_remote(text):
        if not checkpoint_remote.exists(text):
            return ckpt_path
        chosen = text
    else:
        chosen = Path(text.removeprefix("file://"))
        if not chosen.exists():
            return ckpt_path
    verdict = checked_verify(chosen)
    if verdict.state == "intact":
        if verdict.note:
            _say(f"checkpoint {chosen}: {verdict.note}; resuming from it")
        return str(chosen)
    if verdict.state == "unverified":
        _say(f"checkpoint {chosen} has {verdict.problem}: it was written without one and "
             "cannot be verified; resuming from it")
        return str(chosen)
    remote = isinstance(chosen, str)
    folder = object_store.parent(chosen) if remote else chosen.parent
    others = (checkpoint_remote.candidates(folder, chosen) if remote
              else candidates(folder, chosen))
    also_damaged = []
    for other in others:
        other_verdict = checked_verify(other)
        if other_verdict.usable:
            note = f" ({len(also_damaged)} newer one(s) damaged too)" if also_damaged else ""
            unverified = (", which has no record to verify"
                          if other_verdict.state == "unverified" else "")
            _say(f"checkpoint {chosen} is damaged ({verdict.problem}); resuming from "
                 f"{other}{unverified} instead{note}")
            return str(other)
        also_damaged.append(object_store.name(str(other)))
    listed = f" (also damaged: {', '.join(also_damaged)})" if also_damaged else ""
    raise SystemExit(f"{PREFIX}: checkpoint {chosen} is damaged ({verdict.problem}) and no "
                     f"intact checkpoint is left in {folder}{listed}; stopping before "
                     "training")


__all__ = ["candidates", "checked_resume_path", "checked_verify", "ensure_loadable",
           "newest_last"]
