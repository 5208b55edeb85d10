"""Throughput and MFU over an interval of training steps, validation time excluded."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_aquila.callbacks.monitor.domain_loss import replication
from lightning_aquila.callbacks.state import TrainingState


def throughput(
    tokens: float, seconds: float, replication: int, flops_per_token: float | None,
    peak_flops: float | None,
) -> tuple[float, float | None]:
    """Tokens/s per device and model FLOPs utilisation.

    ``tokens`` were processed by this rank in ``seconds``; ``replication`` ranks (a tensor-
    parallel group) process the same tokens together, so each device's share is
    ``tokens / seconds / replication``. MFU = that × FLOPs per token / peak FLOP/s per device
    (``None`` without either).
    """
    per_device = tokens / seconds / replication
    mfu = (None if flops_per_token is None or peak_flops is None
           else per_device * flops_per_token / peak_flops)
    return per_device, mfu


def matmul_dtype(precision: str) -> torch.dtype:
    """The dtype matrix products run in under a trainer's ``precision`` (``"bf16-mixed"``)."""
    for prefix, dtype in (("bf16", torch.bfloat16), ("16", torch.float16),
                          ("64", torch.float64)):
        if str(precision).startswith(prefix):
            return dtype
    return torch.float32


class ThroughputMeter:
    """Counts this rank's training tokens and time since the last measurement.

    Args:
        peak_flops: peak FLOP/s of one device; ``None``: unknown, no MFU.
        flops_per_token: training FLOPs per token; ``None``: the module's
            ``config.flops_per_token(seq_len)`` at the last batch's length, when it has one.
    """

    def __init__(self, peak_flops: float | None, flops_per_token: float | None) -> None:
        self.peak_flops, self.flops_per_token = peak_flops, flops_per_token
        self.seq_len: int | None = None  # of the last training batch
        self.start()

    def resolve_peak(self, given: float | None, trainer: Any) -> None:
        """The peak FLOP/s MFU is measured against: ``given``, else what Lightning's
        ``get_available_flops`` knows of the trainer's device at its precision (none on a
        CPU or an unlisted chip: then no MFU)."""
        from lightning.fabric.utilities.throughput import get_available_flops

        self.peak_flops = given if given is not None else get_available_flops(
            trainer.strategy.root_device, matmul_dtype(trainer.precision))

    def start(self) -> None:
        self._since, self._tokens, self._paused = time.perf_counter(), 0, 0.0
        self._paused_at: float | None = None

    def add_batch(self, input_ids: torch.Tensor) -> None:
        self._tokens += input_ids.numel()
        self.seq_len = input_ids.shape[-1]

    def pause(self) -> None:
        self._paused_at = time.perf_counter()

    def resume(self) -> None:
        if self._paused_at is not None:
            self._paused += time.perf_counter() - self._paused_at
            self._paused_at = None

    def measure(self, trainer: Trainer, pl_module: LightningModule,
                state: TrainingState) -> dict[str, float]:
        """Tokens/s per device and MFU since the last measurement, into ``state``."""
        now = time.perf_counter()
        seconds = now - self._since - self._paused
        tokens = self._tokens
        self._since, self._tokens, self._paused = now, 0, 0.0
        if seconds <= 0 or tokens == 0:
            return {}
        per_device, mfu = throughput(tokens, seconds, replication(trainer),
                                     self._per_token(pl_module), self.peak_flops)
        state.tokens_per_sec, state.mfu = per_device, mfu
        metrics = {"tsm/tokens_per_sec": per_device}
        if mfu is not None:
            metrics["tsm/mfu"] = mfu
        peak = peak_memory(pl_module.device)
        if peak is not None and trainer.world_size > 1:  # every rank is on CUDA, or none is
            peak = float(trainer.strategy.reduce(
                torch.tensor([float(peak)], device=pl_module.device), reduce_op="max"))
        if peak is not None:
            metrics["tsm/peak_memory_gib"] = peak / 2**30
        return metrics

    def _per_token(self, pl_module: LightningModule) -> float | None:
        if self.flops_per_token is not None:
            return self.flops_per_token
        config = getattr(pl_module, "config", None)
        if callable(getattr(config, "flops_per_token", None)) and self.seq_len:
            return float(config.flops_per_token(self.seq_len))
        return None


def peak_memory(device: torch.device) -> int | None:
    """Bytes the caching allocator has handed out at most on ``device`` since the process
    started (``torch.cuda.max_memory_allocated``); ``None`` off CUDA, where no allocator
    keeps that count."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device)


__all__ = ["ThroughputMeter", "peak_memory", "throughput"]
