"""A reference-free, repetition-aware mixture: plan the rest of the token budget so that the
next token of every domain is worth the same drop in held-out loss, counting repeated tokens
as worth less than fresh ones (:class:`EffectiveDataMixture`).

What it reads is what only this library has together: each domain's unique training tokens
(the DMU's store), the tokens each domain has had so far (the TSM's
``state.tokens_per_domain``, so its epochs), the run's token budget (``trainer.max_steps``
times the tokens of a global batch) and the ``dev`` held-out losses over time
(``state.val_loss``; the ``test`` part is never read).

**The model.** Domain ``i``'s dev loss falls as a power law of its *effective* tokens,
``L_i = E_i + A_i D_i^(-alpha)``, where ``D_i = D(n_i; U_i)`` counts ``n_i`` tokens drawn from
``U_i`` unique ones as in the data-constrained scaling law (Muennighoff et al. 2023, arXiv
2305.16264, eq. 5): the first pass counts in full, and the ``r``-th repetition of a token is
worth ``exp(-r / R*)`` of a fresh one, ``D = U + U R* (1 - exp(-(n/U - 1) / R*))`` past one
epoch. The marginal value of one more token of domain ``i`` is then
``g_i(n) = alpha A_i D^(-alpha-1) dD/dn``.

**The plan.** At every update the remaining budget ``R`` is shared out so that the domains'
final token counts ``n_i >= n_i(now)``, summing to what is consumed plus ``R``, equalise
``g_i`` (water-filling: a domain whose value is below the others' even at its present count
gets nothing more). The weights are each domain's planned remaining tokens over ``R``, kept
within a factor ``max_swing`` of the plan's average share ``n_i / budget``: a domain ahead of
its plan (sampling noise, or a plan that changed late) draws less for a while, never nothing,
and one behind draws more, never all, however little budget is left. With
equal ``A_i`` this plan is uniform until repetition makes a domain's tokens worth less, then it
caps that domain softly: a UniMax mixture (Chung et al. 2023) whose caps are the point where a
repeated token stops paying, derived from the budget and the sizes instead of given.

**The adaptation.** After ``warmup_fraction`` of the budget, each domain's ``A_i`` is measured
from its dev losses: the slope ``s_i = -dL_i / d log D_i`` over the last ``window``
evaluations (least squares), shrunk toward the slope pooled over all domains by as much
evidence as a typical domain holds (so a domain whose own tokens barely moved in the window,
and whose slope is therefore unknown, gets the pooled one), floored at ``1 / max_tilt`` of the
pooled slope (a domain whose dev loss rises with its own tokens is over-repeated: its value
is taken as small, not negative), then ``A_i ∝ s_i D_i^alpha`` relative to the domains'
geometric mean, within ``[1 / max_tilt, max_tilt]``. A domain that learns faster per token
gets more; one whose dev loss has stopped falling while it repeats gets less, before its
loss turns up.

Differences from the work it builds on, on purpose:

* ADO (Jiang et al. 2024, arXiv 2410.11820, github.com/yidingjiang/ado) also needs no
  reference and allocates by the derivative of per-domain power laws fitted online. Its code
  fits ``L(n) = E + B n^(-alpha)`` with three free parameters per domain on the (smoothed)
  *training* loss against the *total* steps (``use_same_step_size``), multiplies by the
  natural distribution and a credit term, and ignores the tokens still to come. Here the
  *dev* loss is fitted (a repeated domain's training loss keeps falling while its held-out
  loss does not), against the domain's own *effective* tokens, with one free parameter per
  domain (the local slope; ``alpha`` is shared and only extrapolates), shrunk toward the
  pooled slope; and the remaining budget is planned to the end of the run, which is where
  repetition is decided.
* Muennighoff et al. fit ``R* ≈ 15`` for a whole corpus repeated at compute-optimal size.
  ``repetition_epochs`` (``R*``) defaults to 3: inside a mixture a small domain is repeated
  while the others are not, so 15 lets the plan repeat it far past what helps, while 0.75
  (the first default) held small domains to a few passes where their held-out loss kept
  falling; 3 was the closest to the best fixed mixture of the three values tried on the GPU
  benchmark (docs/engine.md says how the default was chosen); the measured slopes correct
  it per domain.
* Olmix (allenai/olmix) caps each domain's repetition; ``max_epochs`` is that hard cap, off by
  default (the soft cap of the effective-data model takes its place).

It is deterministic given the states it is shown, and its whole state (the evaluations in the
window, the last weights) is in the checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_aquila.callbacks.policies.base import MixturePolicy
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import (
    Bound,
    as_number,
    per_domain_bounds,
    project_to_bounds,
)


def effective_tokens(tokens: np.ndarray, unique: np.ndarray, repetition_epochs: float
                     ) -> np.ndarray:
    """Muennighoff et al.'s effective data of ``tokens`` drawn from ``unique`` ones."""
    tokens, unique = np.asarray(tokens, dtype=np.float64), np.asarray(unique, dtype=np.float64)
    repeats = np.maximum(tokens / unique - 1.0, 0.0)
    return np.minimum(tokens, unique) + unique * repetition_epochs * (
        -np.expm1(-repeats / repetition_epochs))


