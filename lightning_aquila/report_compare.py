"""Moved to ``lightning_aquila.tracking.compare``. Kept only while ``benchmarks/mixing.py``
imports from here (its ``summarise``, ``value_at`` and ``stopped``): delete this file when
those imports name ``lightning_aquila.tracking.compare``."""

from lightning_aquila.tracking.compare import envelope_gap, held_out_curves, value_at

__all__ = ["envelope_gap", "held_out_curves", "value_at"]
