"""Untimed profiled steps for the benchmark scripts (``--profile DIR``): where a row loses
to its peer, the summary says whether the GPU waited (idle time, host syncs), did more work
(kernels) or waited on communication that compute did not hide (NCCL kernels alone)."""

from __future__ import annotations

import argparse
import gzip
import json
import re
import time
from pathlib import Path
from typing import Any

import torch

#: host calls that wait for the GPU
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def mark(cuda: bool, reset_peak: bool = True) -> float:
    """The clock after the GPU has caught up (and, by default, a fresh peak-memory count)."""
    if cuda:
        torch.cuda.synchronize()
        if reset_peak:
            torch.cuda.reset_peak_memory_stats()
    return time.perf_counter()


def elapsed(start: float | None, cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
    if start is None:
        raise RuntimeError("the run ended before warmup did: raise --steps")
    return time.perf_counter() - start


class StepProfiler:
    """Profiles optimizer steps ``[first, first + count)`` of one row when ``directory`` is
    set; ``step(i)`` is called at the start of every step ``i`` (and once with the index past
    the last step). Steps are counted from 0, warmup included. ``write=False`` profiles
    without writing (the other ranks of a multi-GPU row, so every rank pays the same)."""

    def __init__(self, directory: Path | None, row: str, first: int, count: int,
                 cuda: bool, write: bool = True) -> None:
        self.directory, self.row, self.first, self.count = directory, row, first, count
        self.cuda, self.write = cuda, write
        self.profiler: torch.profiler.profile | None = None
        self.summary: dict[str, Any] | None = None
        self._start = 0.0

    def step(self, index: int) -> None:
        if self.directory is None or self.summary is not None:
            return
        if index == self.first and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
            self._start = mark(self.cuda, reset_peak=False)
        elif index == self.first + self.count and self.profiler is not None:
            wall = elapsed(self._start, self.cuda)
            self.profiler.__exit__(None, None, None)
            if self.write:
                self.directory.mkdir(parents=True, exist_ok=True)
                trace = self.directory / f"{self.row}.trace.json.gz"
                self.profiler.export_chrome_trace(str(trace))  # gzipped by its name
                self.summary = summarise_trace(trace, self.count, wall)
                self.summary["trace"] = str(trace)
            else:
                self.summary = {}
            self.profiler = None


def _merged_ms(ranges: list[tuple[float, float]]) -> float:
    """Time covered by the union of (start, end) ranges in µs, as ms."""
    busy, end = 0.0, -1.0
    for start, stop in sorted(ranges):
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy / 1e3


#: trace categories of work on the GPU (not the profiler's annotations or its
#: "Command Buffer Full" markers, which carry device time too)
GPU_WORK = ("kernel", "gpu_memcpy", "gpu_memset")


def _complete_events(path: str | Path) -> list[dict[str, Any]]:
    """The events with a duration (``"ph": "X"``) of a Chrome trace ``torch.profiler``
    exported (gzipped or not; a bare list of events or under ``traceEvents``)."""
    with (gzip.open(path, "rt") if str(path).endswith(".gz") else open(path)) as file:
        trace = json.load(file)
    return [e for e in (trace["traceEvents"] if isinstance(trace, dict) else trace)
            if e.get("ph") == "X"]


def summarise_trace(path: str | Path, steps: int, wall: float | None = None) -> dict[str, Any]:
    """Per profiled step, from a Chrome trace that ``torch.profiler`` exported: wall time
    (``wall`` seconds, or the trace's span), time the GPU worked (overlaps merged), the part
    of it only communication (NCCL) ran, host waits on the GPU, and the ten kernels with the
    most GPU time."""
    events = _complete_events(path)
    work = [e for e in events if e.get("cat") in GPU_WORK]
    spans = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in work]
    is_comm = ["nccl" in e["name"].lower() for e in work]
    syncs = [e for e in events if e.get("cat") == "cuda_runtime" and e["name"] in SYNC_CALLS]
    if wall is None:
        wall = (max(e["ts"] + e.get("dur", 0) for e in events)
                - min(e["ts"] for e in events)) / 1e6 if events else 0.0
    busy = _merged_ms(spans)
    compute_busy = _merged_ms([s for s, comm in zip(spans, is_comm) if not comm])
    top: dict[str, float] = {}
    for e in work:
        top[e["name"][:80]] = top.get(e["name"][:80], 0.0) + e.get("dur", 0) / 1e3
    wall_ms = 1e3 * wall / steps
    return {
        "steps": steps, "wall_ms_per_step": round(wall_ms, 2),
        "gpu_busy_ms_per_step": round(busy / steps, 2) if work else None,
        "gpu_idle_fraction": round(1 - busy / steps / wall_ms, 4) if work else None,
        "comm_ms_per_step": round(sum(e.get("dur", 0) for e, comm in zip(work, is_comm)
                                      if comm) / 1e3 / steps, 2),
        "comm_exposed_ms_per_step": round((busy - compute_busy) / steps, 2),
        "host_syncs_per_step": round(len(syncs) / steps, 2),
        "host_sync_ms_per_step": round(sum(e.get("dur", 0) for e in syncs) / 1e3 / steps, 2),
        "d2h_copies_per_step": round(sum("DtoH" in e["name"] for e in work) / steps, 2),
        "top_kernels_ms_per_step": {name: round(ms / steps, 3) for name, ms in
                                    sorted(top.items(), key=lambda kv: -kv[1])[:10]},
    }


