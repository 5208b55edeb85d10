"""lightning-aquila: data-centric LLM pretraining on PyTorch Lightning (Aquila2's HeuriMentor)."""

from lightning_aquila.model import AquilaConfig, AquilaModel, export_hf, import_hf
from lightning_aquila.module import AquilaLM

__version__ = "0.1.0"

__all__ = ["AquilaConfig", "AquilaLM", "AquilaModel", "__version__", "export_hf", "import_hf"]
