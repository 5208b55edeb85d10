"""Each tensor's sum of squares, computed once for every caller that asks about the same
tensors in the same state.

The fit path reads the gradients' norms twice per optimizer step: the TrainingStateMonitor
(``tsm/grad_norm`` and its non-finite check, in ``on_before_optimizer_step``) and, right
after, AquilaLM's gradient clipping. Each read is a pass over every fp32 gradient (1.6 ms of a
197 ms step for ``aquila2-1b`` on an H100, docs/benchmarks.md, "Fit path"), so the second
caller takes the first one's result. Neither knows of the other: both ask this module.

A result is reused only for the very same tensor objects, held by weak reference (so a new
gradient that happens to get a freed one's ``id`` cannot match), at the same version counters
(an in-place change, such as another micro-batch's gradients accumulating or the fused step
writing clipped gradients back, bumps them).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class _Computed:
    tensors: tuple[weakref.ref, ...]
    versions: tuple[int, ...]
    squares: torch.Tensor

    def holds(self, tensors: list[torch.Tensor], versions: tuple[int, ...]) -> bool:
        return (versions == self.versions and len(tensors) == len(self.tensors)
                and all(ref() is tensor for ref, tensor in zip(self.tensors, tensors)))


_last: _Computed | None = None


def squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's sum of squares (fp32 accumulation, returned as float64 on the tensors'
    device), in the order given; the previous call's result when it was for the same tensors
    in the same state."""
    global _last
    versions = tuple(tensor._version for tensor in tensors)
    if _last is not None and _last.holds(tensors, versions):
        return _last.squares
    squares = _compute(tensors)
    _last = _Computed(tuple(weakref.ref(t) for t in tensors), versions, squares)
    return squares


def _compute(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One multi-tensor kernel per device and dtype (``torch._foreach_norm``, as PyTorch's own
    ``clip_grad_norm_`` does) instead of a few kernels per tensor: a 1B model has ~150
    parameters, and at every step the launches add up."""
    by_kind: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, tensor in enumerate(tensors):
        by_kind.setdefault((tensor.device, tensor.dtype), []).append(i)
    parts = []
    for (_, dtype), positions in by_kind.items():
        batch = [tensors[i] for i in positions]
        # bf16/fp16 accumulate in fp32, without a cast copy of the tensors
        wide = {} if dtype in (torch.float64, torch.float32) else {"dtype": torch.float32}
        parts.append(torch.stack(torch._foreach_norm(batch, 2, **wide)).double())
    squares = torch.cat(parts).square()
    order = [i for positions in by_kind.values() for i in positions]
    if order == sorted(order):
        return squares
    place = [0] * len(order)
    for j, i in enumerate(order):
        place[i] = j
    return squares[torch.tensor(place, device=squares.device)]


__all__ = ["squared_norms"]