def print_profiles(rows: list[dict[str, Any]], label: str = "row") -> None:
    profiled = [r for r in rows if r.get("profile")]
    if not profiled:
        return
    print(f"\n| {label} | wall ms/step | GPU busy ms/step | GPU idle | NCCL ms/step | "
          "NCCL alone ms/step | host syncs/step | sync ms/step | DtoH copies/step |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in profiled:
        p = r["profile"]
        idle = "-" if p["gpu_idle_fraction"] is None else f"{p['gpu_idle_fraction']:.1%}"
        print(f"| {r[label]} | {p['wall_ms_per_step']} | {p['gpu_busy_ms_per_step']} | {idle} | "
              f"{p['comm_ms_per_step']} | {p['comm_exposed_ms_per_step']} | "
              f"{p['host_syncs_per_step']} | {p['host_sync_ms_per_step']} | "
              f"{p['d2h_copies_per_step']} |")


def _kernel_name(name: str) -> str:
    """A kernel's name to compare by: inductor's Triton kernels without their number,
    PyTorch's multi-tensor kernels by their functor (AdamW's step and a norm are otherwise
    one truncated name), anything else cut at 100 characters."""
    if "multi_tensor_apply_kernel" in name:
        functor = re.findall(r"(\w+Functor)\b", name)
        return f"multi_tensor_apply_kernel<{functor[0] if functor else '?'}>"
    return re.sub(r"^(triton_\w+?)_\d+$", r"\1", name)[:100]


def kernel_times(path: str | Path, steps: int) -> dict[str, tuple[float, float]]:
    """GPU ms and launches per step of each kernel (copies and memsets too) in a saved
    trace, by :func:`_kernel_name`, so that two compiles of one graph compare."""
    times: dict[str, list[float]] = {}
    for e in _complete_events(path):
        if e.get("cat") in GPU_WORK:
            name = _kernel_name(e["name"])
            entry = times.setdefault(name, [0.0, 0.0])
            entry[0] += e.get("dur", 0) / 1e3 / steps
            entry[1] += 1 / steps
    return {name: (ms, launches) for name, (ms, launches) in times.items()}


def print_kernel_diff(base: str | Path, other: str | Path, steps: int, top: int = 25) -> None:
    """The kernels whose GPU time per step differs most between two traces (``other`` minus
    ``base``): where a row does more GPU work than its peer, this names the work."""
    a, b = kernel_times(base, steps), kernel_times(other, steps)
    total_a, total_b = sum(ms for ms, _ in a.values()), sum(ms for ms, _ in b.values())
    print(f"| kernel | {Path(base).name} ms/step | {Path(other).name} ms/step | difference | "
          "launches/step |\n|---|---:|---:|---:|---:|")
    print(f"| (all, overlaps counted twice) | {total_a:.2f} | {total_b:.2f} | "
          f"{total_b - total_a:+.2f} | |")
    names = sorted(set(a) | set(b), key=lambda n: -abs(b.get(n, (0, 0))[0] - a.get(n, (0, 0))[0]))
    for name in names[:top]:
        (ms_a, n_a), (ms_b, n_b) = a.get(name, (0.0, 0.0)), b.get(name, (0.0, 0.0))
        print(f"| `{name}` | {ms_a:.2f} | {ms_b:.2f} | {ms_b - ms_a:+.2f} | {n_a:g} / {n_b:g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description="Summarise saved --profile traces.")
    parser.add_argument("traces", nargs="+", type=Path)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps in each trace")
    parser.add_argument("--diff", action="store_true",
                        help="two traces: the kernels whose GPU time differs most")
    args = parser.parse_args()
    if args.diff:
        if len(args.traces) != 2:
            parser.error(f"--diff takes two traces, got {len(args.traces)}")
        print_kernel_diff(*args.traces, steps=args.steps)
        return
    print_profiles([{"trace": t.name, "profile": summarise_trace(t, args.steps)}
                    for t in args.traces], label="trace")


if __name__ == "__main__":
    main()
