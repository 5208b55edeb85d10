"""Per-phase GPU memory of untimed steps for the benchmark scripts (``--memory DIR``): where a
row's peak exceeds its peer's, the summary says in which phase of the step (forward with the
loss, backward, optimizer step) and what was already allocated when the step began
(parameters, optimizer state, and anything a previous step left behind, such as gradients).
The ``torch.cuda.memory`` snapshot of the same steps (``DIR/<row>.memory.pickle``, open it at
https://pytorch.org/memory_viz) names the allocations behind each peak.

Phases are marked by whoever drives the step: the plain loop calls :meth:`StepMemory.phase`
around its calls, the fit path from Lightning hooks (``fit_throughput.py``'s ``Clock``). Each
phase's peak is ``torch.cuda.max_memory_allocated`` since the phase began (the peak counter is
reset at every mark), so phases run back to back and a peak belongs to one phase only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: the phases of a step, in order; ``optimizer`` includes gradient clipping and zero_grad
PHASES = ("forward", "backward", "optimizer")
GiB = 2**30


class StepMemory:
    """Measures optimizer steps ``[first, first + count)`` of one row when ``directory`` is set.

    Call ``step(i)`` at the start of every step ``i`` (and once with the index past the last
    step), ``phase(name)`` when each phase of :data:`PHASES` begins. On a CPU-only run it
    measures nothing and its summary says so, so ``--memory`` works in the CPU smoke test.
    """

    def __init__(self, directory: Path | None, row: str, first: int, count: int,
                 cuda: bool) -> None:
        self.directory, self.row, self.first, self.count = directory, row, first, count
        self.cuda = cuda
        self.summary: dict[str, Any] | None = None
        self._active = False
        self._phase: str | None = None
        self._start_bytes: list[int] = []
        self._peaks: dict[str, int] = {}

    @property
    def steps(self) -> int:
        """Steps this object adds after the others (0 when ``--memory`` is off)."""
        return self.count if self.directory is not None else 0

    def step(self, index: int) -> None:
        if self.directory is None or self.summary is not None:
            return
        if index == self.first and not self._active:
            self._active = True
            if self.cuda:
                torch.cuda.synchronize()
                # python stacks only: C++ frames make the snapshot slow and large
                torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
        elif index == self.first + self.count and self._active:
            self._close_phase()
            self._finish()
            return
        if self._active:
            self._close_phase()
            if self.cuda:
                torch.cuda.synchronize()
                self._start_bytes.append(torch.cuda.memory_allocated())

    def phase(self, name: str) -> None:
        """Phase ``name`` begins: the one before it ends and gets its peak."""
        if not self._active:
            return
        if name not in PHASES:
            raise ValueError(f"phase {name!r} is not one of {PHASES}")
        self._close_phase()
        self._phase = name
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def _close_phase(self) -> None:
        if self._phase is not None and self.cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            self._peaks[self._phase] = max(peak, self._peaks.get(self._phase, 0))
        self._phase = None

    def _finish(self) -> None:
        self._active = False
        if not self.cuda:
            self.summary = {"steps": self.count, "measured": False,
                            "reason": "no CUDA device: phases are not measured on the CPU"}
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        snapshot = self.directory / f"{self.row}.memory.pickle"
        torch.cuda.memory._dump_snapshot(str(snapshot))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.summary = {
            "steps": self.count, "measured": True,
            # the least of the steps: what stays allocated between steps
            "step_start_GiB": round(min(self._start_bytes) / GiB, 2),
            **{f"{name}_peak_GiB": round(self._peaks[name] / GiB, 2) if name in self._peaks
               else None for name in PHASES},
            "snapshot": str(snapshot),
        }


def print_memory(rows: list[dict[str, Any]], label: str = "row") -> None:
    """One table line per row measured with ``--memory``."""
    measured = [r for r in rows if r.get("memory")]
    if not measured:
        return
    print(f"\n| {label} | step start GiB | forward+loss peak GiB | backward peak GiB | "
          "optimizer peak GiB | snapshot |\n|---|---:|---:|---:|---:|---|")
    for r in measured:
        m = r["memory"]
        if not m.get("measured"):
            print(f"| {r[label]} | {m.get('reason', 'not measured')} | | | | |")
            continue
        print(f"| {r[label]} | {m['step_start_GiB']} | {m['forward_peak_GiB']} | "
              f"{m['backward_peak_GiB']} | {m['optimizer_peak_GiB']} | {m['snapshot']} |")
