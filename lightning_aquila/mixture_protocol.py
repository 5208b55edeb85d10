"""The Mixture contract, the one way the callbacks touch data, as ``typing.Protocol`` classes.

Required (:class:`Mixture`): ``domains``, ``weights`` and ``set_weights(weights, reason)``.
Any datamodule whose ``mixture`` has these works with the monitor and the engine; invalid
weights (an unknown domain, negative, NaN, all zero) raise ``ValueError`` naming the value
and leave the mixture unchanged.

Optional capabilities, one protocol each, which a mixture has or not:

* :class:`RecordedMixture`: a ``history`` of its changes, and a ``set_weights`` that takes
  ``step`` and metadata (``**meta``: the engine passes ``policy`` and ``stage``) to record
  with each change;
* :class:`SkippingMixture`: ``skip_batches(count, reason, step=...)``, the data half of a
  rollback;
* :class:`CountingMixture`: ``consumed_batches``, the data position a rollback records;
* :class:`TokenCountingMixture`: ``unique_tokens`` (each domain's training tokens: the
  natural mixture, and the repetition a policy may weigh) and ``tokens_per_step`` (with
  ``trainer.max_steps``, the run's token budget); either may be ``None`` (unknown);
* :class:`ObservableMixture`: ``add_listener(listener)``, called with every accepted change;
* :class:`QualityMixture`: ``quality_temperature`` (``{domain: τ}``, ``None`` when the data
  is not sampled by score) and ``set_quality_temperature(temperature, reason, step=...)``,
  recorded and resumed like a weight change (a quality curriculum).

A callback finds a mixture's capabilities once, when it starts (:class:`MixtureAccess`),
and asks that object, never the mixture's attributes one by one. ``DomainMixture`` has them
all. Nothing here imports the datamodules or the callbacks: both import this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

REQUIRED = ("domains", "weights", "set_weights")


@runtime_checkable
class Mixture(Protocol):
    """What every mixture has."""

    domains: Sequence[str]

    @property
    def weights(self) -> Mapping[str, float]: ...

    def set_weights(self, weights: Mapping[str, float], reason: str = "") -> Any: ...


@runtime_checkable
class RecordedMixture(Protocol):
    """Keeps the history of its changes (each with ``batch_index``, ``weights``, ``reason``,
    ``step`` and ``extra``, the metadata), and records metadata with each one."""

    history: Sequence[Any]

    def set_weights(self, weights: Mapping[str, float], reason: str = "", *,
                    step: int | None = None, **meta: Any) -> Any: ...


@runtime_checkable
class SkippingMixture(Protocol):
    """Skips the next ``count`` batches not yet drawn; returns the skip (``batch_index``,
    ``count``)."""

    def skip_batches(self, count: int, reason: str = "", *, step: int | None = None,
                     **meta: Any) -> Any: ...


@runtime_checkable
class CountingMixture(Protocol):
    """Knows how many batches training has taken (the index of the next one)."""

    consumed_batches: int


@runtime_checkable
class TokenCountingMixture(Protocol):
    """Knows each domain's training tokens and the tokens of one optimizer step."""

    unique_tokens: Mapping[str, int] | None
    tokens_per_step: int | None


@runtime_checkable
class ObservableMixture(Protocol):
    """Calls each listener with every accepted change."""

    def add_listener(self, listener: Callable[[Any], None]) -> None: ...


@runtime_checkable
class QualityMixture(Protocol):
    """Samples documents by score inside each domain, at a temperature the engine may change:
    ``quality_temperature`` is ``None`` when it does not sample by score."""

    quality_temperature: Mapping[str, float | None] | None

    def set_quality_temperature(self, temperature: Any, reason: str = "", *,
                                step: int | None = None, **meta: Any) -> Any: ...


