"""Output head and cross-entropy in one, chunk by chunk: full-vocabulary fp32 logits never exist.

With Aquila2's 100,008-token vocabulary the standard head materialises ``B·T·V`` logits (bf16)
and their fp32 copy for the loss: 6.5 GB of fp32 alone at 8 × 2048 tokens. Here the tokens go
through the head ``chunk_size`` at a time; each chunk's logits live only while its loss and
its gradients are computed, and the gradients with respect to the hidden states and the head
weight are produced in the forward pass (the approach of Liger-Kernel's fused linear
cross-entropy), so backward only scales them.

Why hand-written: Liger-Kernel and Cut Cross-Entropy do this in Triton, on CUDA only; the
Step output contract needs the per-token losses next to the differentiable mean, and the
library must run (and be tested) the same way on CPU, under ``torch.compile`` and under FSDP2.
This is plain PyTorch: matmuls plus one fused-able softmax per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

IGNORE_INDEX = -100


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy per token in fp32, shaped like ``labels`` (0 where a label is -100): the
    standard path.

    Under ``aquila_tp``/``aquila_tp_fsdp`` with ``loss_parallel`` the logits are a DTensor
    sharded on the vocabulary. Inside ``torch.distributed.tensor.parallel.loss_parallel()``
    (which ``AquilaParallelStrategy`` enters around every step and backward pass)
    ``F.cross_entropy`` computes on the shards: a max and a sum of exponentials all-reduced
    over the TP group, the target logit taken from the rank that holds it. Full-vocabulary
    logits are never gathered, and the loss comes back replicated."""
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="none")
    if isinstance(loss, DTensor):
        # Replicated over the TP group: each rank holds every token's loss, not a shard.
        loss = loss.to_local()
    return loss.view_as(labels)


def token_losses(logits: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp32 cross-entropy (B, T) of plain or vocabulary-sharded logits
    (:func:`token_cross_entropy`) and the mask of the tokens that count."""
    return token_cross_entropy(logits, labels), labels != IGNORE_INDEX


def compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul would run in: the autocast dtype where autocast is on
    (bf16-mixed), else the weight's (bf16-true, fp32, FSDP2's bf16 parameters)."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return weight.dtype


def _chunk_loss_and_grad(logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                         count: torch.Tensor, dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's per-token losses (fp32, 0 where not ``valid``) and d(mean loss)/d(logits)
    in ``dtype``, as one pure function of its logits: the form the chunk loop takes under
    ``torch.compile``, where inductor fuses the fp32 up-cast, logsumexp, softmax, one-hot
    and scaling instead of materialising the chunk's fp32 logits and copies of them."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    losses = torch.where(valid, lse - target, 0.0)
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == labels[:, None]
    grad = torch.exp(logits - lse[:, None]) - onehot.to(logits.dtype)
    return losses, (grad * (valid / count)[:, None]).to(dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``(mean token loss, per-token losses)`` of ``cross_entropy(x @ weight.T, labels)``.

    Only the mean is differentiable. Its gradients are computed chunk by chunk in forward
    (each chunk's fp32 logits exist only inside the loop) and scaled by the incoming gradient
    in backward. Memory held for backward: ``grad_x`` (N × H) and ``grad_weight`` (V × H, in
    fp32 while accumulating across chunks).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_size: int, dtype: torch.dtype, need_grad: bool):
        tokens = x.shape[0]
        w = weight.to(dtype)
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        safe_labels = torch.where(valid, labels, 0)
        losses = torch.empty(tokens, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x, dtype=dtype) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_grad \
            else None
        # Traced by torch.compile (compile='model'), the in-place steps below become copies
        # that inductor keeps alive (CPU inductor, 4 chunks: a peak of 6.2 chunks' fp32
        # logits, 2.6x the standard head's); the pure form fuses into a reduction and one
        # pointwise kernel per chunk (2.3 chunks' worth). Eager, in-place is leaner.
        fused = torch.compiler.is_compiling()
        for start in range(0, tokens, chunk_size):
            end = min(start + chunk_size, tokens)
            xc = x[start:end].to(dtype)
            if fused and need_grad:
                losses[start:end], grad_logits = _chunk_loss_and_grad(
                    xc @ w.t(), safe_labels[start:end], valid[start:end], count, dtype)
                grad_x[start:end] = grad_logits @ w
                grad_w.add_(grad_logits.t() @ xc)
                continue
            logits = (xc @ w.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, safe_labels[start:end, None]).squeeze(1)
            mask = valid[start:end]
            losses[start:end] = torch.where(mask, lse - target, 0.0)
            if not need_grad:
                continue
            # d(mean loss)/d(logits) = (softmax - onehot(label)) / count on counted rows.
            grad_logits = torch.exp(logits.sub_(lse[:, None]))
            grad_logits.scatter_add_(1, safe_labels[start:end, None],
                                     torch.full_like(target[:, None], -1.0))
            grad_logits.mul_((mask / count)[:, None])
            grad_logits = grad_logits.to(dtype)
            grad_x[start:end] = grad_logits @ w
            grad_w.add_(grad_logits.t() @ xc)
        mean = losses.sum() / count
        ctx.mark_non_differentiable(losses)
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w)
            ctx.input_dtype, ctx.weight_dtype = x.dtype, weight.dtype
        return mean, losses

    @staticmethod
    def backward(ctx, grad_mean: torch.Tensor, _grad_losses: torch.Tensor | None):
        grad_x, grad_w = ctx.saved_tensors
        grad_x = (grad_x * grad_mean.to(grad_x.dtype)).to(ctx.input_dtype)
        grad_w = (grad_w * grad_mean.float()).to(ctx.weight_dtype)
        return grad_x, grad_w, None, None, None, None


def chunked_linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-mean cross-entropy of ``x @ weight.T`` against ``labels`` (−100 ignored), and the
    per-token losses (fp32, detached, 0 where ignored), without full-vocabulary logits.

    Args:
        x: hidden states, ``(..., H)``.
        weight: the head's ``(V, H)`` weight.
        labels: ``x.shape[:-1]``, int64.
        chunk_size: tokens per chunk; a chunk's fp32 logits take ``4·chunk_size·V`` bytes.

    Returns ``(mean, per_token)`` with ``per_token`` shaped like ``labels``.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    dtype = compute_dtype(x, weight)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    flat_x, flat_labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    with torch.autocast(x.device.type, enabled=False):
        mean, per_token = _ChunkedLinearCrossEntropy.apply(
            flat_x, weight, flat_labels, chunk_size, dtype, need_grad)
    return mean, per_token.view_as(labels)