def marginal_value(tokens: np.ndarray, unique: np.ndarray, scale: np.ndarray,
                   repetition_epochs: float, exponent: float) -> np.ndarray:
    """``g(n) ∝ A D^(-alpha-1) dD/dn``: the dev-loss drop of one more token at ``tokens``."""
    tokens, unique = np.asarray(tokens, dtype=np.float64), np.asarray(unique, dtype=np.float64)
    rate = np.exp(-np.maximum(tokens / unique - 1.0, 0.0) / repetition_epochs)
    effective = np.maximum(effective_tokens(tokens, unique, repetition_epochs), 1.0)
    return scale * effective ** (-exponent - 1.0) * rate


def plan_tokens(consumed: np.ndarray, unique: np.ndarray, total: float, scale: np.ndarray,
                repetition_epochs: float, exponent: float,
                max_tokens: np.ndarray | None = None, points: int = 4096) -> np.ndarray:
    """Final token counts ``n >= consumed`` (and ``<= max_tokens``), summing to ``total``,
    that equalise the marginal values of the domains that get more (water-filling). ``g``
    falls with ``n``, so each domain's ``n_i(value)`` is read off ``g`` on a log grid of
    ``points`` counts between its present count and its ceiling (relative step below 0.5%
    for budgets up to 10^9 times a domain's count), and the common value is found by
    bisection. When the caps cannot absorb ``total``, every domain ends at its cap."""
    consumed = np.asarray(consumed, dtype=np.float64)
    remaining = float(total) - float(consumed.sum())
    if remaining <= 0:
        return consumed.copy()
    ceiling = consumed + remaining
    if max_tokens is not None:
        ceiling = np.maximum(np.minimum(ceiling, max_tokens), consumed)
        if ceiling.sum() <= total:
            return ceiling
    grid = np.exp(np.linspace(np.log(np.maximum(consumed, 1.0)), np.log(np.maximum(
        ceiling, 1.0)), points, axis=1))  # (domains, points), rising
    grid = np.clip(grid, consumed[:, None], ceiling[:, None])
    log_value = np.log(np.maximum(marginal_value(  # falling along a row (0 far past U)
        grid, unique[:, None], np.asarray(scale)[:, None], repetition_epochs, exponent),
        1e-300))

    def allocation(level: float) -> np.ndarray:
        # np.interp needs rising x: read each row reversed
        return np.array([np.interp(level, row[::-1], counts[::-1])
                         for row, counts in zip(log_value, grid)])

    low, high = float(log_value.min()) - 1.0, float(log_value.max()) + 1.0
    for _ in range(60):
        middle = 0.5 * (low + high)
        if allocation(middle).sum() > total:
            low = middle
        else:
            high = middle
    final = allocation(0.5 * (low + high))
    return final + (float(total) - final.sum()) * (ceiling - final) / max(
        float((ceiling - final).sum()), 1e-300)  # the bisection's last rounding, spread


