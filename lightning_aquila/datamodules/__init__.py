"""The Data Management Unit: domain shards, ``prepare``/``inspect``, the mixture sampler.

The names load on first use: ``lightning-aquila prepare``/``inspect`` import
``datamodules.prepare``, which runs this file, and must not pay seconds for Lightning, which
only ``DomainDataModule`` needs.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> the module that defines it
_LAZY = {
    "DomainDataModule": "lightning_aquila.datamodules.datamodule",
    "BatchSkip": "lightning_aquila.datamodules.mixture",
    "DomainMixture": "lightning_aquila.datamodules.mixture",
    "MixtureChange": "lightning_aquila.datamodules.mixture",
    "DataError": "lightning_aquila.datamodules.shard_format",
    "ShardStore": "lightning_aquila.datamodules.store",
}

__all__ = ["BatchSkip", "DataError", "DomainDataModule", "DomainMixture", "MixtureChange",
           "ShardStore"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_aquila.datamodules' has no attribute {name!r}")
