"""Output head and cross-entropy in one, chunk by chunk: full-vocabulary fp32 logits never exist.

With Aquila2's 100,008-token vocabulary the standard head materialises ``B·T·V`` logits (bf16)
and their fp32 copy for the loss: 6.5 GB of fp32 alone at 8 × 2048 tokens. Here the tokens go
through the head ``chunk_size`` at a time; each chunk's logits live only while its loss and
its gradients are computed, and the gradients with respect to the hidden states and the head
weight are produced in the forward pass (as fused linear cross-entropy kernels do), so
backward only scales them.

Why hand-written: Liger-Kernel and Cut Cross-Entropy do this in Triton, on CUDA only; the
Step output contract needs the per-token losses next to the differentiable mean, and the
library must run (and be tested) the same way on CPU, under ``torch.compile`` and under FSDP2.
This is plain PyTorch: matmuls plus one fused-able softmax per chunk.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

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
    in ``dtype``, as one pure function of its logits, for ``torch.compile`` to fuse the fp32
    up-cast, logsumexp, target logit, softmax, one-hot and scaling into a few kernels. The
    target logit is a masked sum (one term is not zero, so it is exact) rather than a gather,
    which inductor would leave for whoever reads the loss, keeping the logits alive."""
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == labels[:, None]
    target = torch.where(onehot, logits, 0.0).sum(-1)
    losses = torch.where(valid, lse - target, 0.0)
    grad = torch.exp(logits - lse[:, None]) - onehot.to(logits.dtype)
    return losses, (grad * (valid / count)[:, None]).to(dtype)


@functools.cache
def _compiled_chunk() -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_chunk_loss_and_grad` compiled once per process (a new chunk shape, the last
    chunk's, recompiles it, as torch.compile does)."""
    return torch.compile(_chunk_loss_and_grad)


def _accumulate(total: torch.Tensor | None, part: torch.Tensor) -> torch.Tensor:
    """``total + part`` in fp32, ``part`` (the first chunk's) cast when there is no total
    yet: one fp32 pass fewer than adding it to zeros (on an H100 at 1B, the four chunks'
    additions took 3.4 ms of a 197 ms step, docs/benchmarks.md)."""
    return part.float() if total is None else total.add_(part)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """``(mean token loss, per-token losses)`` of ``cross_entropy(x @ weight.T, labels)``.

    Only the mean is differentiable. Its gradients are computed chunk by chunk in forward
    (each chunk's fp32 logits exist only inside the loop) and scaled by the incoming gradient
    in backward. Memory held for backward: ``grad_x`` (N × H) and ``grad_weight`` (V × H, in
    fp32 while accumulating across chunks).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                chunk_size: int, dtype: torch.dtype, need_grad: bool, fused: bool = False):
        tokens = x.shape[0]
        w = weight.to(dtype)
        valid = labels != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        safe_labels = torch.where(valid, labels, 0)
        losses = torch.empty(tokens, dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x, dtype=dtype) if need_grad else None
        grad_w = None  # fp32, from the first chunk's product on (no zeros to add it to)
        for start in range(0, tokens, chunk_size):
            end = min(start + chunk_size, tokens)
            xc = x[start:end].to(dtype)
            if fused and need_grad:  # under whole-model compile: see chunked_linear_cross_entropy
                losses[start:end], grad_logits = _compiled_chunk()(
                    xc @ w.t(), safe_labels[start:end], valid[start:end], count, dtype)
                grad_x[start:end] = grad_logits @ w
                grad_w = _accumulate(grad_w, grad_logits.t() @ xc)
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
            grad_w = _accumulate(grad_w, grad_logits.t() @ xc)
        if need_grad and grad_w is None:  # no tokens
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device)
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
        return grad_x, grad_w, None, None, None, None, None


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
    if torch.compiler.is_compiling():
        return _chunked_outside_the_graph(x, weight, labels, chunk_size)
    return _chunked(x, weight, labels, chunk_size, fused=False)


def _chunked(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int,
             fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = compute_dtype(x, weight)
    need_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    flat_x, flat_labels = x.reshape(-1, x.shape[-1]), labels.reshape(-1)
    with torch.autocast(x.device.type, enabled=False):
        mean, per_token = _ChunkedLinearCrossEntropy.apply(
            flat_x, weight, flat_labels, chunk_size, dtype, need_grad, fused)
    return mean, per_token.view_as(labels)


@torch.compiler.disable
def _chunked_outside_the_graph(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk loop under whole-model ``torch.compile`` (``compile='model'``): run by
    Python, each chunk's loss and logit gradient compiled (:func:`_compiled_chunk`).

    Traced into the model's graph, the loop is one graph that inductor schedules as a whole,
    and it does not keep the chunks apart: it ran every chunk's logits matmul first, or every
    chunk's softmax before any gradient matmul, and fused all chunks' losses (or all their
    ``grad_weight`` additions) into one kernel at the end, so every chunk's logits or
    gradients stayed allocated. Measured with CPU inductor (vocabulary 32,000, head loss and
    backward only): 4,096 tokens in 4 chunks peaked at 772 MiB (6.2 chunks' fp32 logits)
    against 293 MiB for the compiled standard head, and a pure-function loop inside the graph
    still grew with the number of chunks (429 MiB at 16 chunks of 512 tokens, hidden 64);
    this way, 109 MiB there. The price is a graph break at the head: the decoder stays one
    graph, the loss is the few kernels of each chunk."""
    return _chunked(x, weight, labels, chunk_size, fused=True)

