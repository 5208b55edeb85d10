"""Sums of squares of (possibly sharded) tensors, for gradient norms and weight statistics:
each local tensor's from ``lightning_aquila.squared_norms`` (one multi-tensor kernel per
device and dtype, shared with AquilaLM's clipping), reduced over the shards of a DTensor
(never gathered), and read by the host without stalling the device (``HostRead``)."""

from __future__ import annotations

import functools
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate

from lightning_aquila.squared_norms import squared_norms


def shard_spec(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]] | None:
    """For a DTensor: its mesh and, per mesh dimension, how a sum of its local shards reduces
    (sharded dims sum, replicated dims do not). ``None`` for a plain (whole) tensor."""
    if not isinstance(tensor, DTensor):
        return None
    placements = tuple(Partial() if p.is_shard() else Replicate() for p in tensor.placements)
    return tensor.device_mesh, placements


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class HostRead:
    """A small device tensor on its way to the host without stalling the device: the copy is
    queued behind the work that produced it (into pinned memory, with an event), and
    ``tolist`` waits only for that copy, not for work queued after it. On the CPU it is the
    tensor itself."""

    def __init__(self, values: torch.Tensor) -> None:
        self._event = None
        if values.device.type == "cuda":
            self._host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self._host.copy_(values, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = values

    def tolist(self) -> list[Any]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


@functools.lru_cache(maxsize=64)
def _index_on(positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``positions`` as an index tensor on ``device``, made once: the parameter groups are
    the same every step, and ``torch.tensor(..., device=cuda)`` is a copy from pageable
    host memory that waits for all the work queued on the GPU (a drained queue per step)."""
    return torch.tensor(positions, device=device)


def squares_on_device(
    pieces: Iterable[tuple[Hashable, torch.Tensor, tuple[Any, tuple[Any, ...]] | None]],
) -> dict[Hashable, torch.Tensor]:
    """Sum of squared entries per key over ``(key, local tensor, shard spec)`` pieces, as
    0-dim float64 tensors on the pieces' device: no host sync, so a caller can read them
    together with other values in one transfer.

    Each rank squares and sums only its local shard; the per-key sums of pieces that share a
    shard spec go through one reduction over the mesh dimensions that shard them. Whole
    weights are never gathered, and replicated copies are not counted twice. All ranks must
    call this with the same keys in the same order (they do: every rank has the same
    parameter names).
    """
    groups: dict[Any, list[tuple[Hashable, torch.Tensor]]] = {}
    for key, local, spec in pieces:
        # gradients as they are (no detached alias), so that the clip's read of the same
        # gradients finds them in squared_norms' memory
        local = local.detach() if local.requires_grad else local
        groups.setdefault(spec, []).append((key, local))
    totals: dict[Hashable, torch.Tensor] = {}
    for spec, items in groups.items():
        keys = list(dict.fromkeys(key for key, _ in items))
        index = {key: i for i, key in enumerate(keys)}
        values = squared_norms([local for _, local in items])
        positions = _index_on(tuple(index[key] for key, _ in items), values.device)
        sums = torch.zeros(len(keys), dtype=torch.float64, device=values.device)
        sums.index_add_(0, positions, values)
        if spec is not None:
            mesh, placements = spec
            sums = DTensor.from_local(sums, mesh, placements, run_check=False).full_tensor()
        for key, value in zip(keys, sums.unbind()):
            totals[key] = totals[key] + value if key in totals else value
    return totals


def sum_of_squares(
    pieces: Iterable[tuple[Hashable, torch.Tensor, tuple[Any, tuple[Any, ...]] | None]],
) -> dict[Hashable, float]:
    """``squares_on_device`` read back to the host (one transfer)."""
    totals = squares_on_device(pieces)
    if not totals:
        return {}
    return dict(zip(totals, torch.stack(list(totals.values())).tolist()))


__all__ = ["HostRead", "local_part", "shard_spec", "squares_on_device", "sum_of_squares"]
