"""Moved to ``lightning_aquila.tracking.run_record``. Kept only while ``benchmarks/mixing.py``
imports ``load_run`` from here: delete this file when that import names
``lightning_aquila.tracking.run_record``."""

from lightning_aquila.tracking.run_record import load_run

__all__ = ["load_run"]
