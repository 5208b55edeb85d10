"""Training tokens/s delivered by DomainDataModule's train loader, next to a plain np.memmap
reader of the same tokens.

    .venv/bin/python benchmarks/dataloader.py            # builds a synthetic store in a tmpdir

The store holds ``--domains`` domains of ``--tokens`` tokens each (Zipf-distributed ids over
an 8192-id vocabulary, so it compresses like real text does), written through the same
``DomainWriter`` that ``prepare`` uses. The reference reads random windows of the same tokens
from raw ``.bin`` files through ``np.memmap`` (page cache warm, no decompression, no mixture),
with the same batch shape and the same DataLoader worker settings. The figure that matters is
the DMU's: it must stay above 20x what one H100 consumes on the ~1B preset (~50k tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.store import DomainWriter

H100_TOKENS_PER_SECOND = 50_000  # the ~1B preset on one H100 (docs/benchmarks.md)


def build(root: Path, domains: int, tokens: int, seed: int = 0) -> tuple[str, list[Path]]:
    """A shard store and raw .bin copies of the same training tokens."""
    url, bins = str(root / "bench.zarr"), []
    rng = np.random.default_rng(seed)
    for d in range(domains):
        stream = (rng.zipf(1.2, tokens) % 8192).astype(np.uint32)
        with DomainWriter(url, f"domain{d}", tokenizer={"hash": "bench"},
                          language="xx") as writer:
            for doc in np.array_split(stream, max(1, tokens // 4096)):
                writer.add_document("train", doc)
            writer.add_document("heldout", stream[:5000])
            writer.add_source({"path": "synthetic", "sha256": f"bench{d}"})
            writer.commit()
        path = root / f"domain{d}.bin"
        stream.tofile(path)
        bins.append(path)
    return url, bins


class MemmapWindows(Dataset):
    """The reference: a random domain, a random window, read straight from a memmap."""

    def __init__(self, bins: list[Path], seq_len: int) -> None:
        self.bins, self.seq_len = bins, seq_len
        self.maps: list[np.ndarray] | None = None
        self.windows = [(os.path.getsize(b) // 4 - 1) // seq_len for b in bins]

    def __len__(self) -> int:
        return sum(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if self.maps is None:
            self.maps = [np.memmap(b, dtype=np.uint32, mode="r") for b in self.bins]
        domain = index % len(self.bins)
        window = (index // len(self.bins)) % self.windows[domain]
        start = window * self.seq_len
        data = self.maps[domain][start:start + self.seq_len + 1].astype(np.int64)
        return {"input_ids": torch.from_numpy(data[:-1]), "labels": torch.from_numpy(data[1:]),
                "domain": torch.tensor(domain)}


def measure(loader: DataLoader, batches: int, warmup: int) -> float:
    """Tokens (input_ids elements) per second over ``batches`` after ``warmup``."""
    iterator = iter(loader)
    for _ in range(warmup):
        next(iterator)
    tokens = 0
    start = time.perf_counter()
    for _ in range(batches):
        tokens += next(iterator)["input_ids"].numel()
    return tokens / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=8_000_000, help="per domain")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--output", type=Path, default=None, help="append JSON lines here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        url, bins = build(Path(tmp), args.domains, args.tokens)
        raw = args.domains * args.tokens * 4
        stored = sum(f.stat().st_size for f in Path(url).rglob("*") if f.is_file())
        print(f"store: {args.domains} domains x {args.tokens:,} tokens, {raw / 2**20:.0f} MiB "
              f"raw -> {stored / 2**20:.0f} MiB zarr, built in {time.perf_counter() - t0:.1f}s")
        print(f"batch: {args.batch_size} x {args.seq_len} tokens; {args.batches} batches "
              f"timed after {args.warmup}; {os.cpu_count()} CPU cores\n")
        rows = []
        for workers in args.workers:
            dm = DomainDataModule(url, seq_len=args.seq_len, batch_size=args.batch_size,
                                  weights="uniform", num_workers=workers,
                                  val_windows_per_domain=0, verify="none")
            dm.setup("fit")
            dmu = measure(dm.train_dataloader(), args.batches, args.warmup)
            memmap = measure(DataLoader(
                MemmapWindows(bins, args.seq_len), batch_size=args.batch_size,
                sampler=RandomSampler(range(10**9), replacement=True, num_samples=10**9),
                num_workers=workers, persistent_workers=workers > 0,
                prefetch_factor=2 if workers else None), args.batches, args.warmup)
            rows.append({"workers": workers, "dmu_tokens_per_s": dmu,
                         "memmap_tokens_per_s": memmap})
    print(f"{'workers':>7}  {'DomainDataModule tok/s':>22}  {'np.memmap tok/s':>16}  "
          f"{'DMU/memmap':>10}  {'DMU / H100 need':>15}")
    for row in rows:
        print(f"{row['workers']:>7}  {row['dmu_tokens_per_s']:>22,.0f}  "
              f"{row['memmap_tokens_per_s']:>16,.0f}  "
              f"{row['dmu_tokens_per_s'] / row['memmap_tokens_per_s']:>10.2f}  "
              f"{row['dmu_tokens_per_s'] / H100_TOKENS_PER_SECOND:>14.0f}x")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "seq_len": args.seq_len,
                                    "batch_size": args.batch_size, "cpus": os.cpu_count(),
                                    "machine": platform.machine(),
                                    "date": time.strftime("%Y-%m-%d")}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
