"""Named training strategies for Aquila2 models (FSDP2, DeepSpeed ZeRO, tensor parallel).

Importing this package registers ``aquila_fsdp``, ``aquila_fsdp_offload``, ``aquila_tp``,
``aquila_tp_fsdp``, ``aquila_zero2`` and ``aquila_zero3`` in Lightning's ``StrategyRegistry``.
"""

from lightning_aquila.strategies.model_parallel import AquilaParallelStrategy
from lightning_aquila.strategies.parallelize import ParallelPlan, prepare_model
from lightning_aquila.strategies.registry import STRATEGIES, register_strategies

register_strategies()

__all__ = ["STRATEGIES", "AquilaParallelStrategy", "ParallelPlan", "prepare_model",
           "register_strategies"]
