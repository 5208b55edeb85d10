"""Where ``prepare`` reads its text: finding the input files (a path, glob, directory or any
fsspec URL, optionally compressed), hashing them, and streaming their records (txt pieces,
jsonl lines, parquet rows) with file and line named on every error. Kept apart from
``prepare.py``, which tokenizes and writes what this yields; ``train-tokenizer`` reads its
text here too (:func:`read_texts`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import lzma
import math
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from fsspec.utils import infer_compression
from tqdm import tqdm

from lightning_aquila.datamodules.encoding import (
    DEFAULT_ENCODING,
    FIX,
    READ_AS,
    open_decompressed,
    resolve_encoding,
)
from lightning_aquila.datamodules.shard_format import DataError

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".txt": "txt",
           ".text": "txt", ".md": "txt", ".parquet": "parquet", ".pq": "parquet"}
#: A txt file is one document; it is read and tokenized in pieces of about this many
#: characters, cut at line ends, so a large file never sits in memory whole.
TXT_PIECE_CHARS = 1 << 20
HASH_BLOCK = 1 << 20
#: What a damaged or truncated (compressed) source raises while it is read.
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
#: A quality score is stored as float32.
MAX_QUALITY = float(np.finfo(np.float32).max)


@dataclass
class Piece:
    """Text of one document, or of part of one (``end`` marks the document's last piece)."""

    text: str
    record: int
    end: bool = True
    quality: float | None = None


@dataclass
class SourceFile:
    url: str
    fs: Any
    path: str
    format: str
    compression: str | None
    size: int = 0
    sha256: str = ""


@dataclass
class SourceStats:
    documents: int = 0
    tokens: int = 0
    heldout_documents: int = 0
    heldout_tokens: int = 0
    empty_documents: int = 0
    bad_records: int = 0
    bad_examples: list[str] = field(default_factory=list)



# -- sources --------------------------------------------------------------------------------
def find_sources(inputs: Sequence[str], fmt: str = "auto",
                 storage_options: dict[str, Any] | None = None) -> list[SourceFile]:
    """Expand globs, URLs and directories into files, each with its format; sorted, so the
    order of a run (and of the documents in its segment) does not depend on listing order."""
    found: dict[str, SourceFile] = {}
    for pattern in inputs:
        fs, _, paths = fsspec.get_fs_token_paths(pattern, storage_options=storage_options or {})
        files: list[str] = []
        for path in paths:
            if fs.isdir(path):  # --format, when given, applies to every file inside
                files += [p for p in fs.find(path) if _format_of(p, fmt, strict=False)]
            elif fs.exists(path):
                files.append(path)
        if not files:
            raise DataError(f"no input files match {pattern!r}")
        for path in files:
            url = fs.unstrip_protocol(path) if "://" in pattern else path
            compression = infer_compression(path)
            found[url] = SourceFile(url, fs, path, _format_of(path, fmt), compression)
    return [found[url] for url in sorted(found)]


def _format_of(path: str, fmt: str, *, strict: bool = True) -> str | None:
    if fmt != "auto":
        return fmt
    name = path.lower()
    compression = infer_compression(name)
    if compression:
        name = name.rsplit(".", 1)[0]
    suffix = os.path.splitext(name)[1]
    if suffix in FORMATS:
        return FORMATS[suffix]
    if strict:
        raise DataError(f"cannot tell the format of {path!r} from its name; pass --format "
                        "txt, jsonl or parquet")
    return None


def hash_source(source: SourceFile) -> None:
    """Content hash of the raw bytes (what idempotency is keyed on) and size."""
    digest = hashlib.sha256()
    size = 0
    with source.fs.open(source.path, "rb") as raw:
        while block := raw.read(HASH_BLOCK):
            digest.update(block)
            size += len(block)
    source.sha256, source.size = digest.hexdigest(), size


@contextlib.contextmanager
def _reading(source: SourceFile) -> Iterator[None]:
    """Turns the errors of a source that cannot be read (a damaged gzip/bz2/xz stream, a
    truncated file, an unreadable parquet file) into a ``DataError`` naming it."""
    try:
        yield
    except DataError:
        raise
    except READ_ERRORS as exc:
        how = f"{source.format}" + (f" ({source.compression})" if source.compression else "")
        raise DataError(f"{source.url}: cannot be read as {how}: {type(exc).__name__}: "
                        f"{exc}") from None


def _open_parquet(source: SourceFile, stream: Any) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(stream)
    except Exception as exc:  # pyarrow raises ArrowInvalid and friends
        raise DataError(f"{source.url}: not a readable parquet file ({exc})") from None


class RecordReader:
    """Reads one source into pieces, reporting progress in raw bytes and naming bad records."""

    def __init__(self, source: SourceFile, *, text_field: str, quality_field: str | None,
                 on_error: str, stats: SourceStats, progress: tqdm,
                 piece_chars: int = TXT_PIECE_CHARS, encoding: str = DEFAULT_ENCODING) -> None:
        self.source, self.text_field, self.quality_field = source, text_field, quality_field
        #: a codec name (``auto`` is resolved per file before, ``encoding.py``)
        self.encoding = encoding
        self.piece_chars = max(1, int(piece_chars))
        self.on_error, self.stats, self.progress = on_error, stats, progress
        self._reported = 0

    def bad(self, where: str, message: str) -> None:
        text = f"{self.source.url}:{where}: {message}"
        if self.on_error == "stop":
            raise DataError(f"{text} (pass --on-error skip to skip such records)")
        self.stats.bad_records += 1
        if len(self.stats.bad_examples) < 5:
            self.stats.bad_examples.append(text)

    def _tick(self, raw: Any) -> None:
        try:
            position = raw.tell()
        except (OSError, ValueError):
            return
        self.progress.update(max(0, position - self._reported))
        self._reported = max(self._reported, position)

    def pieces(self) -> Iterator[Piece]:
        source = self.source
        with _reading(source), open_decompressed(source) as (raw, stream):
            if source.format == "jsonl":
                yield from self._jsonl(stream, raw)
            elif source.format == "txt":
                yield from self._txt(stream, raw)
            elif source.format == "parquet":
                yield from self._parquet(stream)
            else:
                raise DataError(f"unknown format {source.format!r} for {source.url}")
        self.progress.update(max(0, source.size - self._reported))

    def _quality(self, value: Any, where: str) -> tuple[bool, float | None]:
        if value is None:
            return True, None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.bad(where, f"field {self.quality_field!r} is {value!r}, not a number")
            return False, None
        try:
            score = float(value)
        except OverflowError:  # an int beyond the float range
            score = math.inf
        if not abs(score) <= MAX_QUALITY:  # NaN, inf, or beyond float32
            self.bad(where, f"field {self.quality_field!r} is {value!r}, not a finite "
                     "float32 number")
            return False, None
        return True, score

    def _jsonl(self, stream: Any, raw: Any) -> Iterator[Piece]:
        for number, line in enumerate(stream, 1):
            if number % 1024 == 0:
                self._tick(raw)
            if not line.strip():
                continue
            where = f"line {number}"
            try:  # json.loads reads UTF-8 bytes itself; another encoding is decoded here
                record = json.loads(line if self.encoding == DEFAULT_ENCODING
                                    else line.decode(self.encoding))
            except UnicodeDecodeError as exc:
                self.bad(where, f"not {self.encoding} ({exc.reason}; {READ_AS})")
                continue
            except json.JSONDecodeError as exc:
                self.bad(where, f"invalid JSON ({exc.msg} at column {exc.colno})")
                continue
            except ValueError as exc:  # e.g. an integer of more digits than Python converts
                self.bad(where, f"invalid JSON ({exc})")
                continue
            except RecursionError:
                self.bad(where, "invalid JSON (nested too deeply)")
                continue
            if not isinstance(record, dict):
                self.bad(where, f"expected a JSON object, got {type(record).__name__}")
                continue
            if self.text_field not in record:
                self.bad(where, f"no field {self.text_field!r} (fields: {sorted(record)[:8]})")
                continue
            text = record[self.text_field]
            if not isinstance(text, str):
                self.bad(where, f"field {self.text_field!r} is {type(text).__name__}, not a "
                         "string")
                continue
            if not _is_unicode(text):
                self.bad(where, f"field {self.text_field!r} holds a lone surrogate "
                         "(\\ud800-\\udfff escape), which is not Unicode text")
                continue
            ok, quality = (self._quality(record.get(self.quality_field), where)
                           if self.quality_field else (True, None))
            if ok:
                yield Piece(text, number, True, quality)

    def _txt(self, stream: Any, raw: Any) -> Iterator[Piece]:
        decoder = io.TextIOWrapper(stream, encoding=self.encoding, errors="strict", newline="")
        pending = ""
        try:
            while block := decoder.read(self.piece_chars):
                text = pending + block
                cut = text.rfind("\n") + 1
                pending, text = (text[cut:], text[:cut]) if cut else (text, "")
                self._tick(raw)
                if text:
                    yield Piece(text, 0, end=False)
        except UnicodeDecodeError as exc:
            message = f"{self.source.url}: not {self.encoding} text ({exc.reason} at byte " \
                      f"{exc.start} of a block)"
            if self.on_error == "stop":
                raise DataError(f"{message}; {FIX}") from None
            self.stats.bad_records += 1  # the rest of the file is skipped
            self.stats.bad_examples.append(message)
        yield Piece(pending, 0, end=True)

    def _parquet(self, stream: Any) -> Iterator[Piece]:
        parquet = _open_parquet(self.source, stream)
        columns = [self.text_field] + ([self.quality_field] if self.quality_field else [])
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise DataError(f"{self.source.url}: no column(s) {missing} (columns: "
                            f"{parquet.schema_arrow.names})")
        rows = max(1, parquet.metadata.num_rows)
        row = 0
        for texts, qualities in self._parquet_batches(parquet, columns):
            for text, quality in zip(texts, qualities):
                row += 1
                where = f"row {row}"
                if not isinstance(text, str):
                    self.bad(where, f"column {self.text_field!r} is {text!r}, not a string")
                    continue
                ok, value = self._quality(quality, where)
                if ok:
                    yield Piece(text, row, True, value)
            done = int(self.source.size * min(row, rows) / rows)
            self.progress.update(max(0, done - self._reported))
            self._reported = max(self._reported, done)

    def _parquet_batches(self, parquet: Any, columns: list[str]
                         ) -> Iterator[tuple[list[Any], list[Any]]]:
        """The text (and quality) values, batch by batch; damage found while decoding a
        page (pyarrow raises many types) is a ``DataError`` naming the file."""
        batches = parquet.iter_batches(batch_size=1024, columns=columns)
        while True:
            try:
                batch = next(batches, None)
                if batch is None:
                    return
                texts = batch.column(self.text_field).to_pylist()
                qualities = (batch.column(self.quality_field).to_pylist()
                             if self.quality_field else [None] * len(texts))
            except Exception as exc:
                raise DataError(f"{self.source.url}: damaged parquet data ({type(exc).__name__}:"
                                f" {exc})") from None
            yield texts, qualities


def _is_unicode(text: str) -> bool:
    """Whether ``text`` is encodable as UTF-8: JSON's \\uXXXX escapes can make lone
    surrogates, which no tokenizer accepts."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_texts(paths: Sequence[str], *, text_field: str = "text", fmt: str = "auto",
               on_error: str = "stop", encoding: str = DEFAULT_ENCODING,
               storage_options: dict[str, Any] | None = None) -> Iterator[str]:
    """The non-empty texts of ``paths`` (in their order), read as ``prepare`` reads them: a
    jsonl record's or parquet row's ``text_field``, a txt file in pieces cut at line ends.
    For readers that need the text only (``train-tokenizer``); bad records as in
    :class:`RecordReader` (a txt file that stops decoding is read up to there)."""
    for path in paths:
        for source in find_sources([path], fmt, storage_options):
            reader = RecordReader(source, text_field=text_field, quality_field=None,
                                  on_error=on_error, stats=SourceStats(),
                                  progress=tqdm(disable=True),
                                  encoding=resolve_encoding(source, encoding))
            yield from (piece.text for piece in reader.pieces() if piece.text)


def undecodable(source: SourceFile, encoding: str) -> str | None:
    """Why ``source`` does not decode as ``encoding`` (``None`` when it does), read as a
    stream so a large file never sits in memory whole; damage is a ``DataError``."""
    with _reading(source), open_decompressed(source) as (_, stream):
        decoder = io.TextIOWrapper(stream, encoding=encoding, errors="strict", newline="")
        try:
            while decoder.read(TXT_PIECE_CHARS):
                pass
        except UnicodeDecodeError as exc:
            return f"not {encoding} text ({exc.reason}: byte 0x{exc.object[exc.start]:02x})"
    return None


# -- records --------------------------------------------------------------------------------
def read_records(source: SourceFile) -> Iterator[tuple[str, int, int]]:
    """``(source hash, record number, bytes)`` of a source's non-blank records (numbered as
    ``Piece.record`` counts); what :func:`plan_split` decides on."""
    if source.format == "txt":
        yield source.sha256, 0, source.size
        return
    with _reading(source), open_decompressed(source) as (_, stream):
        if source.format == "parquet":
            rows = _open_parquet(source, stream).metadata.num_rows
            for row in range(1, rows + 1):
                yield source.sha256, row, source.size // max(rows, 1)
            return
        for number, line in enumerate(stream, 1):
            if line.strip():
                yield source.sha256, number, len(line)
