"""Which checkpoint a resume loads: the one asked for if it matches its record, else the
newest intact one beside it, else none (a one-line stop before any work).

``lightning-aquila fit --ckpt_path last`` (or an explicit path or ``s3://`` URL) goes through
``checked_resume_path`` before the trainer is built, so a truncated ``last.ckpt``, a flipped
byte or a missing shard is found before training starts, not as a ``torch.load`` error an hour
into the job, and never loaded silently. Every rank runs the same check on the same files and
so reaches the same answer; only rank 0 prints. ``ensure_loadable`` is the last guard, in the
checkpoint loaders themselves (``AtomicCheckpointIO``, ``AquilaParallelStrategy``), for runs
that do not go through the CLI. Checkpoint folders on object storage are listed through fsspec
(``object_store.listing``) by the same code as local folders, and their objects checked by
``checkpoint_remote`` with the record module's comparison, so with the same answers and
messages. An object is downloaded once for its check and its load (``checkpoint_remote.fetch``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from lightning_aquila import checkpoint_remote, object_store
from lightning_aquila.checkpoint_record import Verdict, verify

PREFIX = "lightning-aquila fit"
#: Lightning's own test for a ``last`` checkpoint (``ModelCheckpoint._find_last_checkpoints``).
_LAST = re.compile(r"^last(-(\d+))?$")
_verified: dict[tuple, Verdict] = {}
_T = TypeVar("_T")


def while_unchanged(cache: dict[tuple, _T], path: Path, read: Callable[[Path], _T]) -> _T:
    """``read(path)``, remembered in ``cache`` while the file is the same version (resolved
    path, inode, size, modification time): a resume asks several times of one checkpoint
    (its check, the loader's guard, the finished-run check, the ranks' comparison), and a
    checkpoint written again is read again. ``OSError`` when it cannot be stat'ed."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in cache:
        cache[key] = read(path)
    return cache[key]


def checked_verify(path: str | os.PathLike[str]) -> Verdict:
    """``verify``, remembered while the file is unchanged (the CLI's check and the loader's
    guard then read a checkpoint once). An object is downloaded and checked once while it is
    unchanged, and the loader loads that copy (``checkpoint_remote.fetch``)."""
    if object_store.is_remote(path):
        try:
            return checkpoint_remote.fetch(str(path)).verdict
        except FileNotFoundError:
            return Verdict("damaged", "missing")
    try:
        return while_unchanged(_verified, Path(path), verify)
    except OSError:
        return verify(path)


def ensure_loadable(path: str | os.PathLike[str]) -> None:
    """Raise ``ValueError`` (one line) when ``path`` does not match its record."""
    verdict = checked_verify(path)
    if not verdict.usable and Path(path).exists():
        raise ValueError(f"checkpoint {path} is damaged ({verdict.problem}); not loading it")


def newest_last(checkpoint_dirs: Iterable[str | os.PathLike[str]]) -> Path | str | None:
    """What Lightning resolves ``last`` to: the newest ``last*.ckpt`` in the folders (a URL
    for one on object storage)."""
    found = [(mtime, p) for d in checkpoint_dirs for mtime, p in _checkpoints(str(d))
             if _LAST.match(object_store.name(str(p))[:-len(".ckpt")])]
    return max(found, key=lambda item: item[0], default=(0, None))[1]


def candidates(directory: Path | str, exclude: Path | str) -> list[Path | str]:
    """The other checkpoints of ``directory`` (a folder, or a URL on object storage), newest
    first. Ties go by the numbers in their names, ``step=12`` after ``step=9``: S3 times its
    objects to the second."""
    found = [(mtime, p) for mtime, p in _checkpoints(str(directory)) if p != exclude]
    return [p for _, p in sorted(found, key=lambda item: (item[0], _natural(str(item[1]))),
                                 reverse=True)]


def _checkpoints(directory: str) -> list[tuple[int, Path | str]]:
    """``(mtime_ns, path)`` of the checkpoints directly in ``directory``: ``.ckpt`` files
    and sharded ``.ckpt`` folders, not hidden ones (a sidecar, a partial write). A URL's are
    URLs."""
    if object_store.is_remote(directory):
        return [(mtime, url) for url, mtime in object_store.listing(directory)
                if _is_checkpoint_name(object_store.name(url))]
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return [(p.stat().st_mtime_ns, p) for p in folder.iterdir() if _is_checkpoint_name(p.name)]


def _is_checkpoint_name(name: str) -> bool:
    return name.endswith(".ckpt") and not name.startswith(".")


def _natural(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part
                 for part in re.split(r"(\d+)", object_store.name(text)))


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
    folder = object_store.parent(chosen) if isinstance(chosen, str) else chosen.parent
    others = candidates(folder, chosen)
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