def slope_scales(records: Sequence[Mapping[str, Any]], domains: Sequence[str],
                 unique: np.ndarray, repetition_epochs: float, exponent: float,
                 max_tilt: float) -> np.ndarray | None:
    """Each domain's ``A_i`` relative to the others (geometric mean 1) from its dev losses
    against its log effective tokens over ``records`` (``{"tokens": {d: n}, "loss": {d:
    L}}``), as the module docstring says; ``None`` when the records cannot tell (fewer than
    three, or no loss fell)."""
    if len(records) < 3:
        return None
    tokens = np.array([[r["tokens"][d] for d in domains] for r in records], dtype=np.float64)
    loss = np.array([[r["loss"][d] for d in domains] for r in records], dtype=np.float64)
    x = np.log(np.maximum(effective_tokens(tokens, unique, repetition_epochs), 1.0))
    dx, dy = x - x.mean(0), loss - loss.mean(0)
    sxx, sxy = (dx * dx).sum(0), -(dx * dy).sum(0)
    if not sxx.sum() > 0:
        return None
    pooled = sxy.sum() / sxx.sum()
    if not pooled > 0:
        return None
    prior = float(np.median(sxx))
    slope = (sxy + prior * pooled) / (sxx + prior)
    slope = np.maximum(slope, pooled / max_tilt)
    scale = slope * np.maximum(effective_tokens(tokens[-1], unique, repetition_epochs),
                               1.0) ** exponent
    scale = scale / math.exp(float(np.log(scale).mean()))
    return np.clip(scale, 1.0 / max_tilt, max_tilt)


