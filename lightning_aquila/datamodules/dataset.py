"""Datasets that turn window indices into token tensors.

They hold only the store's URL and open it lazily in whichever process reads (the main one
or a DataLoader worker), so nothing that owns threads or file handles crosses a fork or a
pickle; each process keeps its own cache of decompressed chunks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_aquila.datamodules.store import ShardStore, TokenStream


class _LazyStreams:
    """The token streams of some domains of a store, opened once per process."""

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None,
                 domains: Sequence[str], split: str, cache_chunks: int) -> None:
        self.url, self.storage_options = url, dict(storage_options or {})
        self.domains, self.split, self.cache_chunks = list(domains), split, cache_chunks
        self._pid: int | None = None
        self._streams: list[TokenStream] = []

    def get(self) -> list[TokenStream]:
        if self._pid != os.getpid():
            store = ShardStore(self.url, self.storage_options)
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
    """Indexed by a whole batch spec from ``MixtureSampler``: rows of (domain, window).

    One ``__getitem__`` per batch keeps per-sample Python overhead and inter-process traffic
    small (the DataLoader is used with ``batch_size=None``).
    """

    def __init__(self, url: str, domains: Sequence[str], seq_len: int, *,
                 storage_options: Mapping[str, Any] | None = None, cache_chunks: int = 32) -> None:
        self.seq_len = int(seq_len)
        self.streams = _LazyStreams(url, storage_options, domains, "train", cache_chunks)

    def __getitem__(self, spec: np.ndarray) -> dict[str, torch.Tensor]:
        spec = np.asarray(spec, dtype=np.int64)
        streams = self.streams.get()
        span = self.seq_len + 1
        windows = np.empty((len(spec), span), dtype=np.uint32)
        for row, (domain, window) in enumerate(spec):
            start = int(window) * self.seq_len
            streams[domain].read(start, start + span, out=windows[row])
        return _batch(windows, spec[:, 0])


class HeldOutWindows(Dataset):
    """Fixed windows of one domain's held-out split, for a per-domain validation loader."""

    def __init__(self, url: str, domain: str, domain_index: int, seq_len: int,
                 window_ids: Sequence[int], *,
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.seq_len, self.domain_index = int(seq_len), int(domain_index)
        self.window_ids = np.asarray(window_ids, dtype=np.int64)
        self.streams = _LazyStreams(url, storage_options, [domain], "heldout", cache_chunks=4)

    def __len__(self) -> int:
        return len(self.window_ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        start = int(self.window_ids[index]) * self.seq_len
        window = self.streams.get()[0].read(start, start + self.seq_len + 1)
        return _batch(window, np.array(self.domain_index))


def spread_windows(available: int, wanted: int) -> np.ndarray:
    """``wanted`` window ids spread evenly over ``available`` (all of them if fewer): a
    held-out sample that covers every source instead of only the first ones prepared."""
    if wanted >= available:
        return np.arange(available, dtype=np.int64)
    return np.unique(np.linspace(0, available - 1, wanted).round().astype(np.int64))
