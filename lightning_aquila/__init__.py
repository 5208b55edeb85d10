"""lightning-aquila: data-centric LLM pretraining on PyTorch Lightning (Aquila2's HeuriMentor).

Importing the package is cheap (no torch, no Lightning): the names below load on first use,
so ``lightning-aquila --help`` and the data tools start at once. Importing anything that
trains (``AquilaLM``, the callbacks, ``lightning_aquila.strategies``) registers the named
strategies (``aquila_fsdp``, ``aquila_tp``, ...) in Lightning's registry.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: public name -> the module that defines it
_LAZY = {
    "AquilaConfig": "lightning_aquila.model",
    "AquilaModel": "lightning_aquila.model",
    "export_hf": "lightning_aquila.model",
    "import_hf": "lightning_aquila.model",
    "AquilaLM": "lightning_aquila.module",
    # its own module, so the model and strategies import on machines without zarr/fsspec
    "DomainDataModule": "lightning_aquila.datamodules",
}

__all__ = ["AquilaConfig", "AquilaLM", "AquilaModel", "DomainDataModule", "__version__",
           "export_hf", "import_hf"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        importlib.import_module("lightning_aquila.strategies")  # registers the strategy names
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_aquila' has no attribute {name!r}")
