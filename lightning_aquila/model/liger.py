"""Liger-Kernel's Triton kernels for ``kernels: liger`` and ``loss_impl: liger``.

Imported only when one of those options is chosen (``model.load_liger``): the ``liger``
extra pulls in Triton, which CPU installs lack. Each function computes what the eager code
in ``model.py`` / ``head_loss.py`` computes, on CUDA tensors (or on CPU tensors under
Triton's interpreter, ``TRITON_INTERPRET=1``, which the parity tests use).

Read against liger-kernel 0.8.5. What each kernel does with our layouts and dtypes:

* RMSNorm: ``LigerRMSNormFunction`` in ``casting_mode="llama"`` normalises in fp32 and casts
  back before the scale, as ``model.RMSNorm`` does. ``in_place=False``: its in-place variant
  writes dX over the incoming gradient, which autograd may still hold.
* SwiGLU: ``LigerSiLUMulFunction`` is ``silu(a) * b``, the silu in fp32 and cast to ``b``'s
  dtype before the product, as ``F.silu`` rounds under autocast.
* RoPE: ``LigerRopeFunction`` takes q/k as (B, H, T, D) views of (B, T, H, D) storage (the
  Hugging Face layout after its transpose) and rotate-half tables (T, D), the same convention
  as ``model.apply_rope``. It rotates q and k in place.
* Loss: ``fused_linear_cross_entropy_forward`` with ``reduction="none"`` returns every token's
  loss (fp32, 0 where the label is -100) and, in the same pass, the gradients of their sum;
  the mean and its gradient are ours (below). Its own autograd function, with
  ``reduction="none"``, recomputes the logits in backward instead (0.8.5,
  ``LigerFusedLinearCrossEntropyFunction.forward``: ``ctx.defer_grads``), one more
  head-sized matmul per step, so it is not used.
"""

from __future__ import annotations

import torch
from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward
from liger_kernel.ops.rms_norm import LigerRMSNormFunction
from liger_kernel.ops.rope import LigerRopeFunction
from liger_kernel.ops.swiglu import LigerSiLUMulFunction

IGNORE_INDEX = -100


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``model.RMSNorm.forward`` in one Triton kernel (Llama casting)."""
    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one Triton kernel."""
    return LigerSiLUMulFunction.apply(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
         sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.apply_rope`` on q and k (B, T, H, D) in one Triton kernel; tables (T, D)."""
    q, k = LigerRopeFunction.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q.transpose(1, 2), k.transpose(1, 2)


class _LigerLinearCrossEntropy(torch.autograd.Function):
    """``(mean token loss, per-token losses)`` of ``cross_entropy(x @ weight.T, labels)`` by
    Liger's fused kernel; only the mean is differentiable. Liger computes the gradients of
    the summed losses in forward; backward scales them by ``grad_mean / count``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                need_grad: bool):
        losses, _, _, _, grad_x, grad_w, _ = fused_linear_cross_entropy_forward(
            x, weight, labels, ignore_index=IGNORE_INDEX, reduction="none",
            compute_gradients=need_grad, weight_requires_grad=need_grad)
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        mean = losses.sum() / count
        ctx.mark_non_differentiable(losses)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w, count)
            ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return mean, losses

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, _grad_losses: torch.Tensor | None):
        grad_x, grad_w, count = ctx.saved_tensors
        scale = grad_mean.float() / count
        return ((grad_x * scale.to(grad_x.dtype)).to(ctx.input_dtype),
                (grad_w * scale.to(grad_w.dtype)).to(ctx.weight_dtype), None, None)


@torch.compiler.disable
def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor,
                         labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``head_loss.chunked_linear_cross_entropy``'s contract by Liger's fused kernel:
    token-mean loss and per-token fp32 losses shaped like ``labels`` (0 where -100).

    The head's matmul runs in the autocast dtype where autocast is on; Liger chunks the
    tokens itself (about ``tokens · hidden`` logits at a time). Kept out of
    ``torch.compile`` graphs: the kernel reads the count of counted tokens to the host
    (``.item()``, a graph break and a wait for the GPU every step)."""
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    mean, per_token = _LigerLinearCrossEntropy.apply(
        x.reshape(-1, x.shape[-1]), weight, labels.reshape(-1), need_grad)
    return mean, per_token.view_as(labels)
