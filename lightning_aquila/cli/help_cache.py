"""``lightning-aquila fit --help`` without importing Lightning: the text is kept in a cache
file the first time it is printed and read back after (and so are the options of each trainer
command, which ``known_options`` checks a command line against).

The trainer commands' flags come from LightningCLI, whose import (torch, Lightning,
torchmetrics) takes 4-6 s on a loaded 2-core machine; the help itself does not change until
the code or one of those packages does, so the cache is keyed on both: the versions of
torch, lightning and jsonargparse and the modification times of this package's files.
``LIGHTNING_AQUILA_NO_CACHE=1`` turns it off. Nothing here imports more than the standard
library.
"""

from __future__ import annotations

import functools
import hashlib
import os
from importlib import metadata
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
DEPENDENCIES = ("torch", "lightning", "jsonargparse")


@functools.cache
def _key() -> str:
    """The versions and file times the cache is keyed on, read once per process: a command
    asks for its help and its options, and each would walk the package again."""
    digest = hashlib.sha256()
    for name in DEPENDENCIES:
        try:
            digest.update(f"{name}={metadata.version(name)};".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{name}=?;".encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(f"{path.relative_to(PACKAGE)}:{path.stat().st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def cache_path(command: str, what: str = "help", suffix: str = "txt") -> Path | None:
    """Where ``command``'s help (or ``what`` else) is kept; ``None`` when caching is off."""
    if os.environ.get("LIGHTNING_AQUILA_NO_CACHE"):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "lightning-aquila" / f"{command}-{what}-{_key()}.{suffix}"


def read_help(command: str) -> str | None:
    path = cache_path(command)
    try:
        return path.read_text(encoding="utf-8") if path is not None else None
    except OSError:
        return None


def write_help(command: str, text: str) -> None:
    path = cache_path(command)
    if path is not None and text.strip():
        write_cache(path, text)


def write_cache(path: Path, text: str) -> None:
    """Keep ``text`` at ``path`` (written whole, then renamed; a cache that cannot be written
    is no error)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.partial")
        partial.write_text(text, encoding="utf-8")
        partial.replace(path)
    except OSError:
        pass


__all__ = ["cache_path", "read_help", "write_cache", "write_help"]
