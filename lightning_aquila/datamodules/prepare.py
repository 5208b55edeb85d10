"""``lightning-aquila prepare`` and ``lightning-aquila inspect``.

``prepare`` tokenizes raw text (txt, jsonl, parquet; local or any fsspec URL, optionally
gzip/bz2/xz compressed) into one domain of a shard store. It streams: sources are read in
blocks, tokenized in batches by the tokenizer's multi-threaded ``encode_batch`` (all cores),
and written a chunk at a time, so memory does not grow with the input. A source whose content
hash the domain already records is skipped, so re-running is a no-op and new files append.
Each document goes to the held-out split by a hash of (source hash, record number): the
split does not depend on batch sizes, thread timing or which other files are in the run.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import lzma
import math
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import numpy as np
from fsspec.compression import compr
from fsspec.utils import infer_compression
from tqdm import tqdm

from lightning_aquila.datamodules.store import (
    DEFAULT_CHUNK_TOKENS,
    SPLITS,
    DataError,
    DomainWriter,
    ShardStore,
    check_domain_name,
)

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


@dataclass
class PrepareReport:
    """What a ``prepare`` run did (also printed by the command)."""

    store: str
    domain: str
    added: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: held-out documents the domain has after the run (None when nothing was added)
    heldout_documents: int | None = None

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.added)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.added)

    @property
    def bad_records(self) -> int:
        return sum(s["bad_records"] for s in self.added)


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
            if fs.isdir(path):
                files += [p for p in fs.find(path) if _format_of(p, "auto", strict=False)]
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


class _Reader:
    """Reads one source into pieces, reporting progress in raw bytes and naming bad records."""

    def __init__(self, source: SourceFile, *, text_field: str, quality_field: str | None,
                 on_error: str, stats: SourceStats, progress: tqdm,
                 piece_chars: int = TXT_PIECE_CHARS) -> None:
        self.source, self.text_field, self.quality_field = source, text_field, quality_field
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
        with _reading(source), source.fs.open(source.path, "rb") as raw:
            stream = compr[source.compression](raw, mode="rb") if source.compression else raw
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
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                self.bad(where, f"not UTF-8 ({exc.reason})")
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
        decoder = io.TextIOWrapper(stream, encoding="utf-8", errors="strict", newline="")
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
            raise DataError(f"{self.source.url}: not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start} of a block)") from None
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


# -- tokenizing and writing -----------------------------------------------------------------
def _record_hash(sha256: str, record: int) -> float:
    digest = hashlib.blake2b(f"{sha256}:{record}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def held_out(sha256: str, record: int, fraction: float) -> bool:
    """Whether a document is held out: a hash, so the choice is stable and reproducible."""
    return fraction > 0 and _record_hash(sha256, record) < fraction


def _records(source: SourceFile) -> Iterator[int]:
    """The record numbers of a source's non-blank records (as ``Piece.record`` counts)."""
    if source.format == "txt":
        yield 0
        return
    with _reading(source), source.fs.open(source.path, "rb") as raw:
        stream = compr[source.compression](raw, mode="rb") if source.compression else raw
        if source.format == "parquet":
            yield from range(1, _open_parquet(source, stream).metadata.num_rows + 1)
            return
        for number, line in enumerate(stream, 1):
            if line.strip():
                yield number


def guaranteed_held_out(sources: Sequence[SourceFile], fraction: float) -> tuple[str, int] | None:
    """For a domain that has no held-out document yet: if the hash rule would hold out none
    of this run's records, the record with the smallest hash is held out instead, so that a
    small domain (a dozen documents at 1%) still gets a validation split. Stops at the
    first record the rule holds out (about 1/fraction records into a large run)."""
    if fraction <= 0:
        return None
    best: tuple[float, str, int] | None = None
    for source in sources:
        for record in _records(source):
            value = _record_hash(source.sha256, record)
            if value < fraction:
                return None
            if best is None or value < best[0]:
                best = (value, source.sha256, record)
    return (best[1], best[2]) if best else None


