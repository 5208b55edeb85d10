"""Applies the parallel plans to an AquilaModel from outside the model code (torchtitan's
split): tensor parallel, activation checkpointing, ``torch.compile`` and FSDP2, in that order.

``prepare_model`` is called from ``AquilaLM.configure_model`` under every strategy, with plain
values (the mesh, the plan, the device and the module's options), not the LightningModule, as
torchtitan's ``parallelize_llama(model, parallel_dims, job_config)``. What it applies depends
on where it runs:

* under Lightning's ``ModelParallelStrategy`` (our ``aquila_fsdp``, ``aquila_tp``,
  ``aquila_tp_fsdp``): the Megatron-style TP plan over ``device_mesh["tensor_parallel"]`` when
  that dimension is larger than one, then FSDP2 ``fully_shard`` per decoder block and on the
  root over ``device_mesh["data_parallel"]``;
* under every strategy (single device, DDP, FSDP1, DeepSpeed): activation checkpointing
  (full, every N-th block or op-level selective: ``activation_checkpoint.py``) and compile
  per block or of the whole model, as ``AquilaLM(activation_checkpointing=...,
  compile=...)`` asks.

A model built on the meta device is materialised here, shard by shard, and given Aquila's own
initialisation (``init_std`` of ``model/model.py``, the rule ``AquilaModel.init_weights``
applies). Left to Lightning, materialisation would call each submodule's
``reset_parameters`` (Kaiming-uniform linears, unit-variance embeddings) instead. Under
DeepSpeed ZeRO-3 the parameters are partitioned as they are created, so the initialisation
runs on one gathered module at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lightning_aquila.model.hf import DTYPES
from lightning_aquila.model.model import AquilaModel, init_module, init_std
from lightning_aquila.strategies.activation_checkpoint import apply_activation_checkpointing_mode

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh



@dataclass(frozen=True)
class ParallelPlan:
    """How to shard the model; ``AquilaParallelStrategy`` carries one, a plain
    ``ModelParallelStrategy`` gets the defaults (and no vocab-parallel loss, because only our
    strategy runs the backward pass inside ``loss_parallel()``).

    Attributes:
        fsdp: apply FSDP2 even when the data-parallel dimension has one rank (for its mixed
            precision and CPU offload). With more than one data-parallel rank FSDP2 is always
            applied: it is what reduces the gradients across that dimension.
        param_dtype: dtype FSDP2 all-gathers and computes in (``"auto"``: bf16 on GPU, the
            parameters' own dtype elsewhere). Sharded parameters and optimizer state stay fp32.
        reduce_dtype: dtype of the gradient reduce-scatter (``"fp32"``).
        cpu_offload: keep sharded parameters, gradients and optimizer state in host memory.
        reshard_after_forward: free gathered block weights after forward (ZeRO-3); ``False``
            keeps them until backward (ZeRO-2-like: more memory, fewer all-gathers).
        sequence_parallel: shard the norms' activations along the sequence between the TP
            regions (Megatron sequence parallelism); ``False`` replicates them.
        loss_parallel: keep the output head's logits sharded on the vocabulary and compute the
            cross-entropy on the shards, so full-vocabulary logits are never gathered.
    """

    fsdp: bool = False
    param_dtype: str | None = "auto"
    reduce_dtype: str | None = "fp32"
    cpu_offload: bool = False
    reshard_after_forward: bool = True
    sequence_parallel: bool = True
    loss_parallel: bool = False

    def __post_init__(self) -> None:
        for field in ("param_dtype", "reduce_dtype"):
            value = getattr(self, field)
            if value not in (None, "auto", *DTYPES):
                raise ValueError(f"{field} must be one of {['auto', *DTYPES]} or None, "
                                 f"got {value!r}")

    def dtype(self, field: str, device: torch.device) -> torch.dtype | None:
        value = getattr(self, field)
        if value == "auto":
            return torch.bfloat16 if device.type == "cuda" else None
        return DTYPES[value] if value is not None else None


def prepare_model(model: AquilaModel, *, mesh: DeviceMesh | None = None,
                  plan: ParallelPlan | None = None, device: torch.device | None = None,
                  float8: str | None = None, activation_checkpointing: bool | str = False,
                  compile: bool | str = False) -> None:
    """Apply the plans to ``model`` in place, in the order above, and materialise it if it
    was built on the meta device.

    Args:
        model: the decoder (on the meta device under ``ModelParallelStrategy``).
        mesh: the strategy's 2-D mesh (``data_parallel`` × ``tensor_parallel``), or ``None``
            under strategies that shard (or replicate) the model themselves.
        plan: how to shard over ``mesh`` (default: ``ParallelPlan()``).
        device: the rank's device (the strategy's ``root_device``); needed with ``mesh``.
        float8, activation_checkpointing, compile: ``AquilaLM``'s arguments of those names.
    """
    plan = plan or ParallelPlan()
    if mesh is not None:
        tp_mesh = mesh["tensor_parallel"]
        if tp_mesh.size() > 1:
            if model.lm_head.loss_impl != "standard":
                raise ValueError("loss_impl='chunked' does not combine with tensor parallelism; "
                                 "its loss_parallel already keeps the logits sharded: use "
                                 "loss_impl='standard'")
            apply_tensor_parallel(model, tp_mesh, sequence_parallel=plan.sequence_parallel,
                                  loss_parallel=plan.loss_parallel)
    if float8:
        _apply_float8(model, float8, device, mesh)
    # full, every N-th block or op-level selective (activation_checkpoint.py)
    apply_activation_checkpointing_mode(model, activation_checkpointing)
    # In place (``Module.compile``): parameter names keep no ``_orig_mod`` prefix.
    if compile == "model":
        model.compile()
    elif compile:
        for block in model.layers:
            block.compile()
    if mesh is not None:
        if device is None:
            raise ValueError("prepare_model needs the rank's device with a device mesh")
        dp_mesh = mesh["data_parallel"]
        # FSDP2 reduces the gradients across data-parallel ranks, so it is needed whenever
        # there are several; on one rank it still gives mixed precision and offload, and a
        # model that nothing else sharded (one device) the DTensor parameters that the
        # strategy's checkpointing expects.
        if dp_mesh.size() > 1 or plan.fsdp or mesh["tensor_parallel"].size() == 1:
            apply_fsdp(model, dp_mesh, param_dtype=plan.dtype("param_dtype", device),
                       reduce_dtype=plan.dtype("reduce_dtype", device),
                       cpu_offload=plan.cpu_offload,
                       reshard_after_forward=plan.reshard_after_forward)
        if _is_meta(model):
            materialize(model, torch.device("cpu") if plan.cpu_offload else device,
                        draw_on=device)
    elif _is_zero3_partitioned(model):
        init_zero3_partitioned(model)


def _apply_float8(model: AquilaModel, recipe: str, device: torch.device | None,
                  mesh: Any) -> None:
    """float8 projections, before activation checkpointing, compile and FSDP wrap them (the
    order torchao's float8 training expects)."""
    from lightning_aquila.model.float8 import check_float8_capability, convert_to_float8

    if mesh is not None and mesh["tensor_parallel"].size() > 1:
        raise ValueError("float8 does not combine with tensor parallelism here; use FSDP "
                         "(aquila_fsdp) or leave model.float8 unset")
    if device is not None and device.type == "cuda":
        check_float8_capability(torch.cuda.get_device_capability(device))
    convert_to_float8(model, recipe)


# -- tensor parallel ------------------------------------------------------------------------
def tensor_parallel_plan(
    sequence_parallel: bool = True, loss_parallel: bool = True
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Megatron-style plan as (root plan, per-block plan) of ``parallelize_module``.

    Column-parallel q/k/v and gate/up split heads and the MLP's inner dimension across ranks;
    row-parallel o/down reduce their partial sums. With sequence parallelism the residual
    stream between those regions is sharded along the sequence (``Shard(1)``): the row-parallel
    outputs reduce-scatter into it and the attention/MLP inputs all-gather from it, so the
    norms run on 1/TP of the tokens. The embedding is split over the vocabulary (row-wise);
    the head over the vocabulary too (column-wise), and with ``loss_parallel`` its logits stay
    a vocabulary-sharded DTensor for ``loss_parallel()``'s cross-entropy.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    residual = Shard(1) if sequence_parallel else Replicate()
    root = {
        "embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "lm_head": ColwiseParallel(
            input_layouts=residual,
            output_layouts=Shard(-1) if loss_parallel else Replicate(),
            use_local_output=not loss_parallel,
        ),
    }
    block = {
        "attention.q_proj": ColwiseParallel(),
        "attention.k_proj": ColwiseParallel(),
        "attention.v_proj": ColwiseParallel(),
        "attention.o_proj": RowwiseParallel(output_layouts=residual),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(output_layouts=residual),
    }
    if sequence_parallel:
        root["norm"] = SequenceParallel()
        block.update({
            "attention_norm": SequenceParallel(),
            # Attention takes (x, cos, sin): gather x along the sequence, leave RoPE alone.
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                            desired_input_layouts=(Replicate(), None, None)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),),
                                      desired_input_layouts=(Replicate(),)),
        })
    return root, block


