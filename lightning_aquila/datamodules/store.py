"""The shard store: a zarr v3 hierarchy holding each domain's token stream.

Layout (the full description is ``docs/data-format.md``)::

    STORE/zarr.json                    root group; attrs["lightning_aquila"] is the manifest
    STORE/<domain>/zarr.json           domain group; its attrs are the domain's committed state
    STORE/<domain>/<split>/<segment>/  one immutable segment per ``prepare`` run and split
        tokens   uint32 [tokens]       documents' token ids, eos after each document
        offsets  int64  [documents+1]  where each document starts inside the segment
        quality  float32 [documents]   optional score per document (NaN where unknown)

Segments exist so that nothing committed is ever rewritten: a ``prepare`` run writes new
segments, then commits them by rewriting the domain's attributes (one metadata object, which
zarr's local store writes by rename and object stores write in one PUT). A crash before that
leaves segments no attribute lists; readers never see them and the next writer deletes them.

Why this file is long: it is the one place that knows the on-disk format. The reader
(``ShardStore``, ``TokenStream``) and the writer (``DomainWriter``, ``SegmentWriter``) share
the layout, the manifest checks and the errors that name a damaged chunk, and a format change
must touch both sides in one diff. What sits on top of the format lives elsewhere:
``split.py`` (the held-out rule), ``sources.py``/``prepare.py`` (reading and tokenizing
input), ``edit.py`` (removing a domain).
"""

from __future__ import annotations

import itertools
import json
import math
import re
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync
from zarr.storage import FsspecStore, LocalStore

FORMAT_NAME = "lightning-aquila-shards"
FORMAT_VERSION = 1
MANIFEST_KEY = "lightning_aquila"
SPLITS = ("train", "heldout")
#: 256 Ki tokens = 1 MiB per decompressed chunk: large enough that decompression runs at
#: >100 M tokens/s, small enough that the loader's chunk cache holds a few per domain.
DEFAULT_CHUNK_TOKENS = 1 << 18
OFFSETS_CHUNK = 1 << 16
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class DataError(ValueError):
    """Bad data or a bad data request; the message names the store, domain, file or value."""