def _batches(pieces: Iterator[Piece], max_chars: int) -> Iterator[list[Piece]]:
    batch: list[Piece] = []
    chars = 0
    for piece in pieces:
        batch.append(piece)
        chars += len(piece.text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _tokenize(source: SourceFile, writer: DomainWriter, tokenizer: Any, eos: int, *,
              held_out_fraction: float, text_field: str, quality_field: str | None,
              on_error: str, batch_chars: int, piece_chars: int, progress: tqdm,
              tokens_before: int = 0, forced: tuple[str, int] | None = None) -> SourceStats:
    stats = SourceStats()
    reader = _Reader(source, text_field=text_field, quality_field=quality_field,
                     on_error=on_error, stats=stats, progress=progress, piece_chars=piece_chars)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    eos_array = np.array([eos], dtype=np.uint32)
    doc_tokens = 0
    in_doc = False
    split = "train"
    for batch in _batches(reader.pieces(), batch_chars):
        encodings = encode([p.text for p in batch], add_special_tokens=False)
        for piece, encoding in zip(batch, encodings):
            ids = np.asarray(encoding.ids, dtype=np.uint32)
            if not in_doc:
                chosen = (held_out(source.sha256, piece.record, held_out_fraction)
                          or forced == (source.sha256, piece.record))
                split = "heldout" if chosen else "train"
                in_doc, doc_tokens = True, 0
                if piece.end and not piece.text.strip():
                    stats.empty_documents += 1
                    in_doc = False
                    continue
            if len(ids):
                writer.extend(split, ids)
                doc_tokens += len(ids)
            if piece.end:
                in_doc = False
                if doc_tokens == 0:  # e.g. a txt file with nothing but line ends
                    stats.empty_documents += 1
                    continue
                writer.extend(split, eos_array)
                writer.end_document(split, piece.quality)
                stats.documents += 1
                stats.tokens += doc_tokens + 1
                if split == "heldout":
                    stats.heldout_documents += 1
                    stats.heldout_tokens += doc_tokens + 1
        progress.set_postfix(tokens=f"{tokens_before + stats.tokens:,}", refresh=False)
    return stats


def guess_language(domain: str) -> str:
    """``en_prose`` -> ``en``, ``code_python`` -> ``code``; otherwise ``unknown``."""
    head = domain.split("_", 1)[0].lower()
    if head == "code" or re.fullmatch(r"[a-z]{2}", head):
        return head
    return "unknown"


def prepare(
    inputs: Sequence[str] | str,
    domain: str,
    output: str,
    tokenizer: str | os.PathLike[str] | None = None,
    *,
    fmt: Literal["auto", "txt", "jsonl", "parquet"] = "auto",
    text_field: str = "text",
    quality_field: str | None = None,
    language: str | None = None,
    held_out_fraction: float = 0.01,
    on_error: Literal["stop", "skip"] = "stop",
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    batch_chars: int = 4 << 20,
    piece_chars: int = TXT_PIECE_CHARS,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Tokenize ``inputs`` into ``domain`` of the store at ``output``; see the module doc."""
    from lightning_aquila.tokenizer import (
        DEFAULT_TOKENIZER,
        load_tokenizer,
        special_token_ids,
        tokenizer_hash,
    )

    check_domain_name(domain)
    if not 0 <= held_out_fraction < 1:
        raise DataError(f"held-out fraction must be in [0, 1), got {held_out_fraction}")
    if on_error not in ("stop", "skip"):
        raise DataError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    tokenizer_path = tokenizer if tokenizer is not None else DEFAULT_TOKENIZER
    tok = load_tokenizer(tokenizer_path)
    _, eos = special_token_ids(tok)
    if eos is None:
        raise DataError(f"tokenizer {tokenizer_path} has no eos token to end documents with")
    meta = {"hash": tokenizer_hash(tok), "vocab_size": tok.get_vocab_size(), "eos_id": eos,
            "name": os.path.basename(os.path.normpath(str(tokenizer_path)))}
    sources = find_sources([inputs] if isinstance(inputs, str) else list(inputs), fmt,
                           storage_options)
    report = PrepareReport(str(output), domain)
    with DomainWriter(output, domain, tokenizer=meta, language=language or "",
                      chunk_tokens=chunk_tokens, with_quality=quality_field is not None,
                      storage_options=storage_options) as writer:
        if not language and writer.info is None:
            writer.language = guess_language(domain)
        known = writer.known_hashes
        todo: list[SourceFile] = []
        for source in tqdm(sources, desc="hashing", unit="file", disable=not progress,
                           leave=False):
            hash_source(source)
            if source.sha256 in known:
                report.skipped.append(source.url)
            else:
                known.add(source.sha256)
                todo.append(source)
        if not todo:
            writer.abort()
            return report
        forced = (guaranteed_held_out(todo, held_out_fraction)
                  if writer.info is None or writer.info.documents("heldout") == 0 else None)
        bar = tqdm(total=sum(s.size for s in todo), unit="B", unit_scale=True,
                   desc=f"prepare {domain}", disable=not progress)
        with bar:
            for source in todo:
                stats = _tokenize(source, writer, tok, eos, held_out_fraction=held_out_fraction,
                                  text_field=text_field, quality_field=quality_field,
                                  on_error=on_error, batch_chars=batch_chars,
                                  piece_chars=piece_chars, progress=bar,
                                  tokens_before=report.tokens, forced=forced)
                record = {"path": source.url, "sha256": source.sha256, "bytes": source.size,
                          "format": source.format, "held_out_fraction": held_out_fraction,
                          "documents": stats.documents, "tokens": stats.tokens,
                          "heldout_documents": stats.heldout_documents,
                          "heldout_tokens": stats.heldout_tokens,
                          "empty_documents": stats.empty_documents,
                          "bad_records": stats.bad_records,
                          "bad_examples": stats.bad_examples}
                writer.add_source(record)
                report.added.append(record)
        report.heldout_documents = writer.commit().documents("heldout")
    return report


# -- commands -------------------------------------------------------------------------------
def _storage_options(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DataError("--storage-options must be a JSON object")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-aquila prepare", allow_abbrev=False,
        description="Tokenize raw text into one domain of a zarr shard store (idempotent: "
                    "sources already in the domain, by content hash, are skipped).")
    parser.add_argument("--input", action="append", required=True, metavar="GLOB_OR_URL",
                        help="file, glob, directory or fsspec URL; repeat for more")
    parser.add_argument("--domain", required=True, help="domain name (a group of the store)")
    parser.add_argument("--output", required=True, metavar="STORE", help="store path or URL")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer.json or a directory holding one (default: bundled)")
    parser.add_argument("--format", default="auto", choices=["auto", "txt", "jsonl", "parquet"],
                        help="input format (default auto: from each file's extension)")
    parser.add_argument("--text-field", default="text", help="jsonl field / parquet column")
    parser.add_argument("--quality-field", default=None,
                        help="optional numeric field / column stored as per-document quality")
    parser.add_argument("--language", default=None,
                        help="language tag (default: the domain name's prefix, e.g. en_prose "
                             "-> en)")
    parser.add_argument("--held-out-fraction", type=float, default=0.01,
                        help="fraction of documents kept for validation (default 0.01)")
    parser.add_argument("--on-error", default="stop", choices=["stop", "skip"],
                        help="a corrupt record: stop naming file and line, or skip and count")
    parser.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS,
                        help="tokens per zarr chunk of a new domain (default %(default)s)")
    parser.add_argument("--threads", type=int, default=None,
                        help="tokenizer threads (default: all cores)")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help="fsspec options for remote inputs/outputs, as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.threads:
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    try:
        report = prepare(
            args.input, args.domain, args.output, args.tokenizer, fmt=args.format,
            text_field=args.text_field, quality_field=args.quality_field,
            language=args.language, held_out_fraction=args.held_out_fraction,
            on_error=args.on_error, chunk_tokens=args.chunk_tokens,
            storage_options=_storage_options(args.storage_options), progress=not args.quiet,
        )
    except DataError as exc:
        print(f"lightning-aquila prepare: error: {exc}", file=sys.stderr)
        return 1
    for url in report.skipped:
        print(f"skipped {url}: already in domain {report.domain!r}")
    if report.added:
        held = sum(s["heldout_documents"] for s in report.added)
        print(f"domain {report.domain!r}: added {len(report.added)} source(s), "
              f"{report.documents:,} documents ({held:,} held out), {report.tokens:,} tokens "
              f"-> {report.store}")
    elif not report.skipped:
        print("nothing to do")
    if report.heldout_documents == 0 and args.held_out_fraction > 0:
        print(f"warning: domain {report.domain!r} has no held-out documents, so it cannot be "
              "validated on; raise --held-out-fraction", file=sys.stderr)
    if report.bad_records:
        print(f"warning: skipped {report.bad_records} bad record(s), e.g.:", file=sys.stderr)
        for source in report.added:
            for example in source["bad_examples"]:
                print(f"  {example}", file=sys.stderr)
    return 0


def inspect_table(store: ShardStore) -> str:
    """The ``inspect`` table: one row per domain, share = the domain's part of all tokens."""
    rows = []
    total = sum(info.total_tokens for info in store.domains.values()) or 1
    for name, info in store.domains.items():
        rows.append([name, info.language, f"{info.total_documents:,}", f"{info.total_tokens:,}",
                     f"{info.total_tokens / total:.1%}", f"{info.tokens('heldout'):,}"])
    docs = sum(info.total_documents for info in store.domains.values())
    rows.append(["total", "", f"{docs:,}", f"{total if store.domains else 0:,}",
                 "100.0%" if store.domains else "", ""])
    header = ["domain", "language", "documents", "tokens", "share", "held-out tokens"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w)
                       for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))))
    return "\n".join(lines)


def inspect_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-aquila inspect", allow_abbrev=False,
        description="Print the domains, documents and tokens of a shard store.")
    parser.add_argument("store", metavar="STORE", help="store path or URL")
    parser.add_argument("--storage-options", default=None, metavar="JSON",
                        help="fsspec storage options as JSON (e.g. credentials of a remote store)")
    parser.add_argument("--verify", action="store_true",
                        help="also read every chunk (catches missing or corrupt chunks)")
    args = parser.parse_args(argv)
    try:
        store = ShardStore(args.store, _storage_options(args.storage_options))
        print(f"{store.url}: {len(store.domains)} domain(s); splits {', '.join(SPLITS)}")
        print(inspect_table(store))
        if args.verify:
            store.verify(full=True)
            print("verified: every chunk is present and intact")
    except DataError as exc:
        print(f"lightning-aquila inspect: error: {exc}", file=sys.stderr)
        return 1
    return 0
