"""lightning-aquila: data-centric LLM pretraining on PyTorch Lightning (Aquila2's HeuriMentor)."""

from typing import Any

# Registers aquila_fsdp, aquila_tp, aquila_tp_fsdp, aquila_zero2/3 in Lightning's registry.
from lightning_aquila import strategies  # noqa: F401
from lightning_aquila.model import AquilaConfig, AquilaModel, export_hf, import_hf
from lightning_aquila.module import AquilaLM

__version__ = "0.1.0"

__all__ = [
    "AquilaConfig",
    "AquilaLM",
    "AquilaModel",
    "DomainDataModule",
    "__version__",
    "export_hf",
    "import_hf",
]


def __getattr__(name: str) -> Any:
    # Lazy, so the model and strategies import on machines without zarr/fsspec (GPU images).
    if name == "DomainDataModule":
        from lightning_aquila.datamodules import DomainDataModule

        return DomainDataModule
    raise AttributeError(f"module 'lightning_aquila' has no attribute {name!r}")