def codecs() -> list[Any]:
    """Compression for token arrays: byte-shuffled zstd (small ids leave high bytes empty),
    then a CRC32C so that a corrupt chunk fails loudly instead of decoding into wrong ids."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


def check_domain_name(name: str) -> str:
    if not isinstance(name, str) or not _DOMAIN_NAME.match(name) or name in SPLITS:
        raise DataError(
            f"invalid domain name {name!r}: use letters, digits, '_', '-', '.' "
            f"(at most 128 characters, not {SPLITS})"
        )
    return name


def zarr_store(url: str, *, read_only: bool, storage_options: Mapping[str, Any] | None = None):
    """The zarr store behind a URL: a local path or ``file://`` URL becomes a ``LocalStore``
    (atomic writes by rename, which the commit relies on); anything else (``memory://``,
    ``s3://``, ``gs://``, ...) goes through fsspec."""
    url = str(url)
    if "://" not in url or url.startswith("file://"):
        return LocalStore(url.removeprefix("file://"), read_only=read_only)
    return FsspecStore.from_url(url, storage_options=dict(storage_options or {}),
                                read_only=read_only)


def storage_options_from_json(text: str | None) -> dict[str, Any]:
    """``--storage-options`` of the data commands: a JSON object, or nothing."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"--storage-options is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise DataError("--storage-options must be a JSON object")
    return value


# -- metadata -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One committed, immutable piece of a split."""

    id: str
    tokens: int
    documents: int
    max_token_id: int


@dataclass(frozen=True)
class DomainInfo:
    """A domain's committed metadata (its group's attributes)."""

    name: str
    language: str
    tokenizer: dict[str, Any]
    sources: tuple[dict[str, Any], ...]
    segments: dict[str, tuple[Segment, ...]]
    has_quality: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def tokens(self, split: str = "train") -> int:
        return sum(s.tokens for s in self.segments.get(split, ()))

    def documents(self, split: str = "train") -> int:
        return sum(s.documents for s in self.segments.get(split, ()))

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens(split) for split in SPLITS)

    @property
    def total_documents(self) -> int:
        return sum(self.documents(split) for split in SPLITS)

    @property
    def max_token_id(self) -> int:
        return max((s.max_token_id for split in SPLITS for s in self.segments.get(split, ())),
                   default=-1)

    @property
    def tokenizer_hash(self) -> str:
        return str(self.tokenizer.get("hash", ""))

    def to_attrs(self) -> dict[str, Any]:
        return {
            "domain": self.name,
            "language": self.language,
            "tokenizer": dict(self.tokenizer),
            "sources": [dict(s) for s in self.sources],
            "segments": {split: [asdict(s) for s in segs] for split, segs in self.segments.items()},
            "has_quality": self.has_quality,
            # Summaries for people and tools reading zarr.json directly; readers recompute.
            "tokens": {split: self.tokens(split) for split in SPLITS},
            "documents": {split: self.documents(split) for split in SPLITS},
            "max_token_id": self.max_token_id,
            **self.extra,
        }

    @classmethod
    def from_attrs(cls, where: str, attrs: Mapping[str, Any]) -> DomainInfo:
        try:
            if sorted(attrs["segments"]) != sorted(SPLITS):
                raise ValueError(f"segments are listed for splits {sorted(attrs['segments'])}, "
                                 f"not {list(SPLITS)}")
            segments = {
                split: tuple(_segment(s) for s in attrs["segments"][split]) for split in SPLITS
            }
            known = {"domain", "language", "tokenizer", "sources", "segments", "has_quality",
                     "tokens", "documents", "max_token_id"}
            info = cls(
                name=str(attrs["domain"]),
                language=str(attrs["language"]),
                tokenizer=dict(attrs["tokenizer"]),
                sources=tuple(dict(s) for s in attrs["sources"]),
                segments=segments,
                has_quality=bool(attrs.get("has_quality", False)),
                extra={k: v for k, v in attrs.items() if k not in known},
            )
            # The summaries are written with the segment list: a disagreement is damage (a
            # flipped count, a dropped segment), which the chunk checksums cannot see.
            for key, count in (("tokens", info.tokens), ("documents", info.documents)):
                summary = {split: count(split) for split in SPLITS}
                if key in attrs and attrs[key] != summary:
                    raise ValueError(f"the {key} summary {attrs[key]!r} disagrees with the "
                                     f"segment list ({summary})")
            return info
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DataError(
                f"{where}: domain metadata is incomplete or malformed ({exc!r})"
            ) from None


def _segment(entry: Mapping[str, Any]) -> Segment:
    """A segment from its attribute entry; wrong types are a ``TypeError`` (-> DataError)."""
    segment = Segment(**entry)
    if not isinstance(segment.id, str) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= low
            for n, low in ((segment.tokens, 0), (segment.documents, 0),
                           (segment.max_token_id, -1))):
        raise TypeError(f"segment entry {dict(entry)!r} does not hold an id and counts")
    return segment


def checked_manifest(url: str, manifest: Any, verb: str) -> dict[str, Any]:
    """The manifest with ``format``, ``version`` and ``domains`` checked (metadata has no
    checksum, so a damaged one must fail here, naming the store, not later as a
    ``TypeError``)."""
    if not isinstance(manifest, Mapping) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{url!r} is a zarr group but not a lightning-aquila shard store (no "
                        "manifest in its attributes)")
    version, names = manifest.get("version"), manifest.get("domains")
    if not isinstance(version, int) or not isinstance(names, list) or not all(
            isinstance(name, str) for name in names):
        raise DataError(f"shard store {url!r}: the manifest is malformed "
                        f"(version {version!r}, domains {names!r})")
    if version > FORMAT_VERSION:
        raise DataError(f"shard store {url!r} has format version {version}; this "
                        f"lightning-aquila {verb} up to {FORMAT_VERSION}")
    return {**manifest, "version": version, "domains": names}


