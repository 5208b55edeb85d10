"""Our strategy names in Lightning's ``StrategyRegistry``, so ``Trainer(strategy="aquila_fsdp")``
and ``trainer.strategy: aquila_fsdp`` in YAML work. Importing ``lightning_aquila`` (the CLI
does) registers them.

DeepSpeed is an optional extra: ``DeepSpeedStrategy`` is only registered here, and imports
``deepspeed`` when a run instantiates it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import DeepSpeedStrategy, StrategyRegistry

from lightning_aquila.strategies.model_parallel import AquilaParallelStrategy

#: ZeRO settings for billion-parameter decoders: 500M-element buckets (DeepSpeed's own
#: default; Lightning's is 200M), communication overlapped with backward, contiguous
#: gradient buffers against fragmentation.
_ZERO_DEFAULTS: dict[str, Any] = {
    "overlap_comm": True,
    "contiguous_gradients": True,
    "allgather_bucket_size": 500_000_000,
    "reduce_bucket_size": 500_000_000,
}

#: name -> (strategy class, description, init arguments)
STRATEGIES: dict[str, tuple[type, str, dict[str, Any]]] = {
    "aquila_fsdp": (
        AquilaParallelStrategy,
        "FSDP2 fully_shard per decoder block over all devices; bf16 compute, fp32 reduce",
        {"tensor_parallel_size": 1, "fsdp": True},
    ),
    "aquila_fsdp_offload": (
        AquilaParallelStrategy,
        "aquila_fsdp with parameters, gradients and optimizer state offloaded to CPU",
        {"tensor_parallel_size": 1, "fsdp": True, "cpu_offload": True},
    ),
    "aquila_tp": (
        AquilaParallelStrategy,
        "Megatron-style tensor parallel (+ sequence parallel, vocab-parallel loss) over all "
        "devices",
        {"data_parallel_size": 1, "fsdp": False},
    ),
    "aquila_tp_fsdp": (
        AquilaParallelStrategy,
        "tensor parallel within each node, FSDP2 across nodes",
        {"fsdp": True},
    ),
    "aquila_zero2": (
        DeepSpeedStrategy,
        "DeepSpeed ZeRO stage 2 (optimizer state and gradients partitioned)",
        {"stage": 2, **_ZERO_DEFAULTS},
    ),
    "aquila_zero3": (
        DeepSpeedStrategy,
        "DeepSpeed ZeRO stage 3 (parameters partitioned too; model built partitioned)",
        {"stage": 3, **_ZERO_DEFAULTS},
    ),
}


def register_strategies(registry: Any = StrategyRegistry) -> None:
    """Add (or refresh) our names in ``registry``; safe to call more than once."""
    for name, (cls, description, params) in STRATEGIES.items():
        registry.register(name, cls, description=description, override=True, **params)