class MixtureAccess:
    """A mixture and the capabilities it has, found once; what the callbacks call.

    Args:
        mixture: the object to check.
        who: who asks, for the error when ``mixture`` lacks a required member.
    """

    def __init__(self, mixture: Any, who: str) -> None:
        missing = [name for name in REQUIRED if not hasattr(mixture, name)]
        if missing or not callable(mixture.set_weights):
            raise ValueError(f"{who}: {type(mixture).__name__} is not a Mixture (it lacks "
                             f"{missing or ['a callable set_weights']}); the contract is "
                             "domains, weights and set_weights(weights, reason)")
        self.mixture = mixture
        self.recorded = isinstance(mixture, RecordedMixture)
        self.skips = isinstance(mixture, SkippingMixture)
        self.counts = isinstance(mixture, CountingMixture)
        self.counts_tokens = isinstance(mixture, TokenCountingMixture)
        self.observable = isinstance(mixture, ObservableMixture)
        self.samples_by_score = (isinstance(mixture, QualityMixture)
                                 and mixture.quality_temperature is not None)

    @classmethod
    def of(cls, datamodule: Any, who: str) -> MixtureAccess | None:
        """``datamodule.mixture``'s, or ``None`` when there is no mixture."""
        mixture = getattr(datamodule, "mixture", None)
        return None if mixture is None else cls(mixture, who)

    @property
    def domains(self) -> list[str]:
        return list(self.mixture.domains)

    @property
    def weights(self) -> dict[str, float]:
        return {name: float(w) for name, w in self.mixture.weights.items()}

    def set_weights(self, weights: Mapping[str, float], reason: str, **meta: Any) -> Any:
        """``set_weights(weights, reason=...)``, with ``meta`` (``step``, ...) for a mixture
        that records it."""
        return self.mixture.set_weights(weights, reason=reason,
                                        **(meta if self.recorded else {}))

    def history(self) -> list[Any]:
        return list(self.mixture.history) if self.recorded else []

    def skip_batches(self, count: int, reason: str, step: int) -> tuple[int, int] | None:
        """The batches skipped, ``(start, stop)``; ``None`` when the mixture cannot skip."""
        if not self.skips:
            return None
        skip = self.mixture.skip_batches(count, reason=reason, step=step)
        return int(skip.batch_index), int(skip.batch_index) + int(skip.count)

    def consumed_batches(self) -> int | None:
        return int(self.mixture.consumed_batches) if self.counts else None

    def unique_tokens(self) -> dict[str, int] | None:
        tokens = self.mixture.unique_tokens if self.counts_tokens else None
        return dict(tokens) if tokens else None

    def natural_weights(self) -> dict[str, float] | None:
        """Weights proportional to each domain's training tokens, when the mixture knows
        them."""
        tokens = self.unique_tokens()
        total = sum(tokens.values()) if tokens else 0
        return {d: n / total for d, n in tokens.items()} if total > 0 else None

    def budget_tokens(self, max_steps: int | None) -> int | None:
        """The run's training tokens: ``max_steps`` steps of ``tokens_per_step``."""
        per_step = self.mixture.tokens_per_step if self.counts_tokens else None
        return int(per_step) * max_steps if per_step and max_steps and max_steps > 0 else None

    def quality_temperature(self) -> dict[str, float | None] | None:
        """``{domain: τ}`` (``None``: no reweighting), or ``None`` when the mixture does not
        sample by score."""
        return dict(self.mixture.quality_temperature) if self.samples_by_score else None

    def set_quality_temperature(self, temperature: Any, reason: str, **meta: Any) -> Any:
        """``set_quality_temperature(temperature, reason=...)``, with ``meta`` (``step``,
        ...); a mixture that does not sample by score is a ``ValueError``."""
        if not self.samples_by_score:
            raise ValueError(f"{type(self.mixture).__name__} does not sample by score: a "
                             "quality temperature needs the datamodule's quality: {score: ...}")
        return self.mixture.set_quality_temperature(temperature, reason=reason, **meta)

    def add_listener(self, listener: Callable[[Any], None]) -> bool:
        """Listen to the mixture's changes; whether it reports them."""
        if self.observable:
            self.mixture.add_listener(listener)
        return self.observable


__all__ = ["CountingMixture", "Mixture", "MixtureAccess", "ObservableMixture",
           "QualityMixture", "RecordedMixture", "SkippingMixture", "TokenCountingMixture"]