class EffectiveDataMixture(MixturePolicy):
    """Plans the remaining token budget across domains by the dev-loss drop one more token
    of each would buy, repeated tokens counting less (the module docstring has the model,
    the rule and the differences from ADO, Muennighoff et al. and UniMax). Needs no reference
    run.

    Args:
        budget_tokens: the run's training tokens; default: what the engine tells
            (``trainer.max_steps`` times the mixture's ``tokens_per_step``).
        repetition_epochs: ``R*``: the ``r``-th repetition of a token is worth ``exp(-r/R*)``
            of a fresh one.
        loss_exponent: ``alpha``, how fast a domain's dev loss falls with its effective
            tokens; shared by all domains (it extrapolates the measured slopes).
        warmup_fraction: share of the budget before the dev losses are read (until then the
            plan uses equal ``A_i``); the first evaluations see every loss fall fast.
        window: dev evaluations (the newest) the slopes are measured over.
        max_tilt: bound on how far the measured ``A_i`` may move from their geometric mean,
            either way.
        inertia: share of the previous weights kept at each update (0: follow the plan at
            once).
        max_swing: each weight stays within this factor of the domain's average share in the
            plan (``n_i / budget``), either way.
        max_epochs: an optional hard cap on each domain's passes over its data (Olmix-style);
            ``None``: only the soft cap of the effective-data model.
        min_weight, max_weight: as for every policy; a domain whose ``max_weight`` is 0 (a
            held-out-only domain, read for reports) is left out of the plan: it gets weight
            0, and neither its tokens nor its dev loss move the others'.
        update_every: optimizer steps between re-plans; the trainer's ``val_check_interval``
            re-plans once per dev evaluation.
    """

    def __init__(self, budget_tokens: int | None = None, repetition_epochs: float = 3.0,
                 loss_exponent: float = 0.3, prior_temperature: float | None = None,
                 warmup_fraction: float = 0.1, window: int = 8,
                 max_tilt: float = 4.0, inertia: float = 0.5, max_swing: float = 2.0,
                 max_epochs: float | None = None,
                 update_every: int = 25, min_weight: Bound = 0.0,
                 max_weight: Bound = 1.0) -> None:
        super().__init__(update_every, min_weight, max_weight)
        name = type(self).__name__
        if budget_tokens is not None and (not isinstance(budget_tokens, int) or isinstance(
                budget_tokens, bool) or budget_tokens <= 0):
            raise ValueError(f"{name}(budget_tokens={budget_tokens!r}) must be a positive "
                             "integer or None")
        for arg, value in (("repetition_epochs", repetition_epochs),
                           ("loss_exponent", loss_exponent)):
            number = as_number(value, f"{name}({arg})")
            if not (math.isfinite(number) and number > 0):
                raise ValueError(f"{name}({arg}={value!r}) must be positive")
        if prior_temperature is not None and not as_number(
                prior_temperature, f"{name}(prior_temperature)") > 0:
            raise ValueError(f"{name}(prior_temperature={prior_temperature!r}) must be "
                             "positive or None")
        if not 0.0 <= as_number(warmup_fraction, f"{name}(warmup_fraction)") < 1.0:
            raise ValueError(f"{name}(warmup_fraction={warmup_fraction!r}) must be in [0, 1)")
        if not 0.0 <= as_number(inertia, f"{name}(inertia)") < 1.0:
            raise ValueError(f"{name}(inertia={inertia!r}) must be in [0, 1)")
        for arg, value in (("max_tilt", max_tilt), ("max_swing", max_swing)):
            if not as_number(value, f"{name}({arg})") >= 1.0:
                raise ValueError(f"{name}({arg}={value!r}) must be at least 1")
        if not isinstance(window, int) or isinstance(window, bool) or window < 3:
            raise ValueError(f"{name}(window={window!r}) must be an integer >= 3")
        if max_epochs is not None and not as_number(max_epochs, f"{name}(max_epochs)") > 0:
            raise ValueError(f"{name}(max_epochs={max_epochs!r}) must be positive or None")
        self.budget_tokens = budget_tokens
        self.repetition_epochs, self.loss_exponent = float(repetition_epochs), float(
            loss_exponent)
        self.prior_temperature = None if prior_temperature is None else float(
            prior_temperature)
        self.warmup_fraction, self.window = float(warmup_fraction), window
        self.max_tilt, self.inertia = float(max_tilt), float(inertia)
        self.max_swing = float(max_swing)
        self.max_epochs = None if max_epochs is None else float(max_epochs)
        self.unique: dict[str, float] | None = None
        self.budget: float | None = None
        self.records: list[dict[str, Any]] = []  # the dev evaluations in the window
        self.scale: dict[str, float] | None = None  # the measured A_i (None: equal)
        self.last: dict[str, float] | None = None  # the weights proposed last
        self.last_val_step: int | None = None

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None,
              **context: Any) -> None:
        changed = self.domains is not None and list(domains) != self.domains
        super().setup(domains, natural, **context)
        name = type(self).__name__
        unique = self.unique_tokens or {}
        high = per_domain_bounds(self.max_weight, self.domains, 1.0, "max_weight")
        planned = [d for d, h in zip(self.domains, high) if h > 0]
        missing = [d for d in planned if not unique.get(d, 0) > 0]
        if missing:
            raise ValueError(f"{name} needs every domain's unique training tokens (the "
                             f"mixture's unique_tokens); unknown or zero for {missing}")
        self.unique = {d: float(unique[d]) for d in planned}
        self.budget = float(self.budget_tokens or self.budget_tokens_hint or 0) or None
        if self.budget is None:
            raise ValueError(f"{name} needs the run's token budget: set trainer.max_steps "
                             "(the engine multiplies it by the tokens of a global batch) or "
                             f"{name}(budget_tokens=...)")
        if changed:  # another domain list on resume: the window's evaluations no longer fit
            self.records, self.scale, self.last = [], None, None

    @property
    def planned(self) -> list[str]:
        """The domains the plan shares the budget over: those that may take weight (a
        ``max_weight`` above 0); empty before ``setup``."""
        return list(self.unique or ())

    # -- the rule ----------------------------------------------------------------------------
    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        assert self.unique is not None and self.budget is not None  # setup ran
        consumed = {d: float(state.tokens_per_domain.get(d, 0)) for d in self.planned}
        remaining = self.budget - sum(consumed.values())
        if remaining <= 0:
            return None
        self._ingest(state, consumed)
        weights = self.plan(consumed)
        if self.last is not None:
            weights = {d: self.inertia * self.last[d] + (1 - self.inertia) * weights[d]
                       for d in self.planned}
        self.last = weights
        return {d: weights.get(d, 0.0) for d in self.domains}

    def plan(self, consumed: Mapping[str, float]) -> dict[str, float]:
        """The planned share of the remaining budget of each domain, given the tokens each
        has had (``consumed``) and the measured scales (equal before the first fit)."""
        domains = self.planned
        have = np.array([consumed.get(d, 0.0) for d in domains], dtype=np.float64)
        unique = np.array([self.unique[d] for d in domains], dtype=np.float64)
        if self.scale is not None:
            scale = np.array([self.scale[d] for d in domains], dtype=np.float64)
        elif self.prior_temperature is None:
            scale = np.ones_like(unique)
        else:  # A_i ∝ U_i^((1+alpha)/T): the plan is temperature sampling before repetition
            scale = (unique / unique.max()) ** ((1 + self.loss_exponent) /
                                                self.prior_temperature)
        cap = None if self.max_epochs is None else self.max_epochs * unique
        total = max(self.budget, float(have.sum()))
        final = plan_tokens(have, unique, total, scale, self.repetition_epochs,
                            self.loss_exponent, cap)
        left = np.maximum(final - have, 0.0)
        if not left.sum() > 0:  # every domain at its cap: keep drawing in proportion to it
            left = np.maximum(cap - have, 0.0) if cap is not None else np.ones_like(have)
            if not left.sum() > 0:
                left = unique
        weights = {d: float(v) for d, v in zip(domains, left / left.sum())}
        average = final / final.sum()  # the plan's mixture over the whole run
        low = {d: float(a / self.max_swing) for d, a in zip(domains, average)}
        high = {d: float(min(1.0, a * self.max_swing)) for d, a in zip(domains, average)}
        if sum(low.values()) <= 1.0 <= sum(high.values()):
            weights = project_to_bounds(weights, low, high)
        return weights

    def _ingest(self, state: TrainingState, consumed: Mapping[str, float]) -> None:
        """Add a new dev evaluation past the warm-up to the window and refit the scales."""
        if state.val_step is None or state.val_step == self.last_val_step:
            return
        self.last_val_step = int(state.val_step)
        if sum(consumed.values()) < self.warmup_fraction * self.budget:
            return
        losses = {d: state.val_loss.get(d) for d in self.planned}
        if any(v is None or not math.isfinite(v) for v in losses.values()):
            return  # a missing or non-finite dev loss (a spike's NaN) must not steer
        self.records.append({"step": int(state.val_step), "tokens": dict(consumed),
                             "loss": {d: float(v) for d, v in losses.items()}})
        self.records = self.records[-self.window:]
        unique = np.array([self.unique[d] for d in self.planned], dtype=np.float64)
        scale = slope_scales(self.records, self.planned, unique, self.repetition_epochs,
                             self.loss_exponent, self.max_tilt)
        if scale is not None:
            self.scale = {d: float(v) for d, v in zip(self.planned, scale)}

    # -- configuration and state -------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"budget_tokens": self.budget_tokens,
                "repetition_epochs": self.repetition_epochs,
                "loss_exponent": self.loss_exponent,
                "prior_temperature": self.prior_temperature,
                "warmup_fraction": self.warmup_fraction,
                "window": self.window, "max_tilt": self.max_tilt, "inertia": self.inertia,
                "max_swing": self.max_swing,
                "max_epochs": self.max_epochs, **super().config()}

    def state_dict(self) -> dict[str, Any]:
        return {"records": [dict(r) for r in self.records],
                "scale": None if self.scale is None else dict(self.scale),
                "last": None if self.last is None else dict(self.last),
                "last_val_step": self.last_val_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.records = [dict(r) for r in state["records"]]
        self.scale = None if state["scale"] is None else dict(state["scale"])
        self.last = None if state["last"] is None else dict(state["last"])
        self.last_val_step = state["last_val_step"]


__all__ = ["EffectiveDataMixture", "effective_tokens", "marginal_value", "plan_tokens",
           "slope_scales"]