def _damaged(where: str, what: str, exc: Exception) -> DataError:
    return DataError(f"{where}: the metadata of {what} cannot be read ({type(exc).__name__}: "
                     f"{exc}); the store is damaged")


# -- reading --------------------------------------------------------------------------------
class ShardStore:
    """A shard store opened for reading: the manifest and each domain's committed metadata.

    Opening reads metadata only (a few small JSON objects); token chunks are read by
    ``TokenStream`` on demand, so this is cheap enough to do in every process.
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        try:
            self._root = zarr.open_group(
                zarr_store(self.url, read_only=True, storage_options=self.storage_options),
                mode="r",
            )
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as exc:
            raise DataError(f"no shard store at {self.url!r} ({type(exc).__name__}); "
                            "build one with `lightning-aquila prepare`") from None
        except Exception as exc:  # zarr raises JSON, codec and validation errors of many types
            raise _damaged(f"shard store {self.url!r}", "the root group (zarr.json)",
                           exc) from None
        names = checked_manifest(self.url, self._root.attrs.get(MANIFEST_KEY), "reads")["domains"]
        self.domains: dict[str, DomainInfo] = {}
        for name in names:
            where = f"shard store {self.url!r}, domain {name!r}"
            try:
                group = self._root[name]
            except KeyError:
                raise DataError(f"shard store {self.url!r}: the manifest lists domain {name!r} "
                                "but its group is missing") from None
            except Exception as exc:
                raise _damaged(where, "its group", exc) from None
            if not isinstance(group, zarr.Group):
                raise DataError(f"{where}: {name!r} is not a group")
            self.domains[name] = DomainInfo.from_attrs(where, group.attrs.asdict())

    def where(self, domain: str, split: str | None = None, segment: str | None = None) -> str:
        parts = [f"shard store {self.url!r}", f"domain {domain!r}"]
        if split:
            parts.append(f"split {split!r}")
        if segment:
            parts.append(f"segment {segment!r}")
        return ", ".join(parts)

    def info(self, domain: str) -> DomainInfo:
        if domain not in self.domains:
            raise DataError(f"shard store {self.url!r} has no domain {domain!r}; "
                            f"it has {sorted(self.domains)}")
        return self.domains[domain]

    def array(self, domain: str, split: str, segment: str, name: str) -> zarr.Array:
        node = self._array(domain, split, segment, name)
        if node is None:
            raise DataError(f"{self.where(domain, split, segment)}: array {name!r} is "
                            "missing")
        return node

    def _array(self, domain: str, split: str, segment: str, name: str) -> zarr.Array | None:
        """The array, or ``None`` when it does not exist; damaged metadata is a DataError."""
        where = self.where(domain, split, segment)
        try:
            node = self._root[f"{domain}/{split}/{segment}/{name}"]
        except KeyError:
            return None
        except Exception as exc:
            raise _damaged(where, f"array {name!r}", exc) from None
        if not isinstance(node, zarr.Array):
            raise DataError(f"{where}: {name!r} is not an array")
        if len(node.shape) != 1 or len(node.chunks) != 1 or node.chunks[0] < 1:
            raise DataError(f"{where}: array {name!r} has shape {node.shape} in chunks "
                            f"{node.chunks}, not one dimension")
        return node

    def stream(self, domain: str, split: str = "train", *, cache_chunks: int = 16) -> TokenStream:
        info = self.info(domain)
        segments = info.segments.get(split, ())
        arrays = [self.array(domain, split, s.id, "tokens") for s in segments]
        return TokenStream(self, domain, split, segments, arrays, cache_chunks=cache_chunks)

    def verify(self, domains: Sequence[str] | None = None, *, full: bool = False) -> None:
        """Check that every array a reader needs exists with its committed length and that
        every chunk is in storage (zarr would silently read a missing chunk as zeros).
        ``full`` also decodes every chunk of every array (tokens, offsets, quality), which
        catches corruption (CRC32C) up front."""
        for name in domains if domains is not None else list(self.domains):
            info = self.info(name)
            for split in SPLITS:
                for seg in info.segments.get(split, ()):
                    where = self.where(name, split, seg.id)
                    tokens = self.array(name, split, seg.id, "tokens")
                    offsets = self.array(name, split, seg.id, "offsets")
                    if tokens.shape != (seg.tokens,):
                        raise DataError(f"{where}: tokens array has shape {tokens.shape}, "
                                        f"the metadata says {seg.tokens} tokens")
                    if offsets.shape != (seg.documents + 1,):
                        raise DataError(f"{where}: offsets array has shape {offsets.shape}, "
                                        f"the metadata says {seg.documents} documents")
                    arrays = [tokens, offsets]
                    quality = self._array(name, split, seg.id, "quality")
                    if quality is not None:  # segments written before quality was on lack it
                        arrays.append(quality)
                    for array in arrays:
                        missing = missing_chunks(array)
                        if missing:
                            raise DataError(
                                f"{where}: {len(missing)} chunk(s) of {array.basename!r} are "
                                f"missing from storage: {missing[:5]}"
                            )
                    if full:
                        for array in arrays:
                            for index in range(array.nchunks):
                                read_chunk(array, index, where)


def read_chunk(array: zarr.Array, index: int, where: str, stop: int | None = None) -> np.ndarray:
    """Chunk ``index`` of a 1-D array (up to element ``stop``), decoded; any failure (a
    CRC32C mismatch, a chunk that does not decompress) is a ``DataError`` naming it."""
    size = array.chunks[0]
    end = min((index + 1) * size, array.shape[0] if stop is None else stop)
    try:
        return np.asarray(array[index * size:end])
    except Exception as exc:  # zarr raises codec/IO-specific types; name the chunk
        raise DataError(
            f"{where}: chunk c/{index} of {array.basename!r} could not be read "
            f"({type(exc).__name__}: {exc}); the store is corrupt - rebuild this domain with "
            "`lightning-aquila prepare`"
        ) from exc


def missing_chunks(array: zarr.Array) -> list[str]:
    """Keys of the chunks of ``array`` that are not in storage."""
    expected = [f"c/{i}" for i in range(math.ceil(array.shape[0] / array.chunks[0]))]
    if not expected:
        return []
    store_path = array.store_path

    async def listing() -> set[str]:
        prefix = f"{store_path.path}/" if store_path.path else ""
        return {key[len(prefix):] async for key in store_path.store.list_prefix(prefix)}

    present = sync(listing())
    return [key for key in expected if key not in present]


class TokenStream:
    """One split of one domain as a single flat sequence of token ids.

    Reads go through an LRU cache of decompressed chunks: training windows are small next to
    a chunk, and the sampler's draw order visits a few chunks at a time, so each chunk is
    decompressed about once per visit instead of once per window.
    """

    def __init__(self, store: ShardStore, domain: str, split: str,
                 segments: Sequence[Segment], arrays: Sequence[zarr.Array], *,
                 cache_chunks: int = 16) -> None:
        self.store, self.domain, self.split = store, domain, split
        self.segments = tuple(segments)
        self.arrays = list(arrays)
        lengths = np.array([s.tokens for s in self.segments], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.n_tokens = int(self.starts[-1])
        self.cache_chunks = max(1, int(cache_chunks))
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        for seg, array in zip(self.segments, self.arrays):
            if array.shape[0] < seg.tokens:
                raise DataError(f"{store.where(domain, split, seg.id)}: tokens array holds "
                                f"{array.shape[0]} tokens, the metadata says {seg.tokens}")

    def windows(self, seq_len: int) -> int:
        """How many training windows of ``seq_len + 1`` tokens (stride ``seq_len``) fit."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def chunk(self, segment: int, index: int) -> np.ndarray:
        key = (segment, index)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        array, seg = self.arrays[segment], self.segments[segment]
        data = read_chunk(array, index, self.store.where(self.domain, self.split, seg.id),
                          stop=seg.tokens)
        self._cache[key] = data
        if len(self._cache) > self.cache_chunks:
            self._cache.popitem(last=False)
        return data

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream, written into ``out`` if given."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise DataError(f"{self.store.where(self.domain, self.split)}: read [{start}, {stop}) "
                            f"outside the stream of {self.n_tokens} tokens")
        if out is None:
            out = np.empty(stop - start, dtype=np.uint32)
        pos, filled = start, 0
        while pos < stop:
            segment = int(np.searchsorted(self.starts, pos, side="right")) - 1
            local = pos - int(self.starts[segment])
            size = self.arrays[segment].chunks[0]
            index, offset = divmod(local, size)
            data = self.chunk(segment, index)
            take = min(len(data) - offset, stop - pos)
            out[filled:filled + take] = data[offset:offset + take]
            pos += take
            filled += take
        return out


