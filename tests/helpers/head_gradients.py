"""A check for a fused head loss (``loss_impl='chunked'``): its gradients are computed in
forward and only scaled in backward, so that scaling must follow the incoming gradient."""

from __future__ import annotations

import torch


def assert_head_gradient_scales_with_the_loss(model: torch.nn.Module, ids: torch.Tensor,
                                              labels: torch.Tensor) -> None:
    """Gradient accumulation divides the loss before backward: the head's weight gradient
    of ``0.25 · loss`` is exactly a quarter of that of ``loss``."""
    model(ids, labels=labels)[0].backward()
    once = model.lm_head.weight.grad.clone()
    model.zero_grad()
    (0.25 * model(ids, labels=labels)[0]).backward()
    torch.testing.assert_close(model.lm_head.weight.grad, 0.25 * once, rtol=1e-6, atol=0)