def apply_tensor_parallel(
    model: AquilaModel, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True,
    loss_parallel: bool = True,
) -> None:
    """Shard ``model`` in place over ``tp_mesh`` with ``tensor_parallel_plan``."""
    from torch.distributed.tensor.parallel import parallelize_module

    config, size = model.config, tp_mesh.size()
    for field in ("num_heads", "num_kv_heads", "intermediate_size", "vocab_size"):
        if getattr(config, field) % size:
            raise ValueError(f"tensor_parallel_size={size} must divide AquilaConfig.{field} "
                             f"({getattr(config, field)}) of {config.name!r}")
    root, block = tensor_parallel_plan(sequence_parallel, loss_parallel)
    parallelize_module(model, tp_mesh, root)
    for layer in model.layers:
        parallelize_module(layer, tp_mesh, block)


# -- FSDP2 ----------------------------------------------------------------------------------
def apply_fsdp(
    model: AquilaModel, dp_mesh: DeviceMesh, *, param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None, cpu_offload: bool = False,
    reshard_after_forward: bool = True,
) -> None:
    """``fully_shard`` the embedding, each decoder block, the head and then the root, so one
    block's weights are gathered at a time and its gradients reduce-scatter while the next
    block's backward runs."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {
        "mesh": dp_mesh,
        "mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
    }
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    # The embedding (100k rows for Aquila2) is its own unit, gathered for forward and
    # backward only; the head is needed again right at the start of backward, so it stays
    # gathered in between, as does the root (the final norm).
    fully_shard(model.embed_tokens, reshard_after_forward=reshard_after_forward, **options)
    for layer in model.layers:
        fully_shard(layer, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model.lm_head, reshard_after_forward=False, **options)
    fully_shard(model, reshard_after_forward=False, **options)


# -- initialisation -------------------------------------------------------------------------
def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def materialize(model: AquilaModel, device: torch.device,
                draw_on: torch.device | None = None) -> None:
    """Allocate each rank's shards on ``device`` and fill them with Aquila's initialisation,
    the same full tensors whatever the layout.

    Each parameter is drawn whole, on every rank, from a generator of its own (seeded by the
    run's seed, ``torch.initial_seed()``, and the parameter's position), and each rank keeps
    its slice. So an 8-GPU run starts from the very weights that the same run on 2 GPUs, or
    under another tensor-parallel size, starts from, and their loss curves can be held against
    each other step by step; the shards are slices of one draw, so independent of each other.
    It costs one parameter's full size in transient memory, on ``draw_on`` (default
    ``device``; the GPU when the shards are offloaded to the host).
    """
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    model.to_empty(device=device)
    seed = torch.initial_seed()
    # (a caller may have built the model under ``torch.device("meta")``: not for these tensors)
    with torch.no_grad(), torch.device(draw_on or device):
        for index, (name, param) in enumerate(model.named_parameters()):
            local = param.to_local() if isinstance(param, DTensor) else param
            std = init_std(model.config, clean_parameter_name(name))
            if std is None:
                local.fill_(1.0)
                continue
            where = draw_on or local.device
            generator = torch.Generator(device=where)
            generator.manual_seed((seed + 7919 * (index + 1)) % 2**63)
            full = torch.empty(param.shape, dtype=local.dtype, device=where)
            full.normal_(0.0, std, generator=generator)
            if isinstance(param, DTensor):
                shape, offset = compute_local_shape_and_global_offset(
                    param.shape, param.device_mesh, param.placements)
                full = full[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            local.copy_(full)
            del full


def clean_parameter_name(name: str) -> str:
    """The parameter's name without the wrappers that activation checkpointing and compile
    insert."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _is_zero3_partitioned(model: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in model.parameters())


@torch.no_grad()
def init_zero3_partitioned(model: AquilaModel) -> None:
    """DeepSpeed ZeRO-3 partitions each parameter as soon as its module is built, so the
    model's own ``init_weights`` only saw empty partitions. Gather one module at a time,
    initialise it on rank 0 (``init_module``, the model's rule piece by piece), and let
    DeepSpeed scatter the result back."""
    import deepspeed

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    for name, module in model.named_modules():
        params = list(module.parameters(recurse=False))
        if not params:
            continue
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            if rank == 0:
                init_module(model, name, module)
