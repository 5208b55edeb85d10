"""Training loss per domain, and its reduction across ranks.

Each rank adds its samples to a table on the device, one row per domain: ``[loss sum,
samples, tokens]`` over the current train-loss interval (``sample_loss`` and
``batch["domain"]``, the Step output and Batch contracts), and the samples per domain of the
current optimizer step (the domains an anomaly names). Nothing is read by the host until an
interval ends; then the table is summed over ranks and becomes the ``TrainingState``'s
per-domain loss, its EMA and the tokens seen per domain. A checkpoint carries every rank's
part of an unfinished interval, so a resume continues it exactly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_aquila.callbacks.state import TrainingState


class DomainLossTable:
    """Per-domain loss sums, sample and token counts of the interval; samples of the step.

    ``names``: the domain names by index when known (the mixture's); else domains are named
    ``domain_<i>`` and ranks agree on the table's length before each reduction.
    """

    def __init__(self, names: list[str] | None = None, track_presence: bool = True) -> None:
        self.names = names
        self.table: torch.Tensor | None = None  # (domains, [loss sum, samples, tokens])
        #: samples per domain in this step (which domains a step drew, for the anomaly
        #: events); tables whose rows are not domains (score buckets) keep none
        self.track_presence = track_presence
        self.presence: torch.Tensor | None = None
        self.restored: list[Any] | None = None  # per rank, from a checkpoint

    def name(self, index: int) -> str:
        if self.names is not None and index < len(self.names):
            return self.names[index]
        return f"domain_{index}"

    def add(self, domain: torch.Tensor, sample_loss: torch.Tensor, tokens: float,
            device: torch.device) -> None:
        """One batch: each sample's loss and domain, ``tokens`` tokens per sample; on the
        device, without a host sync when the domain names are known."""
        domain = domain.reshape(-1).long()
        size = len(self.names) if self.names is not None else int(domain.max()) + 1
        self.table = grown(self.table, size, 3, device)
        rows = torch.stack([sample_loss.detach().reshape(-1).double(),
                            torch.ones_like(domain, dtype=torch.float64),
                            torch.full_like(domain, tokens, dtype=torch.float64)], dim=1)
        domain, rows = domain.to(device), rows.to(device)
        self.table.index_add_(0, domain, rows)
        if self.track_presence:
            self.presence = grown(self.presence, size, 1, device)
            self.presence.index_add_(0, domain, rows[:, 1:2])

    def reset_step(self) -> None:
        if self.presence is not None:
            self.presence.zero_()

    def sum_over_ranks(self, trainer: Trainer, table: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) of a per-domain table, which may be shorter on some ranks when the
        domain names are not known (a rank has not seen the last domains yet): lengths are
        agreed first. The input may be modified in place."""
        if trainer.world_size > 1 and self.names is None:
            columns = table.shape[1] if table.dim() == 2 else None
            table = grown(table, _longest(trainer, table), columns, table.device)
        return sum_over_ranks(trainer, table)

    def domains_present(self, trainer: Trainer, presence: torch.Tensor | None) -> list[str]:
        """The domains any rank drew samples of, by a step's ``presence``."""
        if presence is None:
            return []
        presence = self.sum_over_ranks(trainer, presence.reshape(-1).clone())
        return [self.name(i) for i, n in enumerate(presence.tolist()) if n > 0]

    def end_interval(self, trainer: Trainer, state: TrainingState,
                     ema_decay: float) -> dict[str, float]:
        """The interval's mean loss per domain over all ranks, its EMA and the tokens seen
        per domain, into ``state``; returns their metrics and starts the next interval."""
        metrics: dict[str, float] = {}
        if self.table is None:
            return metrics
        table = self.sum_over_ranks(trainer, self.table.clone()).tolist()
        self.table.zero_()
        copies = replication(trainer)
        for index, (loss_sum, samples, tokens) in enumerate(table):
            name = self.name(index)
            if samples > 0:
                mean = loss_sum / samples
                previous = state.train_loss.get(name)
                ema = mean if previous is None or not math.isfinite(previous) else (
                    ema_decay * previous + (1 - ema_decay) * mean)
                state.train_loss_last[name] = mean
                state.train_loss[name] = ema
                metrics[f"tsm/train_loss/{name}"] = mean
                metrics[f"tsm/train_loss_ema/{name}"] = ema
            seen = state.tokens_per_domain.get(name, 0) + round(tokens / copies)
            state.tokens_per_domain[name] = seen
            metrics[f"tsm/tokens/{name}"] = float(seen)
        state.tokens = sum(state.tokens_per_domain.values())
        state.train_step = state.step
        metrics["tsm/tokens_total"] = float(state.tokens)
        return metrics

    # -- checkpoint state: the monitor's "domain_tables" -------------------------------------
    def gathered(self, trainer: Trainer | None) -> list[list[list[float]]] | None:
        """Every rank's table of the current interval (its own samples since the last
        emission), rank 0's first, as exact float64 values. A checkpoint falls anywhere inside
        an interval; restoring each rank's own part makes the interval's losses, and so every
        policy decision taken on them, bitwise those of an uninterrupted run. Collective under
        several processes: Lightning builds a checkpoint's callback state on every rank."""
        if self.table is None:
            return None
        table = self.table.detach()
        if trainer is None or trainer.world_size == 1:
            return [table.tolist()]
        size = _longest(trainer, table)
        gathered = trainer.strategy.all_gather(grown(table.clone(), size, 3, table.device))
        return [part.tolist() for part in gathered]

    def restore(self, trainer: Trainer, device: torch.device) -> None:
        """Each rank takes back its own part of the interval's table (``restored``, from a
        checkpoint); on another world size (the parts cannot be reassigned) rank 0 takes
        their sum, so the interval's totals still hold."""
        tables, self.restored = self.restored, None
        if not tables:
            return
        parts = torch.tensor(tables, dtype=torch.float64)  # (ranks, domains, 3)
        if len(parts) == trainer.world_size:
            table = parts[trainer.global_rank]
        elif trainer.global_rank == 0:
            table = parts.sum(0)
        else:
            table = torch.zeros_like(parts[0])
        self.table = table.to(device)


def sum_over_ranks(trainer: Trainer, values: torch.Tensor) -> torch.Tensor:
    """All-reduce (sum); the tensor itself on one process."""
    if trainer.world_size == 1:
        return values
    return trainer.strategy.reduce(values, reduce_op="sum")


def replication(trainer: Trainer) -> int:
    """How many ranks see the same batch (a tensor-parallel group): world size over the
    data-parallel size the strategy gives its samplers."""
    try:
        replicas = trainer.strategy.distributed_sampler_kwargs["num_replicas"]
    except (AttributeError, KeyError, TypeError, AssertionError):
        return 1
    return max(1, trainer.world_size // max(1, int(replicas)))


def grown(table: torch.Tensor | None, size: int, columns: int | None,
          device: torch.device) -> torch.Tensor:
    """``table`` with at least ``size`` rows (new rows zero); a new zero table if ``None``."""
    shape = (size,) if columns is None else (size, columns)
    if table is None:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    if table.shape[0] >= size:
        return table
    bigger = torch.zeros(shape, dtype=table.dtype, device=table.device)
    bigger[: table.shape[0]] = table
    return bigger


def _longest(trainer: Trainer, table: torch.Tensor) -> int:
    """The longest table over all ranks."""
    size = torch.tensor([float(table.shape[0])], device=table.device)
    return int(trainer.strategy.reduce(size, reduce_op="max").item())


__all__ = ["DomainLossTable", "grown", "replication", "sum_over_ranks"]
