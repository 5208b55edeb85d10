"""Per-token cross-entropy that also takes vocabulary-sharded logits (tensor parallel).

Under ``aquila_tp``/``aquila_tp_fsdp`` the output head returns a DTensor sharded on the
vocabulary dimension. Inside ``torch.distributed.tensor.parallel.loss_parallel()`` (which
``AquilaParallelStrategy`` enters around every step and backward pass) ``F.cross_entropy``
computes on the shards: a max and a sum-of-exponentials all-reduced over the TP group and the
target logit taken from the rank that holds it. Full-vocabulary logits are never gathered.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token in fp32, shaped like ``labels`` (0 where a label is -100)."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                           reduction="none")
    if isinstance(loss, DTensor):
        # Replicated over the TP group: each rank holds every token's loss, not a shard.
        loss = loss.to_local()
    return loss.view_as(labels)


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lightning_aquila.module.token_losses`` for plain and vocabulary-sharded logits:
    per-token fp32 cross-entropy (B, T) and the mask of counted tokens."""
    return token_cross_entropy(logits, labels), labels != -100
