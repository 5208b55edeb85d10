"""Domain weights, checked in one place: numbers, completeness against the domain list,
normalisation, bounds per domain, the named fixed mixtures (``"uniform"``, ``"natural"``,
``"temperature:T"``, ``"unimax:N"``), and the Euclidean projection onto the bounded simplex
that keeps each policy's proposal within ``[min_weight, max_weight]``.

Both sides of the Mixture contract use it: ``DomainMixture.set_weights`` (the data side,
``datamodules/mixture.py``) validates what it is given with :func:`normalized`, and every
mixture policy (the callbacks, ``callbacks/policies/``) normalises and bounds its proposal
with the same functions. It needs only numpy, so neither side imports the other's package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Bound = float | Mapping[str, float]


def as_number(value: Any, what: str) -> float:
    """``value`` as a float, or a ``ValueError`` naming it: YAML's ``yes``, a quoted
    ``"0.5"``, ``null`` or a list are not numbers."""
    if isinstance(value, (bool, str, bytes)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{what} is not a number: {value!r}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        return math.inf


def check_bound(bound: Any, what: str) -> None:
    """A bound is a number in [0, 1] or a mapping ``domain -> number in [0, 1]``."""
    items = bound.items() if isinstance(bound, Mapping) else [(None, bound)]
    for domain, value in items:
        where = what if domain is None else f"{what}[{domain!r}]"
        if not 0.0 <= as_number(value, where) <= 1.0:
            raise ValueError(f"{where} must lie in [0, 1], got {value!r}")


def per_domain_bounds(bound: Bound, domains: Sequence[str], default: float,
                      what: str) -> np.ndarray:
    if isinstance(bound, Mapping):
        refuse_unknown(bound, domains, what)
        values = [as_number(bound.get(d, default), f"{what}[{d!r}]") for d in domains]
    else:
        values = [as_number(bound, what)] * len(domains)
    for domain, value in zip(domains, values):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{what} for domain {domain!r} must be in [0, 1], got {value}")
    return np.array(values, dtype=np.float64)


def project_to_bounds(weights: Mapping[str, float], min_weight: Bound = 0.0,
                      max_weight: Bound = 1.0) -> dict[str, float]:
    """The weights closest (in Euclidean distance) to ``weights`` that sum to 1 and keep every
    domain within ``[min_weight, max_weight]``.

    The solution is ``w_i = clip(v_i - tau, lo_i, hi_i)`` for the one ``tau`` at which the
    clipped values sum to 1; their sum is piecewise linear in ``tau`` with breakpoints at
    ``v_i - lo_i`` and ``v_i - hi_i``, so ``tau`` is found exactly between two breakpoints
    (no iteration, no tolerance). Weights already on the bounded simplex come back unchanged.
    """
    domains = list(weights)
    if not domains:
        raise ValueError("no weights to bound")
    v = np.array([float(weights[d]) for d in domains], dtype=np.float64)
    bad = [d for d, x in zip(domains, v) if not math.isfinite(x)]
    if bad:
        raise ValueError(f"weights of domain(s) {bad} are not finite: {dict(weights)}")
    lo = per_domain_bounds(min_weight, domains, 0.0, "min_weight")
    hi = per_domain_bounds(max_weight, domains, 1.0, "max_weight")
    if (lo > hi).any():
        domain = domains[int(np.argmax(lo > hi))]
        raise ValueError(f"min_weight exceeds max_weight for domain {domain!r}")
    if lo.sum() > 1.0 + 1e-12 or hi.sum() < 1.0 - 1e-12:
        raise ValueError(
            f"no weights can satisfy the bounds: the min_weights sum to {lo.sum():.6g} and the "
            f"max_weights to {hi.sum():.6g} over {len(domains)} domains (need <= 1 <= sum)"
        )
    if (v >= lo).all() and (v <= hi).all() and abs(v.sum() - 1.0) <= 1e-12:
        return {d: float(x) for d, x in zip(domains, v)}
    points = np.unique(np.concatenate([v - lo, v - hi]))

    def total(tau: float) -> float:
        return float(np.clip(v - tau, lo, hi).sum())

    sums = [total(p) for p in points]  # non-increasing in tau
    tau = float(points[-1])
    for k in range(len(points) - 1):
        if sums[k] >= 1.0 >= sums[k + 1]:
            a, b = float(points[k]), float(points[k + 1])
            tau = a if sums[k] == sums[k + 1] else a + (sums[k] - 1.0) * (b - a) / (
                sums[k] - sums[k + 1])
            break
    else:
        if sums[0] <= 1.0:
            tau = float(points[0])
    w = np.clip(v - tau, lo, hi)
    return {d: float(x) for d, x in zip(domains, w)}


#: The named fixed mixtures a weight spec may give instead of a mapping.
SPEC_NAMES = ("uniform", "natural", "temperature:T", "unimax:N")


def parse_spec(spec: str, what: str) -> tuple[str, float | None]:
    """``"uniform"``/``"natural"`` -> (name, None); ``"temperature:T"``/``"unimax:N"`` ->
    (name, T or N), the number positive and finite; anything else a ``ValueError`` naming
    the value and the choices."""
    name, sep, value = spec.partition(":")
    if not sep and name in ("uniform", "natural"):
        return name, None
    if name in ("temperature", "unimax"):
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if math.isfinite(number) and number > 0:
            return name, number
        raise ValueError(f"{what}: {spec!r} needs a positive number after '{name}:' (e.g. "
                         f"'{name}:{2 if name == 'temperature' else 4}')")
    raise ValueError(f"{what} must be a mapping domain -> weight or one of {list(SPEC_NAMES)}, "
                     f"got {spec!r}")


def temperature_weights(counts: Mapping[str, float], temperature: float) -> dict[str, float]:
    """Temperature sampling, ``p_i ∝ n_i^(1/T)`` (mBERT, XLM-R, mT5 sample languages this
    way): ``T = 1`` is the natural mixture, ``T -> inf`` the uniform one."""
    powered = {d: float(n) ** (1.0 / temperature) if n > 0 else 0.0 for d, n in counts.items()}
    return normalized(powered, f"temperature:{temperature:g} weights")


def unimax_weights(counts: Mapping[str, float], budget: float, epochs: float
                   ) -> dict[str, float]:
    """UniMax (Chung et al. 2023, arXiv 2304.09151, Algorithm 1): the token budget is shared
    uniformly, but no domain gets more than ``epochs`` passes over its ``counts`` unique
    tokens; what a capped domain leaves goes to the larger ones, smallest domain first. When
    the caps leave budget over (every domain capped), the weights are the capped
    allocations' proportions, i.e. ``epochs`` passes over every domain."""
    if not budget > 0:
        raise ValueError(f"unimax:{epochs:g} needs a positive token budget, got {budget!r}")
    left, allocation = float(budget), {}
    order = sorted(counts, key=lambda d: (float(counts[d]), d))
    for index, domain in enumerate(order):
        share = left / (len(order) - index)
        allocation[domain] = min(share, epochs * float(counts[domain]))
        left -= allocation[domain]
    return normalized({d: allocation[d] for d in counts}, f"unimax:{epochs:g} weights")


