"""Per-token cross-entropy that also takes vocabulary-sharded logits (tensor parallel).

Under ``aquila_tp``/``aquila_tp_fsdp`` the output head returns a DTensor sharded on the
vocabulary dimension. Inside ``torch.distributed.tensor.parallel.loss_parallel()`` (which
``AquilaParallelStrategy`` enters around every step and backward pass) ``F.cross_entropy``
computes on the shards: a max and a sum-of-exponentials all-reduced over the TP group and the
target logit taken from the rank that holds it. Full-vocabulary logits are never gathered.
"""

from __future__ import annotations

import torch

# Lives with the model (whose standard loss path calls it); re-exported here.
from lightning_aquila.model.head_loss import token_cross_entropy

__all__ = ["token_cross_entropy", "token_losses"]


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``lightning_aquila.module.token_losses`` for plain and vocabulary-sharded logits:
    per-token fp32 cross-entropy (B, T) and the mask of counted tokens."""
    return token_cross_entropy(logits, labels), labels != -100
