"""Held-out loss per domain: what each validation batch adds (``HeldOutLoss``, a
torchmetrics ``Metric`` gathered across ranks, one per held-out part) and what a validation
run ends with: loss and perplexity per domain, their token-weighted average and the worst
domain (:func:`held_out_metrics`), for the ``dev`` part also into the ``TrainingState``
(:func:`account_held_out`), which is all policies read. The ``test`` part is logged only.
Token-weighted throughout: a domain's loss is its summed token losses over its counted
tokens."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torchmetrics import Metric

from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.model.head_loss import token_losses

ValLossFn = Callable[[LightningModule, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]


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


def held_out_metrics(sums: torch.Tensor, tokens: torch.Tensor, name: Callable[[int], str],
                     prefix: str) -> tuple[dict[str, float], dict[str, float]]:
    """Per-domain losses and the ``tsm/<prefix>_*`` metrics of one part's loss sums and
    token counts (``HeldOutLoss.compute``): loss and perplexity per domain, their
    token-weighted average and the worst domain; both empty when no token was counted."""
    if tokens.numel() == 0 or float(tokens.sum()) == 0:
        return {}, {}
    losses: dict[str, float] = {}
    metrics: dict[str, float] = {}
    for index, (loss_sum, count) in enumerate(zip(sums.tolist(), tokens.tolist())):
        if count > 0:
            domain = name(index)
            losses[domain] = loss = loss_sum / count
            metrics[f"tsm/{prefix}_loss/{domain}"] = loss
            metrics[f"tsm/{prefix}_ppl/{domain}"] = _exp(loss)
    average = float(sums.sum() / tokens.sum())
    metrics[f"tsm/{prefix}_loss_avg"] = average
    metrics[f"tsm/{prefix}_ppl_avg"] = _exp(average)
    metrics[f"tsm/{prefix}_loss_worst"] = max(losses.values())
    return losses, metrics


def account_held_out(state: TrainingState, sums: torch.Tensor, tokens: torch.Tensor,
                     name: Callable[[int], str], step: int) -> dict[str, float]:
    """Puts a validation run's ``dev`` loss sums and token counts into ``state`` (what
    policies read) and returns the ``tsm/val_*`` metrics; nothing when no token was
    counted. The ``test`` part never enters the state: see :func:`held_out_metrics`."""
    losses, metrics = held_out_metrics(sums, tokens, name, "val")
    if not losses:
        return {}
    state.val_loss = losses
    state.val_ppl = {d: _exp(loss) for d, loss in losses.items()}
    state.val_loss_avg = metrics["tsm/val_loss_avg"]
    state.val_worst_domain = max(losses, key=losses.__getitem__)
    state.val_step = step
    return metrics


class PartLosses:
    """One ``HeldOutLoss`` per held-out part (``"val"``: dev, ``"test"``), keyed by an index
    the owner chooses (a domain, a score bucket): moved and reset together at the start of a
    validation run, gathered part by part at its end."""

    def __init__(self) -> None:
        self.parts = {"val": HeldOutLoss(), "test": HeldOutLoss()}

    def __getitem__(self, part: str) -> HeldOutLoss:
        return self.parts[part]

    def reset(self, device: torch.device) -> None:
        for name, metric in self.parts.items():
            self.parts[name] = metric = metric.to(device)
            metric.reset()

    def computed(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
        """``(part, loss sums, token counts)`` of each part some batch reached, gathered
        across ranks (every rank calls it: each takes its share of every loader), then
        reset. A part no batch had is skipped, the same on every rank."""
        for part, metric in self.parts.items():
            if metric.update_count == 0:
                continue
            sums, tokens = metric.compute()
            metric.reset()
            yield part, sums, tokens


class HeldOutParts:
    """The ``dev`` (``"val"``) and ``test`` parts' ``HeldOutLoss``: which samples of a
    validation batch go to which part (``batch["part"]``: 1 is test; a batch without it is
    all dev), also for the score buckets, and what a validation run ends with."""

    def __init__(self) -> None:
        self.parts = PartLosses()

    def reset(self, device: torch.device) -> None:
        self.parts.reset(device)

    def add(self, batch: dict[str, Any], loss_sum: torch.Tensor, tokens: torch.Tensor,
            buckets: Any = None) -> None:
        """One batch's per-sample loss sums and token counts; ``buckets`` (``ScoreBuckets``)
        also gets them by ``batch["score"]`` when given."""
        domain, part = batch["domain"].reshape(-1), batch.get("part")
        loss_sum, tokens = loss_sum.reshape(-1), tokens.reshape(-1)
        score = batch["score"].reshape(-1) if buckets is not None else None
        if part is None:
            self.parts["val"].update(domain, loss_sum, tokens)
            if score is not None:
                buckets.add_held_out("val", score, loss_sum, tokens)
            return
        test = part.reshape(-1).to(loss_sum.device) == 1
        for name, picked in (("val", ~test), ("test", test)):
            part_loss, part_tokens = loss_sum[picked], tokens[picked]
            self.parts[name].update(domain[picked.to(domain.device)], part_loss, part_tokens)
            if score is not None:
                buckets.add_held_out(name, score[picked.to(score.device)], part_loss,
                                     part_tokens)

    def end(self, state: TrainingState, name: Callable[[int], str],
            step: int) -> dict[str, float]:
        """Every rank gathers; the dev part goes into ``state`` (what policies read), the
        test part into metrics only. A part no batch had is skipped (the same on every rank:
        each takes its share of every loader)."""
        metrics: dict[str, float] = {}
        for part, sums, tokens in self.parts.computed():
            metrics.update(account_held_out(state, sums, tokens, name, step) if part == "val"
                           else held_out_metrics(sums, tokens, name, part)[1])
        return metrics


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


__all__ = ["HeldOutLoss", "HeldOutParts", "ValLossFn", "account_held_out", "held_out_metrics",
           "next_token_loss"]
