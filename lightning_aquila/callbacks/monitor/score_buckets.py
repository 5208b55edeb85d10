"""Loss by score quantile: training and held-out loss per bucket of a document score.

Sampling by score (``DomainDataModule(quality=...)``) changes *which* text a model sees; what
it does to the model shows in the loss on low- and high-scored text separately. Batches then
carry each window's ``score`` (the token-weighted mean of its documents' scores), so the
monitor puts each sample in a bucket by its score and keeps, per bucket, what it keeps per
domain: the training loss over the train-loss interval (``sample_loss``, the Step output
contract) and the held-out loss of the dev and test parts at every validation run.

The bucket edges are fixed once, when training first starts, and then kept (checkpoints
carry them): a bucket must mean the same text for the whole run, or its curve would move
because its edges did. By default they are the quantiles of the score over the *training*
documents of all domains pooled (``DomainDataModule.score_quantiles``): that is the
population sampling draws from; held-out documents are few (noisy quantiles) and the test
part's scores should shape nothing, even a bucket edge. The edges can also be given.

Training buckets use the per-domain machinery (``DomainLossTable``): an index per sample,
on the device, no host read until the interval ends, summed over ranks, each rank's part of
an unfinished interval in the checkpoint. Held-out buckets use ``HeldOutLoss`` with the
bucket index in place of the domain index. A sample whose score is NaN (a domain none of
whose documents is scored) goes to a last, unlogged row.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_aquila.callbacks.monitor.domain_loss import DomainLossTable, sum_over_ranks
from lightning_aquila.callbacks.monitor.held_out import PartLosses


def check_edges(edges: Sequence[float]) -> list[float]:
    """Inner edges as given: finite and strictly increasing, at least one."""
    values = [float(e) for e in edges]
    if not values or not all(math.isfinite(v) for v in values) or any(
            b <= a for a, b in itertools.pairwise(values)):
        raise ValueError(f"TrainingStateMonitor(score_edges={list(edges)!r}): give one or "
                         "more finite, strictly increasing scores")
    return values


class ScoreBuckets:
    """Loss per score bucket. Bucket ``k`` (named ``q<k+1>``) holds scores in
    ``[edges[k-1], edges[k])``: the first everything below ``edges[0]``, the last everything
    from ``edges[-1]`` on (held-out windows scored outside the training range included).

    Args:
        buckets: how many quantile buckets to make from the data (``None``: none).
        edges: inner edges to use instead (``len(edges) + 1`` buckets).
    """

    def __init__(self, buckets: int | None, edges: Sequence[float] | None = None) -> None:
        if buckets is not None and (not isinstance(buckets, int) or buckets < 2):
            raise ValueError(f"TrainingStateMonitor(score_buckets={buckets!r}): use 2 or more "
                             "buckets, or None to turn loss by score off")
        self.buckets = buckets
        self.given = check_edges(edges) if edges is not None else None
        self.score: str | None = None
        self.edges: list[float] | None = None  # inner edges, once fixed
        self.range: list[float] | None = None  # lowest and highest training score
        self.documents: int | None = None
        self._inner: torch.Tensor | None = None
        self._train: DomainLossTable | None = None
        self._restored_table: list[Any] | None = None
        self.held_out = PartLosses()

    @property
    def active(self) -> bool:
        return self.edges is not None

    @property
    def names(self) -> list[str]:
        return [f"q{k + 1}" for k in range(len(self.edges or []) + 1)]

    # -- setup ---------------------------------------------------------------------------------
    def start(self, trainer: Trainer, device: torch.device,
              event: Callable[..., Any]) -> None:
        """Fixes the edges (unless a checkpoint brought them), puts them on ``device`` and
        records them in the run log (``score_buckets`` event); takes back the checkpoint's
        part of an unfinished interval. Off, silently, without edges to be had."""
        source = "checkpoint"
        if self.edges is None:
            source = self._fix_edges(getattr(trainer, "datamodule", None))
        if self.edges is None:
            return
        self._inner = torch.tensor(self.edges, dtype=torch.float32, device=device)
        if self._train is None:  # names known: no host read per batch
            self._train = DomainLossTable([*self.names, "unscored"], track_presence=False)
        self._train.restored, self._restored_table = self._restored_table, None
        self._train.restore(trainer, device)
        event("score_buckets", trainer.global_step, score=self.score, edges=self.edges,
              buckets=len(self.names), range=self.range, documents=self.documents,
              source=source)

    def _fix_edges(self, datamodule: Any) -> str:
        quality = getattr(datamodule, "quality", None)
        if self.given is not None:
            self.edges, self.score = self.given, getattr(quality, "score", None) or "score"
            return "given"
        quantiles_of = getattr(datamodule, "score_quantiles", None)
        if self.buckets is None or not callable(quantiles_of):
            return ""
        found = quantiles_of([k / self.buckets for k in range(self.buckets + 1)])
        if found is None or not found[2]:  # no quality config, or no document scored
            return ""
        self.score, quantiles, self.documents = found[0], found[1], int(found[2])
        self.edges, self.range = quantiles[1:-1], [quantiles[0], quantiles[-1]]
        return "training documents"

    # -- training ------------------------------------------------------------------------------
    def bucket_of(self, score: torch.Tensor) -> torch.Tensor:
        """Each sample's bucket index, on the device (NaN: the unscored row)."""
        score = score.reshape(-1).to(self._inner.device, torch.float32)
        index = torch.bucketize(score, self._inner, right=True)
        return torch.where(torch.isnan(score), len(self.edges) + 1, index)

    def add(self, score: torch.Tensor, sample_loss: torch.Tensor, tokens: float,
            device: torch.device) -> None:
        """One training batch, without a host read."""
        self._train.add(self.bucket_of(score), sample_loss, tokens, device)

    def end_interval(self, trainer: Trainer) -> dict[str, float]:
        """The interval's mean training loss and share of samples per bucket, over all ranks
        (``tsm/train_loss_by_score/q<k>``, ``tsm/train_share_by_score/q<k>``); starts the
        next interval."""
        if self._train is None or self._train.table is None:
            return {}
        table = sum_over_ranks(trainer, self._train.table.clone()).tolist()
        self._train.table.zero_()
        return _bucket_metrics("train", self.names,
                               [(loss, samples) for loss, samples, _ in table])

    # -- held-out ------------------------------------------------------------------------------
    def reset_held_out(self, device: torch.device) -> None:
        self.held_out.reset(device)

    def add_held_out(self, part: str, score: torch.Tensor, loss_sum: torch.Tensor,
                     tokens: torch.Tensor) -> None:
        """One held-out batch's samples of ``part`` (``"val"``: dev, or ``"test"``); called
        for every batch, even with none of that part, so ranks agree on the update count."""
        self.held_out[part].update(self.bucket_of(score).to(loss_sum.device), loss_sum, tokens)

    def end_held_out(self) -> dict[str, float]:
        """Token-weighted loss and share of tokens per bucket of each part, gathered across
        ranks (``tsm/val_loss_by_score/q<k>``, ``tsm/test_loss_by_score/q<k>``, ...)."""
        metrics: dict[str, float] = {}
        for part, sums, tokens in self.held_out.computed():
            metrics.update(_bucket_metrics(part, self.names,
                                           list(zip(sums.tolist(), tokens.tolist()))))
        return metrics

    # -- checkpoint state: the monitor's "score_buckets" ---------------------------------------
    def state_dict(self, trainer: Trainer | None) -> dict[str, Any]:
        """The edges and what they came from, and every rank's part of the interval
        (collective under several processes, like the per-domain table)."""
        table = self._train.gathered(trainer) if self._train is not None else None
        return {"score": self.score, "edges": self.edges, "range": self.range,
                "documents": self.documents, "table": table}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.score, self.edges = state["score"], list(state["edges"])
        self.range, self.documents = state.get("range"), state.get("documents")
        self._train = None
        self._restored_table = state.get("table")  # applied in start()


def _bucket_metrics(part: str, names: list[str], rows: Sequence[tuple[float, float]]
                    ) -> dict[str, float]:
    """Mean loss (loss sum over count) and share of the count per bucket; ``rows`` has one
    ``(loss sum, count)`` per bucket, then possibly the unscored row (left out)."""
    rows = list(rows)[:len(names)]
    rows += [(0.0, 0.0)] * (len(names) - len(rows))  # buckets no held-out sample reached
    total = sum(count for _, count in rows)
    if total <= 0:
        return {}
    metrics: dict[str, float] = {}
    for name, (loss, count) in zip(names, rows):
        if count > 0:
            metrics[f"tsm/{part}_loss_by_score/{name}"] = loss / count
        metrics[f"tsm/{part}_share_by_score/{name}"] = count / total
    return metrics


__all__ = ["ScoreBuckets", "check_edges"]
