"""Which documents of the pool a run drew, without instrumenting it: the sampler's sequence
is a pure function of (seed, batch, mixture and temperature history) (DESIGN.md,
"Determinism"), so replaying the run's datamodule with its temperature changes gives the
exact windows it trained on. From them: the share of the pool's documents seen at least
once (diversity), the share of its clean documents seen, and the share of drawn tokens that
were junk (by the store's ground-truth ``quality`` column, the document's kind)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def drawn_windows(init_args: Mapping[str, Any], steps: int, domain: str,
                  changes: Sequence[tuple[int, Any]] = ()) -> np.ndarray:
    """How often each training window of ``domain`` was drawn in the first ``steps``
    global batches of a run of this datamodule; ``changes`` are the run's quality
    temperature changes as (batch index, temperature), applied where the run applied them."""
    from lightning_aquila.datamodules import DomainDataModule

    args = {k: v for k, v in init_args.items() if k not in ("num_workers", "pin_memory")}
    dm = DomainDataModule(**args, num_workers=0)
    dm.setup("fit")
    sampler = dm.sampler
    sampler.consume_on_yield = True
    index = dm.mixture.domains.index(domain)
    counts = np.zeros(sampler.available[domain], dtype=np.int64)
    pending = sorted(changes, key=lambda c: c[0])
    drawn = 0
    while drawn < steps:
        for spec in sampler:  # lazy: a change made between two batches applies to the next
            np.add.at(counts, spec[spec[:, 0] == index, 1], 1)
            drawn += 1
            while pending and pending[0][0] <= drawn:
                dm.mixture.set_quality_temperature(pending.pop(0)[1], "replay")
            if drawn >= steps:
                break
    return counts


def coverage(store: str, domain: str, counts: np.ndarray, seq_len: int) -> dict[str, float]:
    """The documents and tokens that the drawn windows (``counts`` per window) cover."""
    from lightning_aquila.datamodules.store import ShardStore, document_scores

    bounds, kinds = document_scores(ShardStore(store), domain, "quality", "train")
    tokens = int(bounds[-1])
    document_of = np.repeat(np.arange(len(kinds)), np.diff(bounds))
    per_token = np.zeros(tokens, dtype=np.int64)
    used = min(len(counts) * seq_len, tokens)
    per_token[:used] = np.repeat(counts, seq_len)[:used]
    seen = np.zeros(len(kinds), dtype=bool)
    seen[np.unique(document_of[per_token > 0])] = True
    junk = (kinds != 0)[document_of]
    clean = kinds == 0
    return {"documents_seen": float(seen.mean()),
            "clean_documents_seen": float(seen[clean].mean()),
            "junk_token_share": float(per_token[junk].sum() / max(per_token.sum(), 1))}
