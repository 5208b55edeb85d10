"""The Aquila2 decoder in one readable file (after litgpt's ``model.py``).

It knows nothing of parallelism: tensor-parallel plans and FSDP wrapping are applied from
outside (``lightning_aquila.strategies``). To let a TP plan shard heads, attention reshapes
with ``-1`` heads, so the local head count follows whatever the projections produce.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_aquila.model.config import AquilaConfig
from lightning_aquila.model.head_loss import (
    IGNORE_INDEX,
    chunked_linear_cross_entropy,
    token_cross_entropy,
)

#: ``attention``: ``auto`` is cuDNN SDPA on CUDA and plain SDPA elsewhere; ``sdpa`` lets
#: PyTorch choose the backend; ``cudnn`` puts cuDNN's fused attention first (fastest SDPA
#: backend on Hopper); ``flash`` is flash-attn-4 (the ``flash`` extra), on CUDA fp16/bf16.
ATTENTION_IMPLS = ("auto", "sdpa", "cudnn", "flash")
#: ``loss_impl``: ``standard`` computes the full logits then an fp32 cross-entropy;
#: ``chunked`` never materialises full-vocabulary logits (``head_loss.py``).
LOSS_IMPLS = ("standard", "chunked")

_CUDNN_FIRST = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def check_choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    """``value`` if it is one of ``allowed``; else a ``ValueError`` naming them."""
    if value not in allowed:
        raise ValueError(f"{option}={value!r} is not one of {list(allowed)}")
    return value


def load_flash_attn() -> Callable[..., Any]:
    """flash-attn-4's ``flash_attn_func`` (CuTe DSL kernels for Hopper and Blackwell),
    imported only when asked for: the wheel is optional and pulls in the CUTLASS DSL."""
    try:
        from flash_attn.cute import flash_attn_func
    except ImportError as error:
        raise ImportError(
            "attention='flash' needs flash-attn-4 (`pip install 'lightning-aquila[flash]'`); "
            "use attention='cudnn' or 'sdpa' without it"
        ) from error
    return flash_attn_func


@torch.compiler.disable
def _flash(fn: Callable[..., Any], q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor) -> torch.Tensor:
    """flash-attn-4 on (B, T, H, D), grouped-query heads as they are. Kept out of
    ``torch.compile`` graphs: its CuTe kernels cannot be traced with fake tensors."""
    out = fn(q, k, v, causal=True)
    return out[0] if isinstance(out, tuple) else out  # (out, lse) in 4.0 betas


class RMSNorm(nn.Module):
    """Normalises in fp32 and casts back before the scale, as Llama/Aquila do, so bf16
    training and the Hugging Face reference agree to the last bit in fp32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_frequencies(head_dim: int, theta: float, rope_scaling: Mapping[str, Any] | None,
                     device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies (head_dim / 2,) and the factor on its cos/sin for an
    ``AquilaConfig.rope_scaling``, computed as transformers' ``ROPE_INIT_FUNCTIONS`` do, op for
    op in fp32, so the tables agree with its Llama to the last bit."""
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if rope_scaling is None:
        return inv_freq, 1.0
    kind, factor = rope_scaling["rope_type"], rope_scaling["factor"]
    if kind == "linear":  # position interpolation: positions divided by factor
        return inv_freq / factor, 1.0
    original = rope_scaling["original_max_position_embeddings"]
    if kind == "llama3":  # long wavelengths interpolated, short kept, a smooth ramp between
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < original / high) * ~(wavelen > original / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # yarn: interpolate the dimensions that rotate fewer than beta_slow times over the original
    # context, extrapolate those that rotate more than beta_fast times, ramp in between, and
    # scale cos/sin by the attention factor (YaRN eq. 21 unless given)
    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    beta_fast = rope_scaling.get("beta_fast") or 32
    beta_slow = rope_scaling.get("beta_slow") or 1

    def dimension(rotations: float) -> float:
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = dimension(beta_fast), dimension(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low),
                       0, 1)  # made on the host as transformers makes it: the same bits
    extrapolated = 1 - ramp.to(device=device)
    pos_freqs = theta**exponents
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolated) + (1.0 / pos_freqs) * extrapolated
    return inv_freq, float(attention_factor)


def _yarn_mscale(factor: float, mscale: float = 1) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@functools.lru_cache(maxsize=16)
def _cached_frequencies(head_dim: int, theta: float, scaling: str, device: torch.device
                        ) -> tuple[torch.Tensor, float]:
    """``rope_frequencies`` once per (shape, scaling, device) rather than in every forward: with
    scaling it is a dozen small ops and, for YaRN, a copy from pageable host memory that would
    wait for all the work queued on the GPU. Nothing differentiates through them, so ones first
    made under inference mode (a validation step) serve training too."""
    return rope_frequencies(head_dim, theta, json.loads(scaling) if scaling else None, device)


def rope_scaling_key(rope_scaling: Mapping[str, Any] | None) -> str:
    """An ``AquilaConfig.rope_scaling`` as the string the rotary-table op takes (an op's
    arguments cannot be dicts): canonical JSON, ``""`` for plain RoPE."""
    return "" if rope_scaling is None else json.dumps(dict(rope_scaling), sort_keys=True)


@torch.library.custom_op("lightning_aquila::rope_tables", mutates_args=())
def _rope_tables(seq_len: int, head_dim: int, theta: float, device: torch.device,
                 dtype: torch.dtype, scaling: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq, attention_factor = _cached_frequencies(head_dim, theta, scaling, device)
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


@_rope_tables.register_fake
def _rope_tables_fake(seq_len: int, head_dim: int, theta: float, device: torch.device,
                      dtype: torch.dtype, scaling: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(seq_len, head_dim, device=device, dtype=dtype),
            torch.empty(seq_len, head_dim, device=device, dtype=dtype))


def rope_cos_sin(
    seq_len: int, head_dim: int, theta: float, device: torch.device, dtype: torch.dtype,
    scaling: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables (T, D), computed per call: no buffer means nothing to re-create after
    meta-device or sharded initialisation. They come from an opaque op because, traced as
    plain ops, whole-model ``torch.compile`` fuses the cos/sin into every q and k rotation
    and recomputes them for each batch row and head (docs/benchmarks.md, "Fit path").
    ``scaling`` is ``rope_scaling_key(config.rope_scaling)``."""
    return torch.ops.lightning_aquila.rope_tables(seq_len, head_dim, theta, device, dtype,
                                                  scaling)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on (B, T, H, D), the Hugging Face Llama convention, so weights
    move between the two without permuting q/k rows."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


class Attention(nn.Module):
    def __init__(self, config: AquilaConfig, impl: str = "auto") -> None:
        super().__init__()
        self.config = config
        self.impl = check_choice("attention", impl, ATTENTION_IMPLS)
        self._flash_fn = load_flash_attn() if impl == "flash" else None
        kv_size = config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, kv_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq_len, _ = x.shape
        head_dim = self.config.head_dim
        q = self.q_proj(x).view(batch, seq_len, -1, head_dim)
        k = self.k_proj(x).view(batch, seq_len, -1, head_dim)
        v = self.v_proj(x).view(batch, seq_len, -1, head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        low_precision = q.dtype in (torch.float16, torch.bfloat16)
        if self._flash_fn is not None and q.is_cuda and low_precision:
            out = _flash(self._flash_fn, q, k, v)
        else:  # flash on CPU or in fp32 (tests, CPU runs) is SDPA's job
            cudnn = q.is_cuda and self.impl in ("auto", "cudnn")
            with sdpa_kernel(_CUDNN_FIRST, set_priority=True) if cudnn else nullcontext():
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                    is_causal=True, enable_gqa=q.shape[2] != k.shape[2],
                ).transpose(1, 2)
        return self.o_proj(out.reshape(batch, seq_len, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: AquilaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: AquilaConfig, attention: str = "auto") -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.attention = Attention(config, attention)
        self.mlp_norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class OutputHead(nn.Linear):
    """The vocabulary projection. Called with labels it returns the chunked loss instead of
    the logits, so that loss still runs inside this module's ``forward``, where FSDP2 has
    gathered the weight."""

    def __init__(self, hidden_size: int, vocab_size: int, loss_impl: str = "standard",
                 loss_chunk_size: int = 4096) -> None:
        super().__init__(hidden_size, vocab_size, bias=False)
        self.loss_impl = check_choice("loss_impl", loss_impl, LOSS_IMPLS)
        if loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be a positive number of tokens, "
                             f"got {loss_chunk_size}")
        self.loss_chunk_size = loss_chunk_size

    def forward(self, x: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if labels is None:
            return super().forward(x)
        return chunked_linear_cross_entropy(x, self.weight, labels, self.loss_chunk_size)


class AquilaModel(nn.Module):
    """``forward(input_ids (B, T)) -> logits (B, T, vocab_size)``, or with ``labels`` (B, T)
    ``-> (token-mean loss, per-token fp32 losses (B, T), 0 where a label is -100)``.

    ``attention``, ``loss_impl`` and ``loss_chunk_size`` choose kernels, not architecture
    (``ATTENTION_IMPLS``, ``LOSS_IMPLS``): every choice computes the same function, so they
    live here and not in ``AquilaConfig``, checkpoints and exports.
    """

    def __init__(self, config: AquilaConfig, attention: str = "auto",
                 loss_impl: str = "standard", loss_chunk_size: int = 4096) -> None:
        super().__init__()
        self.config = config
        self.rope_scaling = rope_scaling_key(config.rope_scaling)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, attention) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.norm_eps)
        self.lm_head = OutputHead(config.hidden_size, config.vocab_size, loss_impl,
                                  loss_chunk_size)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        seq_len = input_ids.shape[1]
        if seq_len > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {seq_len} exceeds max_seq_len={self.config.max_seq_len} "
                f"of model {self.config.name!r}"
            )
        x = self.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(seq_len, self.config.head_dim, self.config.rope_theta,
                                x.device, x.dtype, self.rope_scaling)
        for block in self.layers:
            x = block(x, cos, sin)
        x = self.norm(x)
        if labels is None:
            return self.lm_head(x)
        if self.lm_head.loss_impl == "chunked":
            return self.lm_head(x, labels)
        # The head called with one input, as tensor-parallel plans expect (its logits may be
        # a vocabulary-sharded DTensor that token_cross_entropy handles).
        per_token = token_cross_entropy(self.lm_head(x), labels)
        return per_token.sum() / (labels != IGNORE_INDEX).sum().clamp(min=1), per_token

    @torch.no_grad()
    def init_weights(self) -> None:
        """Aquila's initialisation (:func:`init_std`) of every parameter. Works on
        materialised, FSDP-sharded (DTensor) or TP-sharded parameters."""
        for name, module in self.named_modules():
            init_module(self, name, module)


def init_std(config: AquilaConfig, name: str) -> float | None:
    """Aquila's initialisation of the parameter ``name``, the one rule for
    ``AquilaModel.init_weights`` and for sharded materialisation (``strategies/parallelize.py``):
    the standard deviation of its zero-mean normal draw, or ``None`` for the norms (ones).
    GPT-2/Megatron: ``config.init_std``, and the two projections that write into the residual
    stream scaled by 1/sqrt(2·layers) so its variance stays flat."""
    if name.endswith("norm.weight"):
        return None
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        return config.init_std / math.sqrt(2 * config.num_layers)
    return config.init_std


@torch.no_grad()
def init_module(model: AquilaModel, name: str, module: nn.Module) -> None:
    """:func:`init_std`'s rule for one submodule ``name`` of ``model`` (its own parameters
    only), so a model that cannot be gathered whole can be initialised piecewise."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=init_std(model.config, f"{name}.weight"))
    elif isinstance(module, RMSNorm):
        module.reset_parameters()