# -- writing --------------------------------------------------------------------------------
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

    def __init__(self, group: zarr.Group, *, chunk_tokens: int, with_quality: bool) -> None:
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
        self.offsets.extend(np.zeros(1, dtype=np.int64))
        self.documents = 0
        self.max_token_id = -1

    def extend(self, tokens: np.ndarray) -> None:
        """Tokens of the current document (a document may arrive in several parts)."""
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
            self.tokens.extend(tokens)

    def end_document(self, quality: float | None = None) -> None:
        self.documents += 1
        self.offsets.extend(np.array([self.tokens.count], dtype=np.int64))
        if self.quality is not None:
            self.quality.extend(np.array([np.nan if quality is None else quality]))

    def close(self) -> Segment:
        for appender in (self.tokens, self.offsets, self.quality):
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
                 storage_options: Mapping[str, Any] | None = None) -> None:
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
            raise _damaged(where, "the store or the domain", exc) from None
        self.tokenizer = dict(tokenizer)
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
                                                 with_quality=self.with_quality)
        return self._writers[split]

    def extend(self, split: str, tokens: np.ndarray) -> None:
        self.writer(split).extend(tokens)

    def end_document(self, split: str, quality: float | None = None) -> None:
        self.writer(split).end_document(quality)

    def add_document(self, split: str, tokens: np.ndarray, quality: float | None = None) -> None:
        """A whole document (its tokens should end with eos)."""
        self.extend(split, tokens)
        self.end_document(split, quality)

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
            extra=self.info.extra if self.info else {},
        )
        self.group.attrs.put(info.to_attrs())
        manifest = self._manifest()
        if self.domain not in manifest["domains"]:
            manifest["domains"] = [*manifest["domains"], self.domain]
            self.root.attrs[MANIFEST_KEY] = manifest
        self._done = True
        return info

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


def iter_documents(store: ShardStore, domain: str, split: str = "train") -> Iterator[np.ndarray]:
    """Each document's tokens (eos included), in store order; for tools and tests."""
    stream = store.stream(domain, split)
    for seg_index, seg in enumerate(store.info(domain).segments.get(split, ())):
        array = store.array(domain, split, seg.id, "offsets")
        where = store.where(domain, split, seg.id)
        offsets = np.concatenate([read_chunk(array, i, where) for i in range(array.nchunks)]
                                 or [np.zeros(0, dtype=np.int64)])
        base = int(stream.starts[seg_index])
        for begin, end in itertools.pairwise(offsets):
            yield stream.read(base + int(begin), base + int(end))
