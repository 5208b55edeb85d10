"""Atomic file writes: a file appears under its name complete, or not at all.

A process killed while writing (preemption, OOM killer, SIGKILL, a lost node) must never
leave a truncated file under the real name, nor destroy the previous version: readers (a
resume, ``--ckpt_path last``, the report) would load half a file, or nothing. So every file
is written to a temporary sibling (same directory, hence same filesystem, so the rename is
atomic), flushed and fsynced, renamed over the target with ``os.replace``, and the directory
is fsynced so the rename itself survives a power loss. A kill leaves at most a hidden
``.<name>.<random>.partial`` sibling, never a file with the real name or extension; the next
write of the same name removes such leftovers.

Kept free of torch/Lightning imports: the data tools use it too.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

#: Suffix of the temporary files; never ``.ckpt``/``.json``/``.zarr``, so no reader or glob
#: for real files ever picks one up.
PARTIAL_SUFFIX = ".partial"


def partial_files(path: str | os.PathLike[str]) -> list[Path]:
    """Leftover temporary files of earlier, interrupted writes of ``path``."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{_glob_escape(path.name)}.*{PARTIAL_SUFFIX}"))


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Make a rename or a new entry in ``directory`` durable (no-op where directories cannot
    be opened, e.g. on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and /proc-like ones) refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb", *, fsync: bool = True,
                encoding: str | None = None,
                before_replace: Callable[[], None] | None = None) -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; on a clean exit it replaces ``path``.

    ``before_replace`` runs once the temporary file is complete (and fsynced), just before
    the rename: a checkpoint's checksum record is written there (``checkpoint_record``).
    On an exception the temporary file is removed and ``path`` is left as it was. One writer
    per target at a time (leftovers of earlier interrupted writes of the same name are
    removed when a new write starts).
    """
    if "w" not in mode:
        raise ValueError(f"atomic_file(mode={mode!r}) is for writing a whole file: use 'wb' or 'w'")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in partial_files(path):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the usual permissions
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        fsync_directory(path.parent)


def write_bytes_atomically(path: str | os.PathLike[str], data: bytes, *,
                           fsync: bool = True) -> None:
    with atomic_file(path, "wb", fsync=fsync) as handle:
        handle.write(data)


def exchange_paths(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Atomically swap two existing paths (files or directories) with Linux's
    ``renameat2(RENAME_EXCHANGE)``. ``False`` where that is unavailable (another OS, an old
    C library, or a filesystem without support, e.g. NFS); nothing is changed then."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, f"renameat2(RENAME_EXCHANGE) of {a} and {b}: {os.strerror(code)}")


def replace_directory(staging: str | os.PathLike[str], path: str | os.PathLike[str]) -> None:
    """Put the complete directory ``staging`` in place of ``path`` (which may be absent, a
    file or a directory), then delete what was there.

    A rename cannot replace a non-empty directory, so an existing one is swapped atomically
    (``exchange_paths``); where that is unsupported the old one is first renamed aside to
    ``.<name>.old``, leaving an instant in which ``path`` does not exist.
    """
    staging, path = Path(staging), Path(path)
    if path.is_dir() and not path.is_symlink() and exchange_paths(staging, path):
        shutil.rmtree(staging)  # now holds the old directory
        fsync_directory(path.parent)
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    if path.exists() or path.is_symlink():
        os.replace(path, old)
    os.replace(staging, path)
    fsync_directory(path.parent)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a directory tree, a file or a link, if there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _read_umask() -> int:
    # Read once at import: setting and restoring it later would race with other threads.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


__all__ = ["PARTIAL_SUFFIX", "atomic_file", "exchange_paths", "fsync_directory",
           "partial_files", "replace_directory", "write_bytes_atomically"]
