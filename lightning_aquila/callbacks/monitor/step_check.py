"""Each optimizer step's check: its global loss and gradient norm, and the anomalies they show
(a non-finite loss or gradient, a loss spike).

The step's loss (summed over ranks) and gradient norms per parameter group travel to the
host together, in one transfer. With deferred checks (the default on CUDA) that transfer is
queued behind the step's work and read at the end of the next step, so the host never waits
for the GPU; anomalies are then found one step later, still with their own step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import Trainer

from lightning_aquila.callbacks.monitor.domain_loss import sum_over_ranks
from lightning_aquila.callbacks.monitor.norms import HostRead
from lightning_aquila.callbacks.state import Anomaly, TrainingState


def due(every: int | None, step: int) -> bool:
    """Whether a measurement taken every ``every`` optimizer steps (``None``: off) is due."""
    return every is not None and step > 0 and step % every == 0


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


@dataclass
class StepCheck:
    """One step's loss and gradient norms, on their way to the host (see ``HostRead``), and
    what an anomaly record of that step needs."""

    step: int
    read: HostRead
    grad_groups: list[str]
    has_loss: bool
    presence: torch.Tensor | None  # samples per domain in the step, this rank
    batch_index: int | torch.Tensor
    num_batches: int


#: ``domains(trainer, presence)``: the names of the domains in a step (``DomainLossTable``).
DomainsOf = Callable[[Trainer, "torch.Tensor | None"], list[str]]
#: ``record(kind, step, **fields)``: where anomaly events go (the run log's ``event``).
RecordEvent = Callable[..., Any]


class StepChecker:
    """Accumulates a step's loss and gradient norms, launches its check when the step ends,
    and finishes it (now, or one step later when ``deferred``) into the ``TrainingState``.

    Args:
        detect_nonfinite, detect_spikes, spikes, max_anomalies: as the monitor's arguments.
        grad_norm_every, train_loss_every: the monitor's ``grad_norm_every_n_steps`` and
            ``train_loss_every_n_steps``, when ``tsm/grad_norm`` and ``tsm/loss`` are logged.
        loss_every: the monitor's ``loss_every_n_steps``: ``tsm/loss`` at these steps too.
    """

    def __init__(self, *, detect_nonfinite: bool, detect_spikes: bool, spikes: SpikeDetector,
                 max_anomalies: int, grad_norm_every: int | None,
                 train_loss_every: int | None, loss_every: int | None = None) -> None:
        self.detect_nonfinite, self.detect_spikes = detect_nonfinite, detect_spikes
        self.spikes, self.max_anomalies = spikes, max_anomalies
        self.grad_norm_every, self.train_loss_every = grad_norm_every, train_loss_every
        self.loss_every = loss_every
        self.anomaly_count = 0
        self.deferred = False  # resolved from deferred_checks at train start
        self.pending: StepCheck | None = None  # the last step's check, when deferred
        # the step being accumulated
        self.loss: Any = 0.0  # tensor once a batch arrives
        self.batches = 0
        self.data_index: Any = None  # batch["batch_index"] of the step's last batch
        self.grad_squares: dict[str, torch.Tensor] = {}  # squared norms, on device

    def _logs_loss(self, step: int) -> bool:
        return due(self.train_loss_every, step) or due(self.loss_every, step)

    def wants_grad_norm(self, step: int) -> bool:
        return self.detect_nonfinite or due(self.grad_norm_every, step)

    def add_batch(self, loss: torch.Tensor, data_index: Any) -> None:
        self.loss = self.loss + loss.detach().double()
        self.batches += 1
        self.data_index = data_index

    def add_grad_squares(self, squares: dict[Any, torch.Tensor]) -> None:
        for name, square in squares.items():
            self.grad_squares[str(name)] = self.grad_squares.get(str(name), 0.0) + square

    def reset_step(self) -> None:
        self.loss, self.batches, self.grad_squares = 0.0, 0, {}

    # -- the check ---------------------------------------------------------------------------
    def check(self, trainer: Trainer, state: TrainingState, presence: torch.Tensor | None,
              domains: DomainsOf, record: RecordEvent
              ) -> list[tuple[int, dict[str, float]]]:
        """This step's check, or with deferred checks the previous step's. Returns
        ``(step, metrics)`` for each check finished now; ``record`` gets each anomaly event."""
        check = self.launch(trainer, state, presence)
        if not self.deferred:
            return [(check.step, self.finish(trainer, check, state, domains, record))
                    ] if check else []
        finished = self.finish_pending(trainer, state, domains, record)
        self.pending = check
        return finished

    def finish_pending(self, trainer: Trainer, state: TrainingState, domains: DomainsOf,
                       record: RecordEvent
                       ) -> list[tuple[int, dict[str, float]]]:
        check, self.pending = self.pending, None
        return [(check.step, self.finish(trainer, check, state, domains, record))
                ] if check else []

    def launch(self, trainer: Trainer, state: TrainingState,
               presence: torch.Tensor | None) -> StepCheck | None:
        """Queues the step's loss (one small all-reduce) and gradient norms for the host,
        without waiting (none when detection is off and neither the train-loss nor the
        grad-norm interval is due)."""
        step = state.step
        wants_loss = (self.detect_nonfinite or self.detect_spikes or self._logs_loss(step))
        has_loss = wants_loss and isinstance(self.loss, torch.Tensor)
        names = list(self.grad_squares)
        values: list[torch.Tensor] = []
        if has_loss:
            # torch.full fills on the device; torch.tensor(..., device=cuda) would copy from
            # pageable memory and wait for everything queued on the GPU
            pair = torch.stack([self.loss.reshape(()),
                                torch.full((), float(self.batches), dtype=torch.float64,
                                           device=self.loss.device)])
            values.append(sum_over_ranks(trainer, pair))
        if names:
            squares = torch.stack([torch.as_tensor(self.grad_squares[n], dtype=torch.float64)
                                   for n in names])
            values.append(squares.to(values[0].device) if values else squares)
        if not values:
            return None
        presence = presence if has_loss else None
        if presence is not None and self.deferred:
            presence = presence.clone()  # zeroed for the next step before this one is read
        return StepCheck(step=step, read=HostRead(torch.cat(values)), grad_groups=names,
                         has_loss=has_loss, presence=presence,
                         batch_index=self._offending_batch_index(state),
                         num_batches=self.batches)

    def finish(self, trainer: Trainer, check: StepCheck, state: TrainingState,
               domains: DomainsOf, record: RecordEvent
               ) -> dict[str, float]:
        """Reads a launched check; updates the state's loss and gradient norm, records the
        anomalies it shows, and returns the step's metrics."""
        read = check.read.tolist()
        metrics: dict[str, float] = {}
        grad_sq = None
        if check.grad_groups:
            by_group = dict(zip(check.grad_groups, read[len(read) - len(check.grad_groups):]))
            grad_sq = sum(by_group.values())
            state.grad_norm = math.sqrt(grad_sq)
            state.grad_norm_groups = {k: math.sqrt(v) for k, v in by_group.items()}
            if due(self.grad_norm_every, check.step):
                metrics["tsm/grad_norm"] = state.grad_norm
                for group, norm in state.grad_norm_groups.items():
                    metrics[f"tsm/grad_norm_group/{group}"] = norm
        if not check.has_loss:
            return metrics
        loss_sum, count = read[0], read[1]
        state.loss = loss_sum / count
        if self._logs_loss(check.step):
            metrics["tsm/loss"] = state.loss
        found: list[Anomaly] = []
        if self.detect_nonfinite and not math.isfinite(state.loss):
            found.append(_anomaly(check, "nonfinite_loss", state.loss))
        if self.detect_nonfinite and grad_sq is not None and not math.isfinite(grad_sq):
            found.append(_anomaly(check, "nonfinite_grad", state.grad_norm))
        if self.detect_spikes:
            z = self.spikes.update(state.loss)
            if z is not None:
                found.append(_anomaly(check, "spike", state.loss, zscore=z))
        if not found:
            return metrics
        present = domains(trainer, check.presence)
        for anomaly in found:
            anomaly.domains = present
            self.anomaly_count += 1
            state.anomalies.append(anomaly)
            metrics[f"tsm/anomaly/{anomaly.kind}"] = 1.0
            if anomaly.zscore is not None:
                metrics["tsm/anomaly/zscore"] = anomaly.zscore
            record("anomaly", anomaly.step, type=anomaly.kind,
                   **{k: v for k, v in asdict(anomaly).items() if k not in ("kind", "step")})
        del state.anomalies[: -self.max_anomalies]
        metrics["tsm/anomaly/count"] = float(self.anomaly_count)
        return metrics

    def _offending_batch_index(self, state: TrainingState) -> int | torch.Tensor:
        """The data's own index of the step's last batch when the batch carries one
        (``batch["batch_index"]``: the sampler's numbering, which skipped batches do not
        shift), else the monitor's count of training batches so far, minus one. A tensor is
        kept as it is, and read only if the step turns out anomalous."""
        index = self.data_index
        if isinstance(index, torch.Tensor) and index.numel() > 0:
            return index.reshape(-1)[:1]
        if isinstance(index, int):
            return index
        return state.batch_index - 1


def _anomaly(check: StepCheck, kind: str, value: float | None,
             zscore: float | None = None) -> Anomaly:
    index = check.batch_index
    if isinstance(index, torch.Tensor):
        index = int(index.reshape(-1)[0])
    return Anomaly(step=check.step, kind=kind,
                   value=float("nan") if value is None else float(value),
                   batch_index=index, zscore=zscore, num_batches=check.num_batches)


__all__ = ["SpikeDetector", "StepCheck", "StepChecker", "due"]
