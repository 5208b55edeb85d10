"""Writing a shard store: ``DomainWriter`` adds sources to one domain as new segments
(``SegmentWriter`` each), then commits them in one metadata write; leaving it without the
commit deletes what it wrote. It refuses, before changing anything, a store or domain it
cannot read, another tokenizer or eos id, and damaged metadata that names segments wrongly.

The format is ``shard_format.py``; reading is ``store.py``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from lightning_aquila.datamodules.shard_format import (
    DEFAULT_CHUNK_TOKENS,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_KEY,
    OFFSETS_CHUNK,
    SPLITS,
    UNASSIGNED_PART,
    DataError,
    DomainInfo,
    Segment,
    check_domain_name,
    checked_manifest,
    codecs,
    damaged,
    zarr_store,
)
from lightning_aquila.datamodules.store_tokenizer import write_tokenizer_copy


class _ArrayAppender:
    """Buffers values and appends them to a 1-D zarr array one whole chunk at a time, so
    no chunk is written twice."""

    def __init__(self, array: zarr.Array) -> None:
        self.array = array
        self.chunk = array.chunks[0]
        self.buffer = np.empty(self.chunk, dtype=array.dtype)
        self.filled = 0
        self.count = 0

    def extend(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=self.array.dtype)
        while len(values):
            take = min(self.chunk - self.filled, len(values))
            self.buffer[self.filled:self.filled + take] = values[:take]
            self.filled += take
            self.count += take
            values = values[take:]
            if self.filled == self.chunk:
                self.flush()

    def flush(self) -> None:
        if self.filled:
            self.array.append(self.buffer[:self.filled])
            self.filled = 0


class SegmentWriter:
    """Writes one new segment of one split; documents are appended, then ``close``d."""

    def __init__(self, group: zarr.Group, *, chunk_tokens: int, with_quality: bool,
                 with_part: bool = False) -> None:
        self.group = group
        config = {"write_empty_chunks": True}  # a missing chunk must always mean damage
        self.tokens = _ArrayAppender(group.create_array(
            "tokens", shape=(0,), chunks=(chunk_tokens,), dtype="uint32",
            compressors=codecs(), config=config))
        self.offsets = _ArrayAppender(group.create_array(
            "offsets", shape=(0,), chunks=(OFFSETS_CHUNK,), dtype="int64",
            compressors=codecs(), config=config))
        self.quality = _ArrayAppender(group.create_array(
            "quality", shape=(0,), chunks=(OFFSETS_CHUNK,), dtype="float32",
            compressors=codecs(), config=config)) if with_quality else None
        self.part = _ArrayAppender(group.create_array(
            "part", shape=(0,), chunks=(OFFSETS_CHUNK,), dtype="uint8",
            compressors=codecs(), config=config)) if with_part else None
        self.offsets.extend(np.zeros(1, dtype=np.int64))
        self.documents = 0
        self.max_token_id = -1

    def extend(self, tokens: np.ndarray) -> None:
        """Tokens of the current document (a document may arrive in several parts)."""
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
            self.tokens.extend(tokens)

    def end_document(self, quality: float | None = None, part: int | None = None) -> None:
        """Ends the current document; ``part`` (0 dev, 1 test) for a held-out one, where
        the segment records parts (none given: ``UNASSIGNED_PART``, which readers assign
        as they do documents of segments written before parts were recorded)."""
        self.documents += 1
        self.offsets.extend(np.array([self.tokens.count], dtype=np.int64))
        if self.quality is not None:
            self.quality.extend(np.array([np.nan if quality is None else quality]))
        if self.part is not None:
            self.part.extend(np.array([UNASSIGNED_PART if part is None else part],
                                      dtype=np.uint8))

    def close(self) -> Segment:
        for appender in (self.tokens, self.offsets, self.quality, self.part):
            if appender is not None:
                appender.flush()
        return Segment(self.group.basename, self.tokens.count, self.documents, self.max_token_id)


class DomainWriter:
    """Adds sources to one domain of a store: new segments, then one commit.

    Use as a context manager; leaving it with an exception (or without ``commit``) deletes the
    segments it wrote, so a failed run leaves the store as it was. One writer per store at a
    time: the manifest update is a read-modify-write.
    """

    def __init__(self, url: str, domain: str, *, tokenizer: Mapping[str, Any], language: str,
                 chunk_tokens: int = DEFAULT_CHUNK_TOKENS, with_quality: bool = False,
                 storage_options: Mapping[str, Any] | None = None,
                 tokenizer_json: str | None = None) -> None:
        self.url, self.domain = str(url), check_domain_name(domain)
        self.chunk_tokens = int(chunk_tokens)
        if self.chunk_tokens <= 0:
            raise DataError(f"chunk_tokens must be positive, got {chunk_tokens}")
        where = f"shard store {self.url!r}, domain {self.domain!r}"
        try:
            self._open(where, tokenizer, language, storage_options)
        except DataError:
            raise
        except Exception as exc:  # zarr's JSON, codec and validation errors of many types
            raise damaged(where, "the store or the domain", exc) from None
        self.tokenizer = dict(tokenizer)
        #: the tokenizer.json text, stored beside the domains at the commit
        self.tokenizer_json = tokenizer_json
        self.language = language or (self.info.language if self.info else "unknown")
        self.with_quality = with_quality or bool(self.info and self.info.has_quality)
        self.sources: list[dict[str, Any]] = []
        self._writers: dict[str, SegmentWriter] = {}
        self._segment_id = f"{self._next_segment_number():06d}-{uuid.uuid4().hex[:8]}"
        self._done = False

    def _open(self, where: str, tokenizer: Mapping[str, Any], language: str,
              storage_options: Mapping[str, Any] | None) -> None:
        """Open (or create) the store and the domain; checks before anything is changed."""
        store = zarr_store(self.url, read_only=False, storage_options=storage_options)
        try:  # not mode="a": zarr would write a new, empty group over an unreadable one
            self.root = zarr.open_group(store, mode="r+")
        except (zarr.errors.GroupNotFoundError, FileNotFoundError, KeyError):
            if not sync(store.is_empty("")):
                raise DataError(f"{where}: the store's root group (zarr.json) is missing or "
                                "unreadable but the store holds data; it is damaged or not a "
                                "shard store, so nothing is written to it") from None
            self.root = zarr.open_group(store, mode="w-")
        manifest = self.root.attrs.get(MANIFEST_KEY)
        if manifest is None:
            if any(True for _ in self.root.members()):
                raise DataError(f"{self.url!r} is a non-empty zarr group that is not a "
                                "lightning-aquila shard store; choose another --output")
            self.root.attrs[MANIFEST_KEY] = {"format": FORMAT_NAME, "version": FORMAT_VERSION,
                                             "domains": []}
            manifest = self.root.attrs[MANIFEST_KEY]
        listed = self.domain in checked_manifest(self.url, manifest, "writes")["domains"]
        if listed:
            self.group = self.root[self.domain]
            self.info: DomainInfo | None = DomainInfo.from_attrs(where, self.group.attrs.asdict())
            if self.info.tokenizer_hash != tokenizer.get("hash"):
                raise DataError(
                    f"{where} was prepared with tokenizer {self.info.tokenizer_hash}, not "
                    f"{tokenizer.get('hash')}; a domain's tokens must all come from one tokenizer"
                )
            old_eos, new_eos = self.info.tokenizer.get("eos_id"), tokenizer.get("eos_id")
            if old_eos is not None and new_eos is not None and old_eos != new_eos:
                raise DataError(f"{where} ends its documents with eos id {old_eos}, not "
                                f"{new_eos}; pass the same --eos-token as before")
            if language and language != self.info.language:
                raise DataError(f"{where} has language {self.info.language!r}, not {language!r}")
            self._delete_uncommitted(where)
        else:
            if self.domain in self.root:  # left by a run that crashed before its commit
                del self.root[self.domain]
            self.group = self.root.create_group(self.domain)
            self.info = None

    # The manifest is re-read before each use: another domain may have been committed since.
    def _manifest(self) -> dict[str, Any]:
        return checked_manifest(
            self.url, zarr.open_group(self.root.store, mode="r").attrs[MANIFEST_KEY], "writes")

    def _next_segment_number(self) -> int:
        if self.info is None:
            return 0
        return sum(len(segs) for segs in self.info.segments.values())

    def _delete_uncommitted(self, where: str) -> None:
        """Delete the segments of runs that crashed before their commit. Only when every
        committed segment is there: damaged metadata that names segments wrongly must not
        make a writer delete data."""
        assert self.info is not None
        present = {split: set(self.group[split].keys()) if split in self.group else set()
                   for split in SPLITS}
        for split in SPLITS:
            lost = [s.id for s in self.info.segments.get(split, ()) if s.id not in present[split]]
            if lost:
                raise DataError(f"{where}: committed segment(s) {lost} of split {split!r} are "
                                "missing; the store is damaged, so nothing is written to it")
        for split in SPLITS:
            committed = {s.id for s in self.info.segments.get(split, ())}
            for name in sorted(present[split] - committed):
                del self.group[split][name]

    @property
    def known_hashes(self) -> set[str]:
        return {str(s.get("sha256")) for s in self.info.sources} if self.info else set()

    def writer(self, split: str) -> SegmentWriter:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; splits are {SPLITS}")
        if split not in self._writers:
            group = self.group.require_group(split).create_group(self._segment_id)
            self._writers[split] = SegmentWriter(group, chunk_tokens=self.chunk_tokens,
                                                 with_quality=self.with_quality,
                                                 with_part=split == "heldout")
        return self._writers[split]

    def extend(self, split: str, tokens: np.ndarray) -> None:
        self.writer(split).extend(tokens)

    def end_document(self, split: str, quality: float | None = None,
                     part: int | None = None) -> None:
        self.writer(split).end_document(quality, part)

    def add_document(self, split: str, tokens: np.ndarray, quality: float | None = None,
                     part: int | None = None) -> None:
        """A whole document (its tokens should end with eos); ``part`` as in
        ``SegmentWriter.end_document``."""
        self.extend(split, tokens)
        self.end_document(split, quality, part)

    def add_source(self, record: Mapping[str, Any]) -> None:
        self.sources.append(dict(record))

    def commit(self) -> DomainInfo:
        """Make the new segments visible: domain attributes first, then the manifest."""
        segments = {split: list(self.info.segments.get(split, ())) if self.info else []
                    for split in SPLITS}
        for split, writer in self._writers.items():
            segment = writer.close()
            if segment.documents:
                segments[split].append(segment)
        info = DomainInfo(
            name=self.domain,
            language=self.language,
            tokenizer=self.tokenizer,
            sources=(self.info.sources if self.info else ()) + tuple(self.sources),
            segments={split: tuple(segs) for split, segs in segments.items()},
            has_quality=self.with_quality,
            # attached scores stay; the new segments have no column and read as NaN
            scores=self.info.scores if self.info else {},
            extra=self.info.extra if self.info else {},
        )
        if self.tokenizer_json is not None:  # before the domain that names its hash
            write_tokenizer_copy(self.root, self.tokenizer, self.tokenizer_json)
        self.group.attrs.put(info.to_attrs())
        manifest = self._manifest()
        if self.domain not in manifest["domains"]:
            manifest["domains"] = [*manifest["domains"], self.domain]
            self.root.attrs[MANIFEST_KEY] = manifest
        self._done = True
        return info

    def record_tokenizer(self) -> None:
        """Store the tokenizer copy now, for a run that adds nothing to an existing domain:
        re-running ``prepare`` is how a store from before the copies gets one."""
        if self.tokenizer_json is not None and self.info is not None:
            write_tokenizer_copy(self.root, self.tokenizer, self.tokenizer_json)

    def abort(self) -> None:
        for split, writer in self._writers.items():
            del self.group[split][writer.group.basename]
        if self.info is None and self.domain in self.root:
            del self.root[self.domain]
        self._done = True

    def __enter__(self) -> DomainWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._done:
            self.abort()



__all__ = ["DomainWriter", "SegmentWriter"]
