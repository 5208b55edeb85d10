"""float8 training of the decoder blocks' projections through torchao (``AquilaLM(float8=...)``).

torchao's ``Float8Linear`` casts a linear layer's input, weight and output gradient to float8
with dynamic scales and runs its three matmuls on float8 tensor cores; the weights, optimizer
state and everything else stay as they were, so a float8 run's checkpoint has the same keys
and dtypes as a bf16 one and the two can resume each other. Only the decoder blocks'
projections are converted: the output head stays in bf16 as in torchtitan's float8 recipe (its
100k-vocabulary logits feed the loss directly), and float8 matmuls need both dimensions to be
multiples of 16.
"""

from __future__ import annotations

from torch import nn

#: torchao recipe names: ``tensorwise`` (one scale per tensor, fastest) and ``rowwise`` (one per
#: row, closer to bf16 numerics, slower).
FLOAT8_RECIPES = ("tensorwise", "rowwise")


def is_float8_candidate(module: nn.Module, name: str) -> bool:
    """Whether ``convert_to_float8`` converts ``module`` (its name within the decoder)."""
    return (isinstance(module, nn.Linear) and name.startswith("layers.")
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def check_float8_capability(capability: tuple[int, int]) -> None:
    """float8 matmuls need float8 tensor cores (compute capability 8.9: L4, L40S, H100 and
    newer). An A100 would fail deep inside ``torch._scaled_mm``; say so before any work. (On
    the CPU torch emulates them, slowly: fine for tests, useless for speed.)"""
    if capability < (8, 9):
        raise ValueError(f"float8 needs a GPU with float8 tensor cores (compute capability "
                         f"8.9 or newer: L40S, H100, ...); this one has "
                         f"{capability[0]}.{capability[1]}. Leave model.float8 unset")


def convert_to_float8(model: nn.Module, recipe: str) -> int:
    """Swaps the eligible ``nn.Linear`` layers of ``model`` for torchao ``Float8Linear`` in
    place (before compiling and sharding); returns how many were converted."""
    if recipe not in FLOAT8_RECIPES:
        raise ValueError(f"float8={recipe!r} is not one of {list(FLOAT8_RECIPES)}")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(recipe),
                               module_filter_fn=is_float8_candidate)
    converted = sum(isinstance(m, Float8Linear) for m in model.modules())
    if converted == 0:
        raise ValueError("float8: no decoder projection has both dimensions divisible by 16; "
                         "nothing to convert")
    return converted