def resolve_weights(spec: Mapping[str, float] | str, domains: Sequence[str],
                    natural: Mapping[str, float] | None, what: str, *,
                    budget: float | None = None) -> dict[str, float] | None:
    """A weight spec (a mapping, or one of :data:`SPEC_NAMES`) as normalised weights over
    ``domains``. ``natural`` holds each domain's (unique training) token counts, which
    ``"natural"``, ``"temperature:T"`` and ``"unimax:N"`` need, and ``budget`` the run's
    training tokens, which ``"unimax:N"`` needs; ``None`` when a needed one is not known."""
    if isinstance(spec, str):
        name, value = parse_spec(spec, what)
        if name == "uniform":
            return dict.fromkeys(domains, 1.0 / len(domains))
        if not natural:
            return None
        counts = {d: float(natural.get(d, 0.0)) for d in domains}
        if not sum(counts.values()) > 0:
            return None
        if name == "natural":
            return normalized(counts, what)
        if name == "temperature":
            return temperature_weights(counts, value)
        if budget is None:
            return None
        return unimax_weights(counts, budget, value)
    return normalized(complete(spec, domains, what), what)


def refuse_unknown(weights: Mapping[str, Any], domains: Sequence[str], what: str) -> None:
    unknown = [d for d in weights if d not in domains]
    if unknown:
        raise ValueError(f"{what}: unknown domain(s) {unknown}; known domains: {list(domains)}")


def complete(weights: Any, domains: Sequence[str], what: str) -> dict[str, Any]:
    """``weights`` over exactly ``domains`` (in their order), a domain left out at 0; a
    ``ValueError`` for anything but a mapping, or one naming a domain not in ``domains``."""
    if not isinstance(weights, Mapping):
        raise ValueError(f"{what} must be a mapping of domain -> weight, got {weights!r}")
    refuse_unknown(weights, domains, what)
    return {d: weights.get(d, 0.0) for d in domains}


def normalized(weights: Mapping[str, Any], what: str, *,
               sum_tolerance: float | None = None) -> dict[str, float]:
    """The weights rescaled to sum to 1, after checking each is a finite number >= 0 and
    that not all are zero; with ``sum_tolerance``, they must already sum to 1 within it.
    Every ``ValueError`` starts with ``what`` and names the domain and the value."""
    values: dict[str, float] = {}
    for domain, raw in weights.items():
        value = as_number(raw, f"{what}: weight for domain {domain!r}")
        if not math.isfinite(value):
            raise ValueError(f"{what}: weight for domain {domain!r} is not finite: {value}")
        if value < 0:
            raise ValueError(f"{what}: weight for domain {domain!r} is negative: {value}")
        values[domain] = value
    top = max(values.values(), default=0.0)
    if top <= 0:
        raise ValueError(f"{what}: the weights are all zero: {dict(weights)}")
    total = sum(values.values())
    if sum_tolerance is not None and abs(total - 1.0) > sum_tolerance:
        raise ValueError(f"{what}: the weights sum to {total:.6g}, not 1: {dict(weights)} "
                         "(pass normalize=True to rescale them)")
    if not math.isfinite(total):  # finite weights near the float maximum: rescale first
        top_total = math.fsum(v / top for v in values.values())
        return {d: v / top / top_total for d, v in values.items()}
    return {d: v / total for d, v in values.items()}


def check_weight_spec(spec: Any, what: str) -> None:
    if isinstance(spec, str):
        parse_spec(spec, what)
    elif isinstance(spec, Mapping):
        normalized(spec, what)
    else:
        raise ValueError(f"{what} must be a mapping of domain -> weight, got {spec!r}")


__all__ = ["SPEC_NAMES", "Bound", "as_number", "check_bound", "check_weight_spec", "complete",
           "normalized", "parse_spec", "per_domain_bounds", "project_to_bounds",
           "refuse_unknown", "resolve_weights", "temperature_weights", "unimax_weights"]
