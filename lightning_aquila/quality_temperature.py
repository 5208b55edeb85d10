"""The quality temperature, as the datamodule's config, the mixture and the engine's policies
all read it: ``τ`` of ``exp(score / τ)`` per domain, ``None`` for no reweighting. Here, not in
the datamodules or the callbacks, because both check it (like ``domain_weights``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def temperature_value(value: Any, where: str) -> float | None:
    """A temperature checked: a positive finite number, or ``None``/``"inf"``/``inf`` for
    none (today's order). Anything else is a ``ValueError`` naming ``where`` and the value."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("inf", "none")):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or (
            value <= 0):
        raise ValueError(f"{where} must be a positive number or null (no reweighting), got "
                         f"{value!r}")
    return None if math.isinf(value) else float(value)


def temperatures(spec: Any, domains: Sequence[str], where: str,
                 current: Mapping[str, float | None] | None = None) -> dict[str, float | None]:
    """``{domain: τ or None}`` from one value for all domains or a mapping (domains it leaves
    out keep ``current``'s value, else ``None``); an unknown domain is a ``ValueError``."""
    base = {d: (current or {}).get(d) for d in domains}
    if not isinstance(spec, Mapping):
        value = temperature_value(spec, where)
        return dict.fromkeys(domains, value)
    unknown = [d for d in spec if d not in base]
    if unknown:
        raise ValueError(f"{where} names unknown domain(s) {unknown}; the domains are "
                         f"{list(domains)}")
    return base | {d: temperature_value(v, f"{where}[{d!r}]") for d, v in spec.items()}


__all__ = ["temperature_value", "temperatures"]
