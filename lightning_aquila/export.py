"""The decoder of a single-file AquilaLM checkpoint, for ``lightning-aquila export-hf`` and
``consolidate`` (``cli/tools.py``). Sharded (FSDP/TP) checkpoints go through
``strategies/consolidate.py`` first."""

from __future__ import annotations

import torch

from lightning_aquila.model import AquilaConfig, AquilaModel


def model_from_checkpoint(checkpoint: dict) -> AquilaModel:
    """Rebuild the decoder from an AquilaLM checkpoint (its config is stored alongside)."""
    if "aquila_config" not in checkpoint:
        raise ValueError("not an AquilaLM checkpoint: it has no 'aquila_config' entry")
    config = AquilaConfig.from_dict(checkpoint["aquila_config"])
    prefix = "model."
    state = {
        k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    with torch.device("meta"):
        model = AquilaModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model

