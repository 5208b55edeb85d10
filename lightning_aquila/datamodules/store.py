"""The shard store, opened for reading: ``ShardStore`` (the manifest, each domain's committed
metadata, ``verify``) and ``TokenStream`` (one split of one domain as a flat token sequence,
read chunk by chunk through a small cache). Every failure to read names the store, domain,
split, segment and chunk. Every read goes through the store's ``StorageRetry``
(``storage_retry.py``): an unreachable store is waited for, not taken for a damaged one.

The format they read is ``shard_format.py``; writing is ``writer.py``. What sits on top of the
format lives elsewhere: ``split.py`` (the held-out rule), ``sources.py``/``prepare.py``
(reading and tokenizing input), ``edit.py`` (removing a domain).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from lightning_aquila.datamodules.shard_format import (
    MANIFEST_KEY,
    SPLITS,
    UNASSIGNED_PART,
    DataError,
    DomainInfo,
    Segment,
    checked_manifest,
    damaged,
    zarr_store,
)
from lightning_aquila.datamodules.split import PARTS, heldout_part
from lightning_aquila.datamodules.storage_retry import NO_RETRY, StorageRetry, transient


@contextmanager
def _damage_unless_transient(damage: Callable[[Exception], DataError], *,
                             chained: bool = False) -> Iterator[None]:
    """An error of the body is the store's damage, raised as ``damage(error)`` (a
    ``DataError`` that names what could not be read: zarr raises JSON, codec and validation
    errors of many types), except two, raised as they are: one that says the store is
    unreachable (:func:`transient`), which ``StorageRetry`` waits out, and a ``DataError``
    of the body's own, which already says what is wrong. ``chained``: keep the error as the
    cause (a chunk's codec error), rather than hide it."""
    try:
        yield
    except DataError:
        raise
    except Exception as exc:
        if transient(exc):
            raise
        raise damage(exc) from (exc if chained else None)


class ShardStore:
    """A shard store opened for reading: the manifest and each domain's committed metadata.

    Opening reads metadata only (a few small JSON objects); token chunks are read by
    ``TokenStream`` on demand, so this is cheap enough to do in every process. ``retry``:
    how long each read waits for an unreachable store (default: not at all).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None, *,
                 retry: StorageRetry = NO_RETRY) -> None:
        self.url = str(url)
        self.storage_options = dict(storage_options or {})
        self.retry = retry
        retry.call(self.url, self._open)

    def _open(self) -> None:
        with _damage_unless_transient(partial(damaged, f"shard store {self.url!r}",
                                              "the root group (zarr.json)")):
            try:
                self._root = zarr.open_group(
                    zarr_store(self.url, read_only=True, storage_options=self.storage_options),
                    mode="r", zarr_format=3,  # one GET (zarr.json), not also v2's three
                )
            except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError) as exc:
                raise DataError(f"no shard store at {self.url!r} ({type(exc).__name__}); "
                                "build one with `lightning-aquila prepare`") from None
        names = checked_manifest(self.url, self._root.attrs.get(MANIFEST_KEY), "reads")["domains"]
        self.domains: dict[str, DomainInfo] = {}
        for name in names:
            where = f"shard store {self.url!r}, domain {name!r}"
            with _damage_unless_transient(partial(damaged, where, "its group")):
                try:
                    group = self._root[name]
                except KeyError:
                    raise DataError(f"shard store {self.url!r}: the manifest lists domain "
                                    f"{name!r} but its group is missing") from None
            if not isinstance(group, zarr.Group):
                raise DataError(f"{where}: {name!r} is not a group")
            self.domains[name] = DomainInfo.from_attrs(where, group.attrs.asdict())

    def tokenizer_json(self, hash_: str) -> str | None:
        """The copy of the ``tokenizer.json`` of hash ``hash_`` that ``prepare`` stored
        (``store_tokenizer.py``); ``None`` in a store prepared before copies were kept."""
        from lightning_aquila.datamodules.store_tokenizer import read_tokenizer_copy

        def read() -> str | None:
            with _damage_unless_transient(partial(damaged, f"shard store {self.url!r}",
                                                  f"the tokenizer copy {hash_[:8]}")):
                return read_tokenizer_copy(self._root, hash_)

        return self.retry.call(self.url, read)

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

        def open_node() -> Any:
            with _damage_unless_transient(partial(damaged, where, f"array {name!r}")):
                try:
                    return self._root[f"{domain}/{split}/{segment}/{name}"]
                except KeyError:
                    return None

        node = self.retry.call(self.url, open_node)
        if node is None:
            return None
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
                    for optional in ("quality", "part"):  # older segments may lack them
                        array = self._array(name, split, seg.id, optional)
                        if array is not None:
                            arrays.append(array)
                    for array in arrays:
                        missing = self.retry.call(self.url, lambda a=array: missing_chunks(a))
                        if missing:
                            raise DataError(
                                f"{where}: {len(missing)} chunk(s) of {array.basename!r} are "
                                f"missing from storage: {missing[:5]}"
                            )
                    if full:
                        for array in arrays:
                            for index in range(array.nchunks):
                                self.read_chunk(array, index, where)

    def read_chunk(self, array: zarr.Array, index: int, where: str,
                   stop: int | None = None) -> np.ndarray:
        """:func:`read_chunk`, waiting for the store as ``retry`` says."""
        return self.retry.call(self.url, lambda: read_chunk(array, index, where, stop))


def read_chunk(array: zarr.Array, index: int, where: str, stop: int | None = None) -> np.ndarray:
    """Chunk ``index`` of a 1-D array (up to element ``stop``), decoded; any failure (a
    CRC32C mismatch, a chunk that does not decompress) is a ``DataError`` naming it, except
    an unreachable store (:func:`transient`), which is raised as it is, to be retried."""
    size = array.chunks[0]
    end = min((index + 1) * size, array.shape[0] if stop is None else stop)
    with _damage_unless_transient(lambda exc: DataError(
            f"{where}: chunk c/{index} of {array.basename!r} could not be read "
            f"({type(exc).__name__}: {exc}); the store is corrupt - rebuild this domain with "
            "`lightning-aquila prepare`"), chained=True):
        return np.asarray(array[index * size:end])


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
        data = self.store.read_chunk(array, index,
                                     self.store.where(self.domain, self.split, seg.id),
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



def _whole(store: ShardStore, array: zarr.Array, where: str) -> np.ndarray:
    """A small 1-D array (offsets, parts) read whole, chunk by chunk."""
    parts = [store.read_chunk(array, i, where) for i in range(array.nchunks)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=array.dtype)


def heldout_parts(store: ShardStore, domain: str
                  ) -> tuple[dict[str, list[tuple[int, int]]], bool]:
    """Where each held-out part lies in the domain's held-out stream: ``{"dev": [(start,
    stop), ...], "test": [...]}`` token ranges (adjacent documents of one part merged), and
    whether every segment recorded its parts. A segment written before the dev/test split
    has no ``part`` array; its documents are assigned by the same kind of hash over (segment
    id, document number), which is fixed for a given store; so is a document written without
    a part (``UNASSIGNED_PART``)."""
    ranges: dict[str, list[tuple[int, int]]] = {name: [] for name in PARTS}
    recorded = True
    base = 0
    for seg in store.info(domain).segments.get("heldout", ()):
        where = store.where(domain, "heldout", seg.id)
        offsets = _whole(store, store.array(domain, "heldout", seg.id, "offsets"), where)
        array = store._array(domain, "heldout", seg.id, "part")
        parts = (np.full(seg.documents, UNASSIGNED_PART, dtype=np.uint8) if array is None
                 else _whole(store, array, where))
        unassigned = np.flatnonzero(parts == UNASSIGNED_PART)
        if len(unassigned):
            recorded = False
            parts = parts.copy()
            parts[unassigned] = [heldout_part(seg.id, int(i)) for i in unassigned]
        for part, begin, end in zip(parts.tolist(), offsets[:-1].tolist(),
                                    offsets[1:].tolist()):
            found = ranges[PARTS[int(part)]]
            start, stop = base + int(begin), base + int(end)
            if found and found[-1][1] == start:
                found[-1] = (found[-1][0], stop)
            else:
                found.append((start, stop))
        base += seg.tokens
    return ranges, recorded


def document_scores(store: ShardStore, domain: str, name: str, split: str = "train"
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One score of every document of a domain's split, in stream order: ``(bounds,
    values)``, where document ``i`` is tokens ``[bounds[i], bounds[i + 1])`` of the split's
    stream (int64, ``documents + 1`` entries) and ``values[i]`` its score (float32, NaN where
    it has none, including every document of a segment the score was not attached to).
    ``name`` is an attached score or ``quality`` (``prepare --quality-field``); another is a
    DataError naming the scores the domain has."""
    info = store.info(domain)
    key = info.score_key(name, store.where(domain))
    bounds, values, base = [np.zeros(1, dtype=np.int64)], [], 0
    for seg in info.segments.get(split, ()):
        where = store.where(domain, split, seg.id)
        offsets = _whole(store, store.array(domain, split, seg.id, "offsets"), where)
        offsets = offsets.astype(np.int64)
        bounds.append(base + offsets[1:])
        array = store._array(domain, split, seg.id, key)
        column = (np.full(seg.documents, np.nan, dtype=np.float32) if array is None
                  else _whole(store, array, where).astype(np.float32, copy=False))
        if len(column) != seg.documents:
            raise DataError(f"{where}: score {name!r} has {len(column)} values for "
                            f"{seg.documents} documents; the store is damaged")
        values.append(column)
        base += seg.tokens
    return (np.concatenate(bounds),
            np.concatenate(values) if values else np.zeros(0, dtype=np.float32))


def iter_documents(store: ShardStore, domain: str, split: str = "train") -> Iterator[np.ndarray]:
    """Each document's tokens (eos included), in store order; for tools and tests."""
    stream = store.stream(domain, split)
    for seg_index, seg in enumerate(store.info(domain).segments.get(split, ())):
        array = store.array(domain, split, seg.id, "offsets")
        where = store.where(domain, split, seg.id)
        offsets = _whole(store, array, where)
        base = int(stream.starts[seg_index])
        for begin, end in itertools.pairwise(offsets):
            yield stream.read(base + int(begin), base + int(end))


__all__ = ["DataError", "DomainInfo", "Segment", "ShardStore", "TokenStream", "document_scores",
           "heldout_parts", "iter_documents", "missing_chunks", "read_chunk"]
