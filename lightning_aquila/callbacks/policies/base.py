"""The interface every mixture policy implements (:class:`MixturePolicy`), and what it does
for all of them: check the bounds, warn when they leave no room, set up the domains, and
normalise and bound each proposal (the arithmetic is ``lightning_aquila.domain_weights``)."""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import (
    Bound,
    check_bound,
    normalized,
    per_domain_bounds,
    project_to_bounds,
)


class MixturePolicy(ABC):
    """Decides the domain weights from the training state.

    Args:
        update_every: optimizer steps between two ``propose`` calls by the engine (it also
            asks once when training starts, so a policy's weights hold from the first batch).
        min_weight, max_weight: bounds on each domain's weight, one number for all domains
            or a mapping ``domain -> bound`` (unlisted domains: 0 and 1).
    """

    def __init__(self, update_every: int = 1, min_weight: Bound = 0.0,
                 max_weight: Bound = 1.0) -> None:
        if not isinstance(update_every, int) or isinstance(update_every, bool) or (
                update_every < 1):
            raise ValueError(f"{type(self).__name__}(update_every={update_every!r}) must be a "
                             "positive number of steps")
        for what, bound in (("min_weight", min_weight), ("max_weight", max_weight)):
            check_bound(bound, f"{type(self).__name__}({what})")
        self.update_every = update_every
        self.min_weight = dict(min_weight) if isinstance(min_weight, Mapping) else min_weight
        self.max_weight = dict(max_weight) if isinstance(max_weight, Mapping) else max_weight
        self.domains: list[str] | None = None
        self.natural: dict[str, float] | None = None
        self.unique_tokens: dict[str, float] | None = None
        self.budget_tokens_hint: int | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def stage(self) -> str | None:
        """The name of the data stage in force, for policies that have stages."""
        return None

    @property
    def quality_temperature(self) -> float | Mapping[str, float | None] | None:
        """The quality temperature this policy wants after its last ``propose`` (one value
        or ``{domain: τ}``, where ``"inf"`` means no reweighting); ``None``: no opinion, the
        datamodule's stays. The engine applies it through the mixture's
        ``set_quality_temperature`` (a quality curriculum)."""
        return None

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None, *,
              unique_tokens: Mapping[str, float] | None = None,
              budget_tokens: int | None = None) -> None:
        """Called by the engine when training starts, with what the mixture and the trainer
        can tell: the domains; each domain's share of the corpus (``natural``) and its unique
        training tokens (``unique_tokens``), when the datamodule knows them; and the run's
        training tokens (``budget_tokens``: ``trainer.max_steps`` times the tokens of a global
        batch), when both are known. Also checks the bounds can be met. Subclasses extend it
        to check their domain names."""
        self._keep_context(domains, natural, unique_tokens=unique_tokens,
                           budget_tokens=budget_tokens)
        try:
            project_to_bounds(dict.fromkeys(self.domains, 1.0 / len(self.domains)),
                              self.min_weight, self.max_weight)
        except ValueError as exc:
            raise ValueError(f"{self.name}(min_weight={self.min_weight!r}, max_weight="
                             f"{self.max_weight!r}) over domains {self.domains}: {exc}") from None
        self._warn_if_pinned()

    def _keep_context(self, domains: Sequence[str], natural: Mapping[str, float] | None, *,
                      unique_tokens: Mapping[str, float] | None = None,
                      budget_tokens: int | None = None) -> None:
        """Keep what ``setup`` is told, without checking the bounds: a policy that wraps
        another and shares its bounds (``QualityCurriculum``) leaves the check and the
        pinned-bounds warning to the wrapped policy's ``setup``, so each is made once."""
        self.domains = list(domains)
        self.natural = dict(natural) if natural else None
        self.unique_tokens = dict(unique_tokens) if unique_tokens else None
        self.budget_tokens_hint = budget_tokens

    def _warn_if_pinned(self) -> None:
        """Bounds that sum to exactly 1 (two domains under ``max_weight=0.5``, say) leave
        one feasible mixture: the policy runs but can never move the weights."""
        lo = per_domain_bounds(self.min_weight, self.domains, 0.0, "min_weight")
        hi = per_domain_bounds(self.max_weight, self.domains, 1.0, "max_weight")
        pinned = hi if abs(hi.sum() - 1.0) <= 1e-9 else lo if abs(lo.sum() - 1.0) <= 1e-9 else None
        if pinned is None or len(self.domains) < 2:
            return
        bound = "max_weight" if pinned is hi else "min_weight"
        warnings.warn(
            f"{self.name}(min_weight={self.min_weight!r}, max_weight={self.max_weight!r}) over "
            f"{len(self.domains)} domains allows only one mixture, "
            f"{ {d: round(float(w), 6) for d, w in zip(self.domains, pinned)} }: the policy "
            f"cannot change the weights. {'Raise' if pinned is hi else 'Lower'} {bound} "
            f"({'above' if pinned is hi else 'below'} {1 / len(self.domains):.3g} for equal "
            "bounds) to give it room.", UserWarning, stacklevel=3)

    def counts(self, state: TrainingState, current: Mapping[str, float]
               ) -> dict[str, float] | None:
        """Token counts per domain for the specs that need them (``natural``,
        ``temperature:T``, ``unimax:N``): the unique training tokens, else the corpus shares;
        without either, the tokens the monitor has counted so far (the natural proportions
        only when training started from them)."""
        return self.unique_tokens or self.natural or {
            d: float(n) for d, n in state.tokens_per_domain.items() if d in current}

    def due(self, step: int) -> bool:
        return step > 0 and step % self.update_every == 0

    def propose(self, state: TrainingState, current: Mapping[str, float]
                ) -> dict[str, float] | None:
        """New weights within the bounds (summing to 1), or ``None`` to keep ``current``."""
        if self.domains is None or set(self.domains) != set(current):
            self.setup(list(current), self.natural, unique_tokens=self.unique_tokens,
                       budget_tokens=self.budget_tokens_hint)
        weights = self._propose(state, {d: float(current[d]) for d in self.domains})
        return None if weights is None else self.bounded(weights)

    @abstractmethod
    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        """The policy's rule; its result is normalised and bounded by ``propose``."""

    def bounded(self, weights: Mapping[str, float]) -> dict[str, float]:
        return project_to_bounds(normalized(weights, self.name), self.min_weight,
                                 self.max_weight)

    def config(self) -> dict[str, Any]:
        """The constructor arguments: a resume compares them to tell a changed policy."""
        return {"update_every": self.update_every, "min_weight": self.min_weight,
                "max_weight": self.max_weight}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (stateless)
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"



__all__ = ["MixturePolicy"]
