"""Quality-aware sampling at corpus scale: start-up time, memory per rank and per DataLoader
worker, and batches/s of drawing sample indices, for one domain of ``--documents`` scored
documents (default 10^8).

    .venv/bin/python benchmarks/quality_sampler_scale.py            # 10^8 documents
    .venv/bin/python benchmarks/quality_sampler_scale.py --documents 1000000 --batches 200

No tokens are needed: the document table a store would give (``store.document_scores``:
int64 bounds, float32 scores with NaN where a document has none) is synthesised directly
(lognormal lengths of mean ``--mean-tokens``, normal scores, 5% NaN) and fed to the code path
``DomainDataModule`` uses: ``DomainScores`` (median, floor, window scores), the sampler's
weighted epoch order at a temperature (expected counts, one epoch's counts), then draws.
The rank's figures are this process's; the worker's are those of a forked DataLoader worker
that receives every batch spec (what ``TrainWindows`` gets), its RSS (shared pages included)
and USS (its own pages). Targets (issue 27): start-up under 30 s, under 2 GiB per rank.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import date
from pathlib import Path

import numpy as np
import psutil
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.datamodules.quality import DomainScores
from lightning_aquila.datamodules.sampler import MixtureSampler

GIB = 1 << 30


def peak_rss() -> float:
    """This process's peak resident memory so far, GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def document_table(documents: int, mean_tokens: float, seed: int = 0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(bounds, values)`` as ``store.document_scores`` returns them, made a slice at a time
    so that nothing but the two arrays is ever held."""
    rng = np.random.default_rng(seed)
    bounds = np.empty(documents + 1, dtype=np.int64)
    values = np.empty(documents, dtype=np.float32)
    bounds[0] = 0
    sigma = 1.0
    mu = np.log(mean_tokens) - sigma ** 2 / 2
    step = 1 << 22
    for lo in range(0, documents, step):
        n = min(step, documents - lo)
        lengths = np.maximum(1, rng.lognormal(mu, sigma, n)).astype(np.int64)
        bounds[lo + 1:lo + n + 1] = bounds[lo] + np.cumsum(lengths)
        scores = rng.normal(size=n).astype(np.float32)
        scores[rng.random(n) < 0.05] = np.nan
        values[lo:lo + n] = scores
    return bounds, values


class SpecMemory(Dataset):
    """Stands in for ``TrainWindows``: takes each batch spec, answers the worker's memory."""

    def __getitem__(self, spec: np.ndarray) -> dict[str, torch.Tensor]:
        info = psutil.Process().memory_full_info()
        return {"rows": torch.tensor(len(spec)), "rss": torch.tensor(info.rss),
                "uss": torch.tensor(info.uss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=100_000_000)
    parser.add_argument("--mean-tokens", type=float, default=700.0)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--floor-quantile", type=float, default=0.2)
    parser.add_argument("--max-repeats", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--world", type=int, default=64, help="ranks the global batch spans")
    parser.add_argument("--batches", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="append the row (JSON lines)")
    args = parser.parse_args()

    t0 = time.perf_counter()
    bounds, values = document_table(args.documents, args.mean_tokens)
    windows = int((bounds[-1] - 1) // args.seq_len)
    t_table = time.perf_counter() - t0

    t0 = time.perf_counter()
    scores = DomainScores(bounds, values, args.seq_len, windows,
                          floor_quantile=args.floor_quantile)
    t_scores = time.perf_counter() - t0
    mixture = DomainMixture(["web"], {"web": 1.0},
                            quality_temperature={"web": args.temperature})
    sampler = MixtureSampler(mixture, {"web": windows}, batch_size=args.batch_size,
                             num_replicas=args.world, rank=0, seed=0, block_windows=128,
                             shuffle_blocks=8, epoch_batches=10**9, consume_on_yield=True,
                             quality={"web": scores}, max_repeats=args.max_repeats)
    sampler.check_quality()  # expected counts at the starting temperature
    t_order = time.perf_counter() - t0 - t_scores
    iterator = iter(sampler)
    next(iterator)  # the first epoch's counts and first group
    t_startup = time.perf_counter() - t0
    rss_startup = peak_rss()

    t0 = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    t_draw = time.perf_counter() - t0
    global_batch = args.batch_size * args.world

    t0 = time.perf_counter()
    mixture.set_quality_temperature(args.temperature / 2, reason="benchmark")
    next(iterator)
    t_change = time.perf_counter() - t0
    rss_rank = peak_rss()

    loader = DataLoader(SpecMemory(), batch_size=None, sampler=sampler, num_workers=1,
                        multiprocessing_context="fork", prefetch_factor=2)
    worker: dict[str, float] = {}
    for index, item in enumerate(loader):
        worker = {"rss": float(item["rss"]) / GIB, "uss": float(item["uss"]) / GIB}
        if index == 50:
            break
    del loader

    row = {
        "date": date.today().isoformat(), "machine": f"{platform.node()} "
        f"({psutil.cpu_count()} cores, {psutil.virtual_memory().total / GIB:.0f} GiB)",
        "documents": args.documents, "windows": windows, "tokens": int(bounds[-1]),
        "seq_len": args.seq_len, "temperature": args.temperature,
        "floor_quantile": args.floor_quantile, "max_repeats": args.max_repeats,
        "table_s": round(t_table, 2), "scores_s": round(t_scores, 2),
        "order_s": round(t_order, 2), "startup_s": round(t_startup, 2),
        "rank_peak_rss_gib_startup": round(rss_startup, 3),
        "rank_peak_rss_gib": round(rss_rank, 3),
        "worker_rss_gib": round(worker.get("rss", float("nan")), 3),
        "worker_uss_gib": round(worker.get("uss", float("nan")), 3),
        "global_batch": global_batch, "batches_per_s": round(args.batches / t_draw, 1),
        "samples_per_s": round(args.batches * global_batch / t_draw),
        "temperature_change_s": round(t_change, 2),
    }
    print("| metric | value |\n|---|---|")
    for key, value in row.items():
        print(f"| {key} | {value} |")
    if args.out is not None:
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
