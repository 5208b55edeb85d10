"""``DomainMixture``: this library's Mixture, the one object through which callbacks change
what data is drawn.

TSM and ATE never touch a dataset or sampler; they read ``mixture.weights`` and call
``mixture.set_weights``. Any datamodule that exposes such an object as ``datamodule.mixture``
works with them, which is what makes the callbacks reusable outside this library; the
contract, and the optional capabilities ``DomainMixture`` has all of (history, skips, the
consumed-batch count, token counts, listeners), are ``lightning_aquila/mixture_protocol.py``.

A change does not take effect "now" (the data loader has already drawn batches ahead): it
applies from the first batch index the sampler has not yet drawn, and that index is recorded.
The history of changes is therefore enough to replay the exact sample sequence, so it is part
of every checkpoint. Skips (``skip_batches``) are recorded the same way, and so are changes
of the quality temperature (``set_quality_temperature``, when the datamodule samples by
score): the sampler starts a new epoch order for a domain from the batch a change is
stamped with.

Every rank holds its own mixture and sampler: a policy must make the same call on every rank
at the same training step (the TSM's state is already reduced across ranks for that reason).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lightning_aquila.domain_weights import complete, normalized
from lightning_aquila.quality_temperature import temperatures

#: How far a given set of weights may be from summing to one before it is rejected.
SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class MixtureChange:
    """One entry of the mixture history: weights in force from ``batch_index`` on."""

    batch_index: int
    weights: dict[str, float]
    reason: str = ""
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchSkip:
    """Batches ``[batch_index, batch_index + count)`` are drawn (so every later batch stays
    where it was) but never handed to training."""

    batch_index: int
    count: int
    reason: str = ""
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def stop(self) -> int:
        return self.batch_index + self.count


@dataclass(frozen=True)
class TemperatureChange:
    """One entry of the quality-temperature history: ``temperature`` (``{domain: τ}``, ``None``
    for no reweighting) in force from ``batch_index`` on."""

    batch_index: int
    temperature: dict[str, float | None]
    reason: str = ""
    step: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def validate_weights(
    weights: Mapping[str, float], domains: Sequence[str], *, normalize: bool = False
) -> dict[str, float]:
    """Check a weight mapping against the domain list; return it complete and summing to 1.

    Domains left out get weight 0. Raises ``ValueError`` naming the offending domain or value
    (the checks are the policies' own, from ``lightning_aquila.domain_weights``).
    """
    full = complete(weights, domains, "mixture weights")
    return normalized(full, "mixture weights", sum_tolerance=None if normalize else SUM_TOLERANCE)


class DomainMixture:
    """Current domain weights plus the recorded history of every change.

    The sampler binds ``next_batch_index`` (the first batch it has not yet drawn) so that a
    change is stamped with the batch from which it really applies.

    Two facts about the data that repetition-aware policies read (``TokenCountingMixture``,
    optional in the contract):
    ``unique_tokens``, each domain's training tokens in the store (one epoch), and
    ``tokens_per_step``, the tokens of one global batch (one optimizer step; set by the
    datamodule once it knows the world size), whose product with ``trainer.max_steps`` is the
    run's token budget.
    """

    def __init__(
        self,
        domains: Sequence[str],
        weights: Mapping[str, float],
        *,
        normalize: bool = True,
        reason: str = "initial",
        unique_tokens: Mapping[str, int] | None = None,
        quality_temperature: Mapping[str, float | None] | None = None,
    ) -> None:
        if len(domains) == 0:
            raise ValueError("a mixture needs at least one domain")
        if len(set(domains)) != len(domains):
            raise ValueError(f"duplicate domain names in {list(domains)}")
        self.domains: list[str] = list(domains)
        #: The weights this mixture was configured with (the YAML's), as opposed to the ones
        #: a policy set since; a resume compares them to tell a deliberate change of config.
        self.configured: dict[str, float] = validate_weights(weights, self.domains,
                                                             normalize=normalize)
        self.history: list[MixtureChange] = [MixtureChange(0, dict(self.configured), reason)]
        self.skips: list[BatchSkip] = []
        #: The quality temperature history; empty when the datamodule does not sample by score.
        self.temperatures: list[TemperatureChange] = []
        if quality_temperature is not None:
            self.temperatures.append(TemperatureChange(
                0, temperatures(dict(quality_temperature), self.domains, "quality.temperature"),
                "initial"))
        self.unique_tokens: dict[str, int] | None = (
            {d: int(unique_tokens[d]) for d in self.domains} if unique_tokens else None)
        self.tokens_per_step: int | None = None
        self._next_batch_index: Callable[[], int] = lambda: 0
        self._consumed_batches: Callable[[], int] = lambda: 0
        self._listeners: list[Callable[[MixtureChange], None]] = []

    @property
    def weights(self) -> dict[str, float]:
        """The most recently requested weights (they may not have reached a batch yet)."""
        latest = self.history[-1].weights
        return {name: float(latest.get(name, 0.0)) for name in self.domains}

    @property
    def next_batch_index(self) -> int:
        """The batch a change requested now would apply from (the first one not yet drawn)."""
        return int(self._next_batch_index())

    @property
    def consumed_batches(self) -> int:
        """How many batches training has taken so far (the index of the next one it takes)."""
        return int(self._consumed_batches())

    def bind(self, next_batch_index: Callable[[], int],
             consumed_batches: Callable[[], int] | None = None) -> None:
        """Called by the sampler: tells the mixture which batch a change would apply from."""
        self._next_batch_index = next_batch_index
        if consumed_batches is not None:
            self._consumed_batches = consumed_batches

    def add_listener(self, listener: Callable[[MixtureChange], None]) -> None:
        """Run ``listener(change)`` after every accepted change (loggers, reports)."""
        self._listeners.append(listener)

    def set_weights(
        self,
        weights: Mapping[str, float],
        reason: str = "",
        *,
        normalize: bool = False,
        step: int | None = None,
        **extra: Any,
    ) -> MixtureChange:
        """Validate and record new weights; the mixture is unchanged if they are invalid."""
        full = validate_weights(weights, self.domains, normalize=normalize)
        return self._record(full, reason, step, dict(extra))

    def _record(self, full: dict[str, float], reason: str, step: int | None,
                extra: dict[str, Any], batch_index: int | None = None) -> MixtureChange:
        if batch_index is None:
            batch_index = self.next_batch_index
        batch_index = max(int(batch_index), self.history[-1].batch_index)
        change = MixtureChange(batch_index, full, reason, step, extra)
        # Two changes stamped with the same batch: the later wins in weights_at, and both stay
        # in the history so the report shows what was asked.
        self.history.append(change)
        for listener in self._listeners:
            listener(change)
        return change

    def skip_batches(self, count: int, reason: str = "", *, step: int | None = None,
                     **extra: Any) -> BatchSkip:
        """Skip the next ``count`` batches not yet drawn (recorded, so a resume skips them too).

        This is the data half of a spike rollback: the data position never moves backwards
        when a model is restored from an earlier checkpoint, so the batches since that
        checkpoint are not replayed; ``skip_batches`` additionally jumps over upcoming ones.
        Batches already drawn into the loader's prefetch queue are still delivered (the same
        bounded delay as a weight change).
        """
        if int(count) <= 0:
            raise ValueError(f"skip_batches needs a positive count, got {count!r}")
        skip = BatchSkip(self.next_batch_index, int(count), reason, step, dict(extra))
        self.skips.append(skip)
        return skip

    def is_skipped(self, batch_index: int) -> bool:
        return any(s.batch_index <= batch_index < s.stop for s in self.skips)

    @property
    def quality_temperature(self) -> dict[str, float | None] | None:
        """The latest requested temperature per domain (``None`` values: no reweighting);
        ``None`` when the datamodule does not sample by score."""
        return dict(self.temperatures[-1].temperature) if self.temperatures else None

    def set_quality_temperature(self, temperature: float | Mapping[str, float | None] | None,
                                reason: str = "", *, step: int | None = None,
                                **extra: Any) -> TemperatureChange:
        """Record a new temperature, one value for every domain or a mapping (domains left
        out keep theirs), from the first batch not yet drawn; a domain drawn from then on
        starts a new epoch order at it. Invalid values, or a mixture without scores, raise
        ``ValueError`` and leave it unchanged."""
        if not self.temperatures:
            raise ValueError("set_quality_temperature: the datamodule does not sample by score "
                             "(configure quality: {score: ...})")
        full = temperatures(temperature, self.domains, "quality temperature",
                            current=self.temperatures[-1].temperature)
        batch_index = max(self.next_batch_index, self.temperatures[-1].batch_index)
        change = TemperatureChange(batch_index, full, reason, step, dict(extra))
        self.temperatures.append(change)
        return change

    def temperature_at(self, batch_index: int) -> dict[str, float | None]:
        """The temperature per domain in force for batch ``batch_index`` (empty without
        quality sampling)."""
        if not self.temperatures:
            return {}
        found = bisect.bisect_right(self.temperatures, batch_index, key=lambda c: c.batch_index)
        return self.temperatures[max(found - 1, 0)].temperature

    def weights_at(self, batch_index: int) -> np.ndarray:
        """Weights (in ``domains`` order) in force for batch ``batch_index``."""
        # The history is ordered by batch_index (_record keeps it so); called for every batch.
        found = bisect.bisect_right(self.history, batch_index, key=lambda c: c.batch_index)
        current = self.history[max(found - 1, 0)]
        return np.array([current.weights.get(name, 0.0) for name in self.domains],
                        dtype=np.float64)

    def state_dict(self) -> dict[str, Any]:
        return {
            "domains": list(self.domains),
            "configured": dict(self.configured),
            "history": [asdict(c) for c in self.history],
            "skips": [asdict(s) for s in self.skips],
            **({"temperatures": [asdict(t) for t in self.temperatures]}
               if self.temperatures else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any], *,
                        next_batch_index: int | None = None) -> MixtureChange | None:
        """Restore the history; returns the change it appends when the configuration moved.

        The rule for resuming under a different configuration: when the checkpoint's domain
        list or configured weights differ from this mixture's (the YAML was edited), the
        history is kept and a change to this mixture's configured weights is appended at
        ``next_batch_index`` (default: the bound sampler's), with a reason starting
        ``"resume:"``. Otherwise the history continues unchanged, so weights a policy set
        before the checkpoint stay in force.
        """
        history = [MixtureChange(**change) for change in state["history"]]
        if not history:
            raise ValueError("checkpoint mixture state has an empty history")
        self.history = history
        self.skips = [BatchSkip(**skip) for skip in state.get("skips", [])]
        self._load_temperatures(state.get("temperatures", []), next_batch_index)
        old_domains = list(state["domains"])
        old_configured = dict(state.get("configured", history[0].weights))
        added = [d for d in self.domains if d not in old_domains]
        removed = [d for d in old_domains if d not in self.domains]
        moved = [d for d in self.domains
                 if abs(old_configured.get(d, 0.0) - self.configured[d]) > 1e-9]
        latest = history[-1].weights
        if not (added or removed or moved) and any(latest.get(d, 0.0) > 0 for d in self.domains):
            return None
        if added or removed:
            reason = f"resume: domains changed (added {added}, removed {removed})"
        else:
            reason = f"resume: configured weights changed for {moved}"
        return self._record(dict(self.configured), reason, None,
                            {"added": added, "removed": removed, "previous": dict(latest)},
                            batch_index=next_batch_index)

    def _load_temperatures(self, saved: Sequence[Mapping[str, Any]],
                           next_batch_index: int | None) -> None:
        """The checkpoint's temperature history, by the rule for weights: when the configured
        (initial) temperature differs from the checkpoint's, or quality sampling was switched
        on or off, a change to this configuration is appended at ``next_batch_index``."""
        configured = self.temperatures[0].temperature if self.temperatures else None
        history = [TemperatureChange(**change) for change in saved]
        at = self.next_batch_index if next_batch_index is None else int(next_batch_index)
        if configured is None:
            self.temperatures = []
            return
        if not history:
            self.temperatures = [TemperatureChange(at, configured,
                                                   "resume: quality sampling switched on")]
            return
        old = {d: history[0].temperature.get(d) for d in self.domains}
        if old != configured:
            history.append(TemperatureChange(max(at, history[-1].batch_index), configured,
                                             "resume: configured quality temperature changed",
                                             extra={"previous": dict(history[-1].temperature)}))
        self.temperatures = history
