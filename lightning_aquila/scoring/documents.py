"""The documents of a domain in batches, and the loop that scores them all.

A scorer is a function from an iterator of batches (lists of token arrays, eos included)
to an iterator of float arrays, one value per document, in order: a scorer that runs on a
process pool (fastText) and one that runs on a device (perplexity) both fit it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from lightning_aquila.datamodules.shard_format import SPLITS, DataError
from lightning_aquila.datamodules.store import ShardStore, iter_documents

Batch = list[np.ndarray]
Scorer = Callable[[Iterator[Batch]], Iterator[np.ndarray]]


@dataclass
class Throughput:
    """Documents and tokens scored, and the seconds it took."""

    documents: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (f"{self.documents:,} documents, {self.tokens:,} tokens in {self.seconds:.1f} s: "
                f"{self.documents / seconds:,.0f} documents/s, "
                f"{self.tokens / seconds:,.0f} tokens/s")


def document_batches(store: ShardStore, domain: str, split: str,
                     batch_documents: int) -> Iterator[Batch]:
    """The split's documents in stream order, ``batch_documents`` at a time."""
    batch: Batch = []
    for document in iter_documents(store, domain, split):
        batch.append(document)
        if len(batch) == batch_documents:
            yield batch
            batch = []
    if batch:
        yield batch


def score_domain(store: ShardStore, domain: str, scorer: Scorer, *, batch_documents: int,
                 progress: bool = True, meter: Throughput | None = None
                 ) -> dict[str, np.ndarray]:
    """Every document of both splits of ``domain`` scored: ``{split: float32 values}`` in
    stream order, ready for ``attach_score``. One progress line per domain; ``meter``
    adds up documents, tokens and seconds."""
    info = store.info(domain)
    meter = meter if meter is not None else Throughput()
    bar = tqdm(total=info.total_documents, unit="doc", desc=f"scoring {domain}",
               disable=not progress, dynamic_ncols=True, leave=False)
    values: dict[str, np.ndarray] = {}
    start = time.perf_counter()
    with bar:
        for split in SPLITS:
            sizes: list[int] = []

            def counted(batches: Iterator[Batch], sizes: list[int] = sizes) -> Iterator[Batch]:
                for batch in batches:
                    sizes.append(sum(len(doc) for doc in batch))
                    yield batch

            parts = []
            batches = counted(document_batches(store, domain, split, batch_documents))
            for index, scores in enumerate(scorer(batches)):
                parts.append(np.asarray(scores, dtype=np.float32))
                bar.update(len(scores))
                meter.documents += len(scores)
                meter.tokens += sizes[index]
            values[split] = np.concatenate(parts) if parts else np.zeros(0, np.float32)
            if len(values[split]) != info.documents(split):
                raise DataError(f"{store.where(domain, split)}: the scorer returned "
                                f"{len(values[split])} values for {info.documents(split)} "
                                "documents")
    meter.seconds += time.perf_counter() - start
    return values


__all__ = ["Batch", "Scorer", "Throughput", "document_batches", "score_domain"]
