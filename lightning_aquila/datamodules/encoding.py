"""The text encoding of raw input: ``--encoding`` for ``prepare`` and ``train-tokenizer``.

Real-world directories hold the odd Latin-1 or Windows-1252 file among UTF-8 ones. UTF-8 is
the default and is checked strictly; ``--encoding latin-1`` (any Python codec) reads a
corpus in another encoding, and ``--encoding auto`` asks charset-normalizer (already
installed with ``transformers``, through ``requests``; a maintained detector, no compiled
code) per file, from its first :data:`SAMPLE_BYTES`. ``--on-error skip`` skips a file that
still does not decode instead of stopping (``undecodable``, run before a txt file is
tokenized, so no part of it reaches the store: ``sources.undecodable``).
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import Iterator
from typing import Any

from fsspec.compression import compr

from lightning_aquila.datamodules.shard_format import DataError

DEFAULT_ENCODING = "utf-8"
AUTO = "auto"
#: Bytes of a file's start that ``auto`` detects from.
SAMPLE_BYTES = 1 << 16
#: The fix a decode error names (a record's: ``RecordReader.bad`` adds ``--on-error skip``).
READ_AS = "pass --encoding NAME (e.g. latin-1, cp1252) or --encoding auto"
FIX = f"{READ_AS}, or --on-error skip to skip such files"


def check_encoding(name: str) -> str:
    """``name`` when Python knows the codec (or it is ``auto``); a ``DataError`` otherwise."""
    if name == AUTO:
        return name
    try:
        codecs.lookup(name)
    except LookupError:
        raise DataError(f"unknown encoding {name!r}: give a Python codec name (utf-8, "
                        "latin-1, cp1252, gb18030, ...) or auto") from None
    return name


@contextlib.contextmanager
def open_decompressed(source: Any) -> Iterator[tuple[Any, Any]]:
    """``(raw, stream)``: the file of ``source`` (a ``SourceFile``) and its bytes
    decompressed (the same object for an uncompressed file); both are closed on exit. The
    raw file's position is how far a reader has got, for progress."""
    with source.fs.open(source.path, "rb") as raw:
        if not source.compression:
            yield raw, raw
            return
        with compr[source.compression](raw, mode="rb") as stream:
            yield raw, stream


def detect_encoding(source: Any) -> str:
    """The encoding of ``source`` (a ``SourceFile``) as charset-normalizer guesses it from
    its first bytes; UTF-8 for an empty file or one it cannot place."""
    from charset_normalizer import from_bytes

    with open_decompressed(source) as (_, stream):
        sample = stream.read(SAMPLE_BYTES)
    if not sample:
        return DEFAULT_ENCODING
    try:  # a sample cut inside a multi-byte character is still UTF-8
        sample.decode(DEFAULT_ENCODING)
        return DEFAULT_ENCODING
    except UnicodeDecodeError as exc:
        if exc.start >= len(sample) - 3 and exc.reason == "unexpected end of data":
            return DEFAULT_ENCODING
    best = from_bytes(sample).best()
    return best.encoding if best is not None else DEFAULT_ENCODING


def resolve_encoding(source: Any, encoding: str) -> str:
    """The codec to read ``source`` with under ``--encoding encoding``."""
    return detect_encoding(source) if encoding == AUTO else encoding


__all__ = ["AUTO", "DEFAULT_ENCODING", "FIX", "READ_AS", "check_encoding", "detect_encoding",
           "resolve_encoding"]
