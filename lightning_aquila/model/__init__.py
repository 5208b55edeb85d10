"""The Aquila2 decoder, its presets and Hugging Face interop."""

from lightning_aquila.model.config import PRESETS, AquilaConfig
from lightning_aquila.model.hf import export_hf, import_hf
from lightning_aquila.model.model import AquilaModel

__all__ = ["PRESETS", "AquilaConfig", "AquilaModel", "export_hf", "import_hf"]
