"""What the Training State Monitor measures with, each piece tested on its own: parameter and
layer names, sharded sums of squares, throughput/MFU, peak memory, the loss-spike detector, the
held-out loss metric, and the append-only JSON-lines writer of the run files. Kept apart from
``monitor.py`` so that the callback's file holds its hooks and this one the arithmetic."""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.distributed.tensor import DTensor, Partial, Replicate
from torchmetrics import Metric

from lightning_aquila.strategies.loss import token_losses

#: Wrapper modules that insert themselves into parameter names; stripped so that a layer has
#: the same name with or without compile / activation checkpointing.
_WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module",
                            "_forward_module"})

ValLossFn = Callable[[LightningModule, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


# -- pure helpers (tested on their own) ----------------------------------------------------------
def layer_of(parameter_name: str) -> str:
    """The layer a parameter belongs to: its path up to the first numeric index
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else its module path
    (``model.embed_tokens.weight`` -> ``model.embed_tokens``)."""
    parts = clean_name(parameter_name).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def clean_name(parameter_name: str) -> str:
    return ".".join(p for p in parameter_name.split(".") if p not in _WRAPPER_NAMES)


def shard_spec(tensor: torch.Tensor) -> tuple[Any, tuple[Any, ...]] | None:
    """For a DTensor: its mesh and, per mesh dimension, how a sum of its local shards reduces
    (sharded dims sum, replicated dims do not). ``None`` for a plain (whole) tensor."""
    if not isinstance(tensor, DTensor):
        return None
    placements = tuple(Partial() if p.is_shard() else Replicate() for p in tensor.placements)
    return tensor.device_mesh, placements


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


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
        square = torch.linalg.vector_norm(local.detach(), dtype=torch.float32).double().square()
        groups.setdefault(spec, []).append((key, square))
    totals: dict[Hashable, torch.Tensor] = {}
    for spec, items in groups.items():
        keys = list(dict.fromkeys(key for key, _ in items))
        index = {key: i for i, key in enumerate(keys)}
        values = torch.stack([square for _, square in items])
        positions = torch.tensor([index[key] for key, _ in items], device=values.device)
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


def throughput(
    tokens: float, seconds: float, replication: int, flops_per_token: float | None,
    peak_flops: float,
) -> tuple[float, float | None]:
    """Tokens/s per device and model FLOPs utilisation.

    ``tokens`` were processed by this rank in ``seconds``; ``replication`` ranks (a tensor-
    parallel group) process the same tokens together, so each device's share is
    ``tokens / seconds / replication``. MFU = that × FLOPs per token / peak FLOP/s per device.
    """
    per_device = tokens / seconds / replication
    mfu = None if flops_per_token is None else per_device * flops_per_token / peak_flops
    return per_device, mfu


def peak_memory(device: torch.device) -> int | None:
    """Bytes the caching allocator has handed out at most on ``device`` since the process
    started (``torch.cuda.max_memory_allocated``); ``None`` off CUDA, where no allocator
    keeps that count."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


class SpikeDetector:
    """Flags a value whose z-score against the previous ``window`` values exceeds ``zscore``.

    Flagged and non-finite values are kept out of the window, so one spike does not widen the
    band and hide the next. The standard deviation is floored at 0.1% of the window mean: a
    perfectly flat window must not turn every wiggle into a spike.
    """

    def __init__(self, window: int = 100, zscore: float = 5.0, min_history: int = 20) -> None:
        if window < 2:
            raise ValueError(f"spike_window must be at least 2, got {window}")
        if not 2 <= min_history <= window:
            raise ValueError(f"spike_min_history must be in [2, spike_window={window}], "
                             f"got {min_history}")
        if zscore <= 0:
            raise ValueError(f"spike_zscore must be positive, got {zscore}")
        self.zscore, self.min_history = zscore, min_history
        self.window: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> float | None:
        """Returns the z-score when ``value`` is a spike, else ``None`` (and remembers it)."""
        if not math.isfinite(value):
            return None
        if len(self.window) >= self.min_history:
            mean = sum(self.window) / len(self.window)
            var = sum((v - mean) ** 2 for v in self.window) / len(self.window)
            std = max(math.sqrt(var), 1e-3 * abs(mean), 1e-12)
            z = (value - mean) / std
            if z > self.zscore:
                return z
        self.window.append(value)
        return None


class HeldOutLoss(Metric):
    """Per-domain token-weighted held-out loss.

    Each sample's loss sum, token count and domain are kept and gathered across ranks at
    ``compute``; ranks need not agree beforehand on how many domains exist.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("domain", "loss_sum", "tokens"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, domain: torch.Tensor, loss_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        self.domain.append(domain.detach().reshape(-1).float())
        self.loss_sum.append(loss_sum.detach().reshape(-1).float())
        self.tokens.append(tokens.detach().reshape(-1).float())

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss sums and token counts per domain index (float64)."""

        def flat(state: Any) -> torch.Tensor:
            if isinstance(state, list):
                return torch.cat(state) if state else torch.zeros(0, device=self.device)
            return state

        domain = flat(self.domain).long()
        if domain.numel() == 0:
            empty = torch.zeros(0, dtype=torch.float64, device=self.device)
            return empty, empty
        size = int(domain.max()) + 1
        sums = torch.bincount(domain, flat(self.loss_sum).double(), minlength=size)
        tokens = torch.bincount(domain, flat(self.tokens).double(), minlength=size)
        return sums, tokens


def next_token_loss(
    pl_module: LightningModule, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample loss sums and counted tokens of ``pl_module(input_ids)`` against ``labels``
    (already shifted, -100 ignored): the default held-out measurement."""
    per_token, mask = token_losses(pl_module(batch["input_ids"]), batch["labels"])
    return per_token.sum(1), mask.sum(1)  # ignored tokens already hold 0


def _jsonable(value: Any) -> Any:
    """Strict JSON: non-finite floats become null, tensors and tuples plain values."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class JsonlAppender:
    """Appends one JSON object per line and flushes it, so readers (and a crash) see whole
    lines only, except possibly a torn last one."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held for the run)

    def write(self, record: dict[str, Any]) -> None:
        if self._file.closed:
            return
        self._file.write(json.dumps(_jsonable(record), ensure_ascii=False, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


__all__ = ["HeldOutLoss", "JsonlAppender", "SpikeDetector", "ValLossFn", "clean_name",
           "layer_of", "local_part", "next_token_loss", "shard_spec", "squares_on_device",
           "sum_of_squares", "throughput"]
