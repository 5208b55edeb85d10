"""Datasets that turn window indices into token tensors.

They hold only the store's URL and open it lazily in whichever process reads (the main one
or a DataLoader worker), so nothing that owns threads or file handles crosses a fork or a
pickle; each process keeps its own cache of decompressed chunks, and waits on its own for
an unreachable store (``retry``, a ``StorageRetry``). A batch is returned only once all its
windows are read, so a wait delays it and never drops or repeats a window.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_aquila.datamodules.sampler import unpack_scores
from lightning_aquila.datamodules.storage_retry import NO_RETRY, StorageRetry
from lightning_aquila.datamodules.store import ShardStore, TokenStream


class _LazyStreams:
    """The token streams of some domains of a store, opened once per process."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None,
                 domains: Sequence[str], split: str, cache_chunks: int,
                 retry: StorageRetry = NO_RETRY) -> None:
        self.url, self.storage_options, self.retry = url, dict(storage_options or {}), retry
        self.domains, self.split, self.cache_chunks = list(domains), split, cache_chunks
        self._pid: int | None = None
        self._streams: list[TokenStream] = []

    def get(self) -> list[TokenStream]:
        if self._pid != os.getpid():
            store = ShardStore(self.url, self.storage_options, retry=self.retry)
            self._streams = [store.stream(d, self.split, cache_chunks=self.cache_chunks)
                             for d in self.domains]
            self._pid = os.getpid()
        return self._streams

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_pid": None, "_streams": []}


def _batch(windows: np.ndarray, domains: np.ndarray) -> dict[str, torch.Tensor]:
    """The Batch contract from packed windows of ``seq_len + 1`` tokens: labels are the
    inputs shifted by one, so every position has a target and none is ignored."""
    return {  # astype copies each slice once, contiguous and int64
        "input_ids": torch.from_numpy(windows[..., :-1].astype(np.int64)),
        "labels": torch.from_numpy(windows[..., 1:].astype(np.int64)),
        "domain": torch.from_numpy(np.array(domains, dtype=np.int64)),  # 0-d stays 0-d
    }


class TrainWindows(Dataset):
    """Indexed by a whole batch spec from ``MixtureSampler``: rows of (domain, window), and
    each window's score as a third column when the sampler samples by score (then the batch
    has ``score``, float32).

    One ``__getitem__`` per batch keeps per-sample Python overhead and inter-process traffic
    small (the DataLoader is used with ``batch_size=None``).
    """

    def __init__(self, url: str, domains: Sequence[str], seq_len: int, *,
                 storage_options: Mapping[str, Any] | None = None, cache_chunks: int = 32,
                 retry: StorageRetry = NO_RETRY) -> None:
        self.seq_len = int(seq_len)
        self.streams = _LazyStreams(url, storage_options, domains, "train", cache_chunks,
                                    retry)

    def __getitem__(self, spec: np.ndarray) -> dict[str, torch.Tensor]:
        spec = np.asarray(spec, dtype=np.int64)
        streams = self.streams.get()
        span = self.seq_len + 1
        windows = np.empty((len(spec), span), dtype=np.uint32)
        for row, (domain, window) in enumerate(spec[:, :2]):
            start = int(window) * self.seq_len
            streams[domain].read(start, start + span, out=windows[row])
        batch = _batch(windows, spec[:, 0])
        if spec.shape[1] > 2:
            batch["score"] = torch.from_numpy(unpack_scores(spec[:, 2]).copy())
        return batch


class PartView:
    """One held-out part of one domain as a flat sequence: the concatenation of its token
    ranges in the domain's held-out stream (``store.heldout_parts``), read through it."""

    def __init__(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.ranges = [(int(a), int(b)) for a, b in ranges if b > a]
        lengths = np.array([b - a for a, b in self.ranges], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(lengths)])
        self.n_tokens = int(self.starts[-1])

    def windows(self, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens at stride ``seq_len`` (as training windows)."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """Where ``[start, stop)`` of the part lies in the held-out stream: token ranges."""
        found, pos = [], start
        while pos < stop:
            index = int(np.searchsorted(self.starts, pos, side="right")) - 1
            begin, end = self.ranges[index]
            local = begin + pos - int(self.starts[index])
            take = min(end - local, stop - pos)
            found.append((local, local + take))
            pos += take
        return found

    def read(self, stream: TokenStream, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, dtype=np.uint32)
        filled = 0
        for begin, end in self.spans(start, stop):
            stream.read(begin, end, out=out[filled:filled + end - begin])
            filled += end - begin
        return out


class HeldOutWindows(Dataset):
    """Fixed held-out windows of one part (dev or test) of several domains: item ``i`` is
    window ``windows[i]`` of the part of domain ``domains[i]`` (an index into ``names``),
    read through that domain's :class:`PartView`. Every item carries its ``domain`` and its
    ``part`` (0 dev, 1 test), so one loader serves all domains; and its ``score`` when
    ``scores`` (one per item) are given."""

    def __init__(self, url: str, names: Sequence[str], views: Sequence[PartView],
                 domains: Sequence[int], windows: Sequence[int], seq_len: int, part: int, *,
                 storage_options: Mapping[str, Any] | None = None,
                 scores: np.ndarray | None = None, retry: StorageRetry = NO_RETRY) -> None:
        self.scores = None if scores is None else np.asarray(scores, dtype=np.float32)
        self.seq_len, self.part = int(seq_len), int(part)
        self.views = list(views)
        self.domains = np.asarray(domains, dtype=np.int64)
        self.window_ids = np.asarray(windows, dtype=np.int64)
        self.streams = _LazyStreams(url, storage_options, names, "heldout", cache_chunks=4,
                                    retry=retry)

    def __len__(self) -> int:
        return len(self.window_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        domain = int(self.domains[index])
        start = int(self.window_ids[index]) * self.seq_len
        window = self.views[domain].read(self.streams.get()[domain], start,
                                         start + self.seq_len + 1)
        batch = _batch(window, np.array(domain))
        batch["part"] = torch.tensor(self.part, dtype=torch.int64)
        if self.scores is not None:
            batch["score"] = torch.tensor(self.scores[index])
        return batch


def interleave(per_domain: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(domain index, window) pairs taking one window of each domain in turn, so that any
    prefix of the loader (``limit_val_batches``) covers every domain about equally."""
    pairs = [(i, int(ids[k])) for k in range(max((len(ids) for ids in per_domain), default=0))
             for i, ids in enumerate(per_domain) if k < len(ids)]
    if not pairs:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    domains, windows = zip(*pairs)
    return np.array(domains, dtype=np.int64), np.array(windows, dtype=np.int64)


def spread_windows(available: int, wanted: int) -> np.ndarray:
    """``wanted`` window ids spread evenly over ``available`` (all of them if fewer): a
    held-out sample that covers every source instead of only the first ones prepared."""
    if wanted >= available:
        return np.arange(available, dtype=np.int64)
    return np.unique(np.linspace(0, available - 1, wanted).round().astype(np.int64))
