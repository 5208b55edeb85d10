"""The TrainingState: the documented interface between the TSM (writer) and the ATE (reader).

It is a plain snapshot, not a live view: every field holds values already reduced across
ranks, so each rank's ATE sees the same state and takes the same decision without further
communication. Policies are written against these fields only.

The TSM updates the snapshot in ``on_train_batch_end`` once per optimizer step (and the
held-out fields in ``on_validation_epoch_end``); a callback listed after the TSM in
``trainer.callbacks`` sees the update in the same hook call.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Anomaly:
    """Something the TSM flagged: a loss spike or a non-finite loss/gradient.

    ``step`` is the optimizer step the offending batch(es) produced (``trainer.global_step``
    after that step). ``batch_index`` is the index of the last training batch of that step:
    the batch's own ``batch["batch_index"]`` when the data puts one there (the sampler's
    numbering), else the 0-based count, per rank, of training batches since the start of
    training. With gradient accumulation the step covers ``num_batches`` batches ending at
    ``batch_index``. ``domains`` are the domains present in those batches on any rank.
    """

    step: int
    kind: str  # "spike" | "nonfinite_loss" | "nonfinite_grad"
    value: float
    batch_index: int
    domains: list[str] = field(default_factory=list)
    zscore: float | None = None
    num_batches: int = 1


@dataclass
class TrainingState:
    """What the run looks like now. Losses are in nats per token."""

    step: int = 0  # optimizer steps completed (trainer.global_step)
    batch_index: int = 0  # training batches consumed by this run, per rank
    tokens: int = 0  # training tokens seen, summed over data-parallel ranks
    tokens_per_domain: dict[str, int] = field(default_factory=dict)
    loss: float | None = None  # last global training loss (mean over ranks and micro-batches)
    train_loss: dict[str, float] = field(default_factory=dict)  # EMA per domain
    train_loss_last: dict[str, float] = field(default_factory=dict)  # last interval's mean
    train_step: int | None = None  # step at which train_loss/tokens were last updated
    val_loss: dict[str, float] = field(default_factory=dict)  # held-out loss per domain
    val_ppl: dict[str, float] = field(default_factory=dict)
    val_loss_avg: float | None = None  # token-weighted over domains
    val_worst_domain: str | None = None
    val_step: int | None = None  # step at which val_* were measured
    grad_norm: float | None = None
    grad_norm_groups: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    tokens_per_sec: float | None = None  # per device
    mfu: float | None = None
    # layer -> {"norm", "update_ratio", "stage_change"} (the last two once measurable)
    weight_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    weight_step: int | None = None  # step at which weight_stats were measured
    anomalies: list[Anomaly] = field(default_factory=list)  # the most recent ones, oldest first
    mixture: dict[str, float] = field(default_factory=dict)
    stage: str | None = None  # name given to the last record_event("stage", name=...)
    stage_step: int | None = None  # step at which that stage began
    probes: dict[str, float] = field(default_factory=dict)  # "<probe>/<metric>" -> value

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        data = dict(data)
        data["anomalies"] = [Anomaly(**a) for a in data.get("anomalies", [])]
        return cls(**data)
