"""``lightning-aquila prepare``: raw text into one domain of a shard store.

Reading the inputs is ``sources.py``'s job and choosing the held-out part ``split.py``'s;
this file tokenizes and writes the domain. The commands' flags are ``prepare``'s parameters;
they and their output are in ``cli/tools.py``.

``prepare`` tokenizes raw text (txt, jsonl, parquet; local or any fsspec URL, optionally
gzip/bz2/xz compressed) into one domain of a shard store. It streams: sources are read in
blocks, tokenized in batches by the tokenizer's multi-threaded ``encode_batch`` (all cores),
and written a chunk at a time, so memory does not grow with the input. A source whose content
hash the domain already records is skipped, so re-running is a no-op and new files append.
Which tokens are held out is decided by hashes of the sources' content (``split.py``): whole
documents normally, token windows when a domain has only one or a few large documents, so
the split does not depend on batch sizes or thread timing, and no split ends up empty.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from tqdm import tqdm

from lightning_aquila.datamodules.encoding import (
    DEFAULT_ENCODING,
    check_encoding,
    resolve_encoding,
)
from lightning_aquila.datamodules.shard_format import (
    DEFAULT_CHUNK_TOKENS,
    SPLITS,
    DataError,
    check_domain_name,
)
from lightning_aquila.datamodules.sources import (
    TXT_PIECE_CHARS,
    Piece,
    RecordReader,
    SourceFile,
    SourceStats,
    find_sources,
    hash_source,
    read_records,
    undecodable,
)
from lightning_aquila.datamodules.split import (
    HELDOUT_WINDOW_TOKENS,
    SplitRouter,
    plan_split,
)
from lightning_aquila.datamodules.writer import DomainWriter


@dataclass
class PrepareReport:
    """What a ``prepare`` run did (also printed by the command)."""

    store: str
    domain: str
    added: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: held-out documents (pieces) the domain has after the run (None when nothing was added)
    heldout_documents: int | None = None
    #: the language tag of the domain
    language: str = ""
    #: how this run split: "documents" or "windows" (see ``split.py``)
    split_mode: str = ""
    #: this run's tokens and pieces (documents, or parts of documents) per split
    split_tokens: dict[str, int] = field(default_factory=dict)
    split_pieces: dict[str, int] = field(default_factory=dict)
    split_parts: dict[str, int] = field(default_factory=dict)
    #: the domain's tokens per split after the run
    domain_tokens: dict[str, int] = field(default_factory=dict)
    #: ``"url: why"`` of each txt source skipped whole under ``on_error="skip"`` because it
    #: does not decode
    undecodable: list[str] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return sum(s["documents"] for s in self.added)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.added)

    @property
    def bad_records(self) -> int:
        return sum(s["bad_records"] for s in self.added)


# -- tokenizing and writing -----------------------------------------------------------------
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


def _tokenize(source: SourceFile, router: SplitRouter, tokenizer: Any, *, text_field: str,
              quality_field: str | None, on_error: str, batch_chars: int, piece_chars: int,
              progress: tqdm, encoding: str, tokens_before: int = 0) -> SourceStats:
    """Tokenize one source into ``router``; its documents and their tokens (eos included)."""
    stats = SourceStats()
    reader = RecordReader(source, text_field=text_field, quality_field=quality_field,
                          on_error=on_error, stats=stats, progress=progress,
                          piece_chars=piece_chars, encoding=encoding)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    doc_tokens = 0
    in_doc = False
    for batch in _batches(reader.pieces(), batch_chars):
        encodings = encode([p.text for p in batch], add_special_tokens=False)
        for piece, encoding in zip(batch, encodings):
            if not in_doc:
                if piece.end and not piece.text.strip():
                    stats.empty_documents += 1
                    continue
                router.begin(source.sha256, piece.record, piece.quality)
                in_doc, doc_tokens = True, 0
            ids = np.asarray(encoding.ids, dtype=np.uint32)
            router.add(ids)
            doc_tokens += len(ids)
            if piece.end:
                in_doc = False
                if not router.end():  # e.g. a txt file with nothing but line ends
                    stats.empty_documents += 1
                    continue
                stats.documents += 1
                stats.tokens += doc_tokens + 1
        progress.set_postfix(tokens=f"{tokens_before + stats.tokens:,}", refresh=False)
    return stats


def guess_language(domain: str) -> str:
    """The language tag a domain gets when ``--language`` is not given: the part of its name
    before the first ``_`` when that is a two-letter code or ``code`` (``en_prose`` -> ``en``,
    ``code_python`` -> ``code``), otherwise ``unknown`` (``legal`` is not a language)."""
    head = domain.split("_", 1)[0].lower()
    if head == "code" or re.fullmatch(r"[a-z]{2}", head):
        return head
    return "unknown"


def _names(sources: Sequence[SourceFile], shown: int = 3) -> str:
    urls = [s.url for s in sources]
    more = f" and {len(urls) - shown} more" if len(urls) > shown else ""
    return ", ".join(urls[:shown]) + more


def _resolve_tokenizer(path: str | os.PathLike[str] | None,
                       eos_token: str | None) -> tuple[Any, dict[str, Any], str]:
    """The tokenizer, the metadata a domain records about it and its ``tokenizer.json`` text
    (the store keeps a copy); a tokenizer without an eos token (or a wrong ``--eos-token``) is
    a ``DataError`` naming the flag that fixes it."""
    from lightning_aquila.tokenizer import (
        DEFAULT_TOKENIZER,
        EOS_SPELLINGS,
        TokenizerError,
        load_tokenizer,
        special_tokens,
        tokenizer_file,
        tokenizer_hash,
    )

    where = path if path is not None else DEFAULT_TOKENIZER
    try:
        tok = load_tokenizer(where)
        found = special_tokens(where, eos_token=eos_token)
        text = tokenizer_file(where).read_text(encoding="utf-8")
    except (FileNotFoundError, TokenizerError) as exc:
        raise DataError(str(exc)) from None
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise DataError(f"tokenizer {where}: cannot be loaded ({exc})") from None
    if found.eos_id is None:
        raise DataError(
            f"tokenizer {where} has no eos token to end documents with: no eos_token in "
            f"tokenizer_config.json or special_tokens_map.json beside it, and none of "
            f"{', '.join(EOS_SPELLINGS)} in its vocabulary; pass --eos-token TEXT (Python: "
            "eos_token=) naming the token that ends a document")
    meta = {"hash": tokenizer_hash(tok), "vocab_size": tok.get_vocab_size(),
            "eos_id": found.eos_id, "eos": found.eos, "eos_from": found.eos_from,
            "bos_id": found.bos_id, "bos": found.bos,
            "name": os.path.basename(os.path.normpath(str(where)))}
    return tok, meta, text


def _decodable(sources: Sequence[SourceFile], encodings: dict[str, str],
               report: PrepareReport) -> list[SourceFile]:
    """The sources that decode; each txt file that does not is named in ``report`` and
    left out whole (a txt file is one document, and it is checked before any of it is
    tokenized). A jsonl record that does not decode is skipped on its own, as bad records
    are."""
    kept = []
    for source in sources:
        why = undecodable(source, encodings[source.url]) if source.format == "txt" else None
        if why is None:
            kept.append(source)
        else:
            report.undecodable.append(f"{source.url}: {why}")
    return kept


def _check_splits(domain: str, todo: Sequence[SourceFile], before: Any, router: SplitRouter,
                  fraction: float) -> None:
    """Refuse (before the commit) a run that leaves a split of the domain empty."""
    if not router.pieces["train"] + router.pieces["heldout"]:
        raise DataError(f"{_names(todo)}: no documents (the input is empty or every record "
                        f"is blank); nothing was added to domain {domain!r}")
    train = (before.tokens("train") if before else 0) + router.tokens["train"]
    heldout = (before.tokens("heldout") if before else 0) + router.tokens["heldout"]
    total = router.tokens["train"] + router.tokens["heldout"]
    if not train:
        raise DataError(f"{_names(todo)}: every document fell in the held-out split, which "
                        f"would leave domain {domain!r} nothing to train on; lower "
                        f"--held-out-fraction (now {fraction}) or give more documents")
    if fraction > 0 and not heldout:
        raise DataError(
            f"{_names(todo)}: {total:,} tokens are too few to hold out a window of "
            f"{HELDOUT_WINDOW_TOKENS} tokens and train on the rest, so domain {domain!r} "
            "would have no held-out split; give more text, or pass --held-out-fraction 0 "
            "(and train with val_windows_per_domain=0)")


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
    eos_token: str | None = None,
    on_error: Literal["stop", "skip"] = "stop",
    encoding: str = DEFAULT_ENCODING,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    batch_chars: int = 4 << 20,
    piece_chars: int = TXT_PIECE_CHARS,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> PrepareReport:
    """Tokenize ``inputs`` into ``domain`` of the store at ``output``; see the module doc.

    Raises ``DataError`` (and changes nothing) for bad input, and for a run that would leave
    the domain without training tokens, or without held-out tokens when
    ``held_out_fraction > 0``; an input without documents adds nothing and raises too.

    Args:
        inputs: file, glob, directory or fsspec URL; on the command line --input, repeat for
            more
        domain: domain name (a group of the store)
        output: store path or URL
        tokenizer: tokenizer.json, or a directory in the Hugging Face from_pretrained layout
            (tokenizer.json + tokenizer_config.json / special_tokens_map.json); default: the
            bundled one
        fmt: input format (on the command line --format; default: by extension); applies to
            every file of a directory input too
        text_field: jsonl field / parquet column holding the text
        quality_field: optional numeric field / column stored as per-document quality
        language: language tag (default: the domain name's prefix when it is a two-letter
            code or 'code', e.g. en_prose -> en; else unknown)
        held_out_fraction: fraction of documents (or, for one or a few large documents, of
            token windows) kept for validation
        eos_token: the token that ends each document (default: the tokenizer configuration's
            eos_token, else </s>, <|endoftext|>, ...)
        on_error: a corrupt record, or a txt file that does not decode: stop naming file
            and line, or skip and count (named in the summary)
        encoding: the text encoding of the inputs: utf-8, another Python codec (latin-1,
            cp1252, ...), or auto (detected per file by charset-normalizer); jsonl needs
            one that keeps ASCII's newline byte
        chunk_tokens: tokens per zarr chunk of a new domain
        batch_chars: characters of text tokenized per batch
        piece_chars: a txt document is read in pieces of about this many characters
        storage_options: fsspec options for remote inputs/outputs (JSON on the command line)
        progress: show progress bars
    """
    check_domain_name(domain)
    if not 0 <= held_out_fraction < 1:
        raise DataError(f"held-out fraction must be in [0, 1), got {held_out_fraction}")
    if on_error not in ("stop", "skip"):
        raise DataError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    check_encoding(encoding)
    tok, meta, tokenizer_json = _resolve_tokenizer(tokenizer, eos_token)
    sources = find_sources([inputs] if isinstance(inputs, str) else list(inputs), fmt,
                           storage_options)
    report = PrepareReport(str(output), domain)
    with DomainWriter(output, domain, tokenizer=meta, language=language or "",
                      chunk_tokens=chunk_tokens, with_quality=quality_field is not None,
                      storage_options=storage_options,
                      tokenizer_json=tokenizer_json) as writer:
        if not language and writer.info is None:
            writer.language = guess_language(domain)
        report.language = writer.language
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
        encodings = {s.url: resolve_encoding(s, encoding) for s in todo}
        if on_error == "skip":
            todo = _decodable(todo, encodings, report)
        if not todo:
            writer.record_tokenizer()
            writer.abort()
            return report
        before = writer.info
        plan = plan_split((r for s in todo for r in read_records(s)), held_out_fraction,
                          domain_has_heldout=bool(before and before.documents("heldout")))
        router = SplitRouter(writer, plan, held_out_fraction, meta["eos_id"])
        bar = tqdm(total=sum(s.size for s in todo), unit="B", unit_scale=True,
                   desc=f"prepare {domain}", disable=not progress)
        stats: list[SourceStats] = []
        with bar:
            for source in todo:
                stats.append(_tokenize(source, router, tok, text_field=text_field,
                                       quality_field=quality_field, on_error=on_error,
                                       batch_chars=batch_chars, piece_chars=piece_chars,
                                       progress=bar, encoding=encodings[source.url],
                                       tokens_before=report.tokens))
            router.finish()
        _check_splits(domain, todo, before, router, held_out_fraction)
        for source, stat in zip(todo, stats):
            counts = router.by_source.get(source.sha256, {})
            record = {"path": source.url, "sha256": source.sha256, "bytes": source.size,
                      "format": source.format, "encoding": encodings[source.url],
                      "held_out_fraction": held_out_fraction,
                      "split": plan.mode,
                      "documents": stat.documents, "tokens": stat.tokens,
                      "heldout_documents": counts.get("heldout_pieces", 0),
                      "heldout_tokens": counts.get("heldout", 0),
                      "empty_documents": stat.empty_documents,
                      "bad_records": stat.bad_records,
                      "bad_examples": stat.bad_examples}
            writer.add_source(record)
            report.added.append(record)
        report.split_mode = plan.mode
        report.split_tokens = dict(router.tokens)
        report.split_pieces = dict(router.pieces)
        report.split_parts = dict(router.parts)
        after = writer.commit()
        report.heldout_documents = after.documents("heldout")
        report.domain_tokens = {split: after.tokens(split) for split in SPLITS}
    return report

