"""The TrainingState: the documented interface between the TSM (writer) and the ATE (reader).

It is a plain snapshot, not a live view: every field holds values already reduced across
ranks, so each rank's ATE sees the same state and takes the same decision without further
communication. Policies are written against these fields only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Anomaly:
    """Something the TSM flagged: a loss spike or a non-finite loss/gradient."""

    step: int
    kind: str  # "spike" | "nonfinite_loss" | "nonfinite_grad"
    value: float
    batch_index: int
    domains: list[str] = field(default_factory=list)
    zscore: float | None = None


@dataclass
class TrainingState:
    """What the run looks like now. Losses are in nats per token."""

    step: int = 0  # optimizer steps completed (trainer.global_step)
    batch_index: int = 0  # training batches consumed by this run, per rank
    tokens: int = 0  # training tokens seen, summed over data-parallel ranks
    tokens_per_domain: dict[str, int] = field(default_factory=dict)
    loss: float | None = None  # last global training loss
    train_loss: dict[str, float] = field(default_factory=dict)  # EMA per domain
    train_loss_last: dict[str, float] = field(default_factory=dict)  # last interval's mean
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
    weight_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    anomalies: list[Anomaly] = field(default_factory=list)
    mixture: dict[str, float] = field(default_factory=dict)
    stage: str | None = None
    probes: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingState:
        data = dict(data)
        data["anomalies"] = [Anomaly(**a) for a in data.get("anomalies", [])]
        return cls(**data)
