"""Activation checkpointing of the decoder blocks, in the three modes torchtitan offers
(``torchtitan/distributed/activation_checkpoint.py``), applied from outside the model code.

* ``full``: every block keeps only its input and recomputes its whole forward in backward
  (about a third more FLOPs per step, the least activation memory).
* ``every_N``: per-layer selective. Only every N-th block is checkpointed, the others keep all
  their activations: less recompute than ``full``, more memory.
* ``op``: op-level selective. Every block is checkpointed, but a policy keeps the outputs of
  the compute-heavy ops (matmuls, attention) and recomputes only the cheap ones (norms, RoPE,
  SiLU, products), so the recompute costs little compute and the memory lies between the two.

Whatever the mode, the wrapper is ``checkpoint_wrapper`` (non-reentrant
``torch.utils.checkpoint``), so parameter names gain the same ``_checkpoint_wrapped_module.``
segment under every mode and the state dict none (the wrapper strips it): checkpoints of one
mode load under any other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

__all__ = ["ACTIVATION_CHECKPOINTING_FORMS", "activation_checkpointing_mode",
           "apply_activation_checkpointing_mode", "checkpointed_blocks", "op_save_list"]

#: What ``AquilaLM(activation_checkpointing=...)`` accepts, as error messages name it.
ACTIVATION_CHECKPOINTING_FORMS = ("false", "'none'", "true", "'full'", "'every_N' (N >= 1)",
                                  "'op'")
_EVERY = re.compile(r"every_([1-9][0-9]*)")


def activation_checkpointing_mode(value: bool | str | None) -> str:
    """The canonical mode of an ``activation_checkpointing`` value: ``"none"``, ``"full"``,
    ``"op"`` or ``"every_N"``.

    Booleans stay valid (``false`` is ``"none"``, ``true`` is ``"full"``) so the YAML configs
    written before the selective modes keep their meaning. Anything else raises a
    ``ValueError`` naming the value and the allowed forms, so a typo fails when the module is
    built rather than after the model has been sharded.
    """
    if value is None or value is False or value == "none":
        return "none"
    if value is True or value == "full":
        return "full"
    if value == "op" or (isinstance(value, str) and _EVERY.fullmatch(value)):
        return value
    raise ValueError(f"activation_checkpointing={value!r} is not one of "
                     f"{', '.join(ACTIVATION_CHECKPOINTING_FORMS)}")


def checkpointed_blocks(mode: str, num_layers: int) -> list[int]:
    """Indices of the blocks that ``mode`` checkpoints.

    ``every_N`` follows torchtitan's convention: its counter runs from 1, so the N-th, 2N-th,
    ... blocks are wrapped, i.e. indices N-1, 2N-1, ...; ``every_2`` wraps blocks 1, 3, 5, ...
    (half the blocks of an even-depth model, and the last one among them).
    """
    mode = activation_checkpointing_mode(mode)
    if mode == "none":
        return []
    if mode in ("full", "op"):
        return list(range(num_layers))
    every = int(mode.removeprefix("every_"))
    return [index for index in range(num_layers) if (index + 1) % every == 0]


def _resolve(namespace: Any, name: str) -> Any | None:
    packet = getattr(namespace, name, None)
    return None if packet is None else getattr(packet, "default", None)


@cache  # looked up once: op mode builds a policy at every checkpointed block call
def op_save_list() -> frozenset[Any]:
    """The ops whose outputs ``op`` mode saves: torchtitan's list for Llama 3 (``aten.mm``,
    the efficient, flash and cuDNN SDPA kernels, the reduce-scatter of sequence-parallel
    regions, and ``aten.max``, the amax float8 scaling needs), plus the CPU's flash SDPA so
    that attention is saved there too. Ops this torch does not have are left out.

    Not in it: flash-attn-4 (``attention='flash'``) runs its own kernels that no dispatcher
    op names, so ``op`` mode recomputes its attention; and torchao's float8 matmuls
    (``aten._scaled_mm``), which torchtitan's list does not save either.
    """
    aten, c10d = torch.ops.aten, torch.ops._c10d_functional
    ops = [_resolve(aten, "mm"),
           _resolve(aten, "_scaled_dot_product_efficient_attention"),
           _resolve(aten, "_scaled_dot_product_flash_attention"),
           _resolve(aten, "_scaled_dot_product_cudnn_attention"),
           _resolve(aten, "_scaled_dot_product_flash_attention_for_cpu"),
           _resolve(c10d, "reduce_scatter_tensor"),
           _resolve(aten, "max")]
    return frozenset(op for op in ops if op is not None)


def _op_policy() -> Callable[..., CheckpointPolicy]:
    """A fresh policy for one checkpointed call of a block.

    It saves every op of ``op_save_list`` except every second ``aten.mm``: like torchtitan,
    the odd-numbered matmuls of a block are saved and the even-numbered ones recomputed, which
    halves the memory the matmul outputs would take for a fraction of the recompute. In an
    Aquila block the matmuls run q, k, v, o, gate, up, down, so q, v, gate and down are saved
    and k, o and up recomputed (3 of 7). The forward and the recompute count separately, so
    both passes take the same decision for the same matmul (the cache needs that).
    """
    save = op_save_list()
    mm = torch.ops.aten.mm.default
    counts = {"forward": 0, "recompute": 0}

    def policy(ctx: Any, func: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        if func == mm:
            phase = "recompute" if ctx.is_recompute else "forward"
            counts[phase] += 1
            if counts[phase] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in save else CheckpointPolicy.PREFER_RECOMPUTE

    return policy


def _op_context() -> Any:
    """``context_fn`` of ``op`` mode: called once per checkpointed call, so each block's
    forward gets its own matmul counter."""
    return create_selective_checkpoint_contexts(_op_policy())


def apply_activation_checkpointing_mode(model: torch.nn.Module, mode: bool | str | None) -> None:
    """Wrap ``model.layers``' blocks in place as ``mode`` asks; ``"none"`` leaves them be.

    Called by ``prepare_model`` after tensor parallelism and float8, before ``torch.compile``
    and FSDP2, the order torchtitan applies them in.
    """
    mode = activation_checkpointing_mode(mode)
    options = {"context_fn": _op_context} if mode == "op" else {}
    for index in checkpointed_blocks(mode, len(model.layers)):
        model.layers[index] = checkpoint_wrapper(model.layers[index], **options)
