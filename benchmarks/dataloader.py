"""Training tokens/s delivered by DomainDataModule's train loader, next to a plain np.memmap
reader of the same tokens.

    .venv/bin/python benchmarks/dataloader.py            # builds a synthetic store in a tmpdir
    .venv/bin/python benchmarks/dataloader.py --s3       # also from a local S3 server (moto)

The store holds ``--domains`` domains of ``--tokens`` tokens each (Zipf-distributed ids over
an 8192-id vocabulary, so it compresses like real text does), written through the same
``DomainWriter`` that ``prepare`` uses. The reference reads random windows of the same tokens
from raw ``.bin`` files through ``np.memmap`` (page cache warm, no decompression, no mixture),
with the same batch shape and the same DataLoader worker settings. The figure that matters is
the DMU's: it must stay above 20x what one H100 consumes on the ~1B preset (~50k tokens/s).

``--s3`` also copies the store into a bucket of an S3-compatible server (``moto`` in server
mode on 127.0.0.1, a process of its own; needs the ``s3``/``dev`` extras) and measures the
same loader reading it through ``s3fs``: every chunk is an HTTP GET, which is what object
storage adds. Credentials come from the environment (dummy ones are set when none are).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.writer import DomainWriter

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


@contextlib.contextmanager
def local_s3(store: str) -> Iterator[tuple[str, dict]]:
    """The store copied into a bucket of a moto S3 server on a free local port: yields its
    ``s3://`` URL and the ``storage_options`` (the endpoint) to read it with."""
    import s3fs

    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = {"endpoint_url": f"http://127.0.0.1:{port}"}
    try:
        for _ in range(300):
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"{options['endpoint_url']}/moto-api/", timeout=1)
                break
            time.sleep(0.1)
        fs = s3fs.S3FileSystem(**options)
        fs.mkdir("bench")
        fs.put(store, "bench/bench.zarr", recursive=True)
        yield "s3://bench/bench.zarr", options
    finally:
        server.terminate()
        server.wait(timeout=30)


def dmu_tokens_per_s(url: str, args: argparse.Namespace, workers: int,
                     storage_options: dict | None = None) -> float:
    dm = DomainDataModule(url, seq_len=args.seq_len, batch_size=args.batch_size,
                          weights="uniform", num_workers=workers, val_windows_per_domain=0,
                          verify="none", storage_options=storage_options)
    dm.setup("fit")
    return measure(dm.train_dataloader(), args.batches, args.warmup)


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
    parser.add_argument("--s3", action="store_true",
                        help="also read the store from a local S3 server (moto + s3fs)")
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
        s3 = local_s3(url) if args.s3 else contextlib.nullcontext((None, None))
        with s3 as (s3_url, s3_options):
            for workers in args.workers:
                rows.append(measure_row(url, bins, args, workers, s3_url, s3_options))
    print(f"{'workers':>7}  {'DomainDataModule tok/s':>22}  {'np.memmap tok/s':>16}  "
          f"{'DMU/memmap':>10}  {'DMU / H100 need':>15}" + (f"  {'DMU from S3 tok/s':>18}"
                                                             if args.s3 else ""))
    for row in rows:
        print(f"{row['workers']:>7}  {row['dmu_tokens_per_s']:>22,.0f}  "
              f"{row['memmap_tokens_per_s']:>16,.0f}  "
              f"{row['dmu_tokens_per_s'] / row['memmap_tokens_per_s']:>10.2f}  "
              f"{row['dmu_tokens_per_s'] / H100_TOKENS_PER_SECOND:>14.0f}x"
              + (f"  {row['dmu_s3_tokens_per_s']:>18,.0f}" if args.s3 else ""))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        with open(args.output, "a") as f:
            for row in rows:
                f.write(json.dumps({**row, "seq_len": args.seq_len,
                                    "batch_size": args.batch_size, "cpus": os.cpu_count(),
                                    "machine": platform.machine(),
                                    "date": time.strftime("%Y-%m-%d")}) + "\n")
    return 0


def measure_row(url: str, bins: list[Path], args: argparse.Namespace, workers: int,
                s3_url: str | None, s3_options: dict | None) -> dict:
    """One table row: the DMU from local disk, the memmap peer, and (``--s3``) the DMU from
    the S3 server, measured one after the other with the same settings."""
    row = {"workers": workers, "dmu_tokens_per_s": dmu_tokens_per_s(url, args, workers)}
    row["memmap_tokens_per_s"] = measure(DataLoader(
        MemmapWindows(bins, args.seq_len), batch_size=args.batch_size,
        sampler=RandomSampler(range(10**9), replacement=True, num_samples=10**9),
        num_workers=workers, persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None), args.batches, args.warmup)
    if s3_url is not None:
        row["dmu_s3_tokens_per_s"] = dmu_tokens_per_s(s3_url, args, workers, s3_options)
    return row


if __name__ == "__main__":
    raise SystemExit(main())
