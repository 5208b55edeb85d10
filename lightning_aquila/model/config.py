"""AquilaConfig: every architectural number of an Aquila2 decoder, with named presets.

The field names are the library's vocabulary: the YAML (``model.config.hidden_size``), the
docs and the Hugging Face mapping in ``hf.py`` all use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

AQUILA2_VOCAB_SIZE = 100008
AQUILA2_BOS_ID = 100006
AQUILA2_EOS_ID = 100007

#: ``AquilaConfig.rope_scaling`` types, each with its (required, optional) keys besides
#: ``rope_type``: the keys of transformers' ``rope_parameters`` for that type.
ROPE_SCALING_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("factor",), ()),
    "yarn": (("factor", "original_max_position_embeddings"),
             ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "truncate")),
    "llama3": (("factor", "original_max_position_embeddings", "low_freq_factor",
                "high_freq_factor"), ()),
}
_DYNAMIC_REFUSAL = (
    "AquilaConfig.rope_scaling rope_type 'dynamic' is not supported: dynamic NTK recomputes "
    "the RoPE base from each input's length at inference and equals plain RoPE at every "
    "length up to max_position_embeddings, so training with it would silently train without "
    "scaling; use 'linear', 'yarn' or 'llama3' (or a larger rope_theta)"
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_rope_scaling(value: Any) -> dict[str, Any] | None:
    """``value`` as an ``AquilaConfig.rope_scaling``: ``None``, or a dict with ``rope_type``
    (``type`` is read as its older name) and that type's keys; a ``ValueError`` of one line
    naming the field otherwise."""
    if value is None:
        return None
    where = "AquilaConfig.rope_scaling"
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be None or a mapping such as "
                         f"{{'rope_type': 'linear', 'factor': 4.0}}, got {value!r}")
    scaling = dict(value)
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    rope_type = scaling.get("rope_type")
    if rope_type == "dynamic":
        raise ValueError(_DYNAMIC_REFUSAL)
    if rope_type not in ROPE_SCALING_KEYS:
        raise ValueError(f"{where}['rope_type'] must be one of {sorted(ROPE_SCALING_KEYS)} "
                         f"(or rope_scaling None for plain RoPE), got {rope_type!r}")
    required, optional = ROPE_SCALING_KEYS[rope_type]
    unknown = sorted(set(scaling) - {"rope_type", *required, *optional})
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown} for rope_type {rope_type!r}; "
                         f"known: {sorted({*required, *optional})}")
    missing = [key for key in required if key not in scaling]
    if missing:
        raise ValueError(f"{where} with rope_type {rope_type!r} lacks {missing}")
    for key, item in scaling.items():
        if key == "rope_type":
            continue
        if key == "truncate":
            ok, wanted = isinstance(item, bool), "true or false"
        elif key == "original_max_position_embeddings":
            ok, wanted = isinstance(item, int) and not isinstance(item, bool) and item > 0, \
                "a positive integer"
        elif key == "factor":
            ok, wanted = _is_number(item) and item >= 1, "a number >= 1"
        elif key in ("mscale", "mscale_all_dim"):
            ok, wanted = _is_number(item) and item >= 0, "a number >= 0"
        else:
            ok, wanted = _is_number(item) and item > 0, "a positive number"
        if not ok:
            raise ValueError(f"{where}[{key!r}] must be {wanted}, got {item!r}")
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ValueError(f"{where}['high_freq_factor'] ({scaling['high_freq_factor']}) must "
                         f"exceed low_freq_factor ({scaling['low_freq_factor']})")
    return scaling


@dataclass(frozen=True)
class AquilaConfig:
    """A decoder-only transformer: RMSNorm, RoPE, SwiGLU MLP, grouped-query attention,
    no biases, untied input and output embeddings."""

    name: str = "custom"
    vocab_size: int = AQUILA2_VOCAB_SIZE
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_size: int = 11008
    rope_theta: float = 10000.0
    #: RoPE scaling for long context, in transformers' terms (``rope_type`` and its keys,
    #: ``ROPE_SCALING_KEYS``); ``None`` is plain RoPE. Left out of the hash (a dict).
    rope_scaling: dict[str, Any] | None = field(default=None, hash=False)
    norm_eps: float = 1e-5
    max_seq_len: int = 4096
    bos_token_id: int = AQUILA2_BOS_ID
    eos_token_id: int = AQUILA2_EOS_ID
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                  "intermediate_size", "max_seq_len"):
            if getattr(self, f) <= 0:
                raise ValueError(f"AquilaConfig.{f} must be positive, got {getattr(self, f)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"AquilaConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"AquilaConfig.num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        object.__setattr__(self, "rope_scaling", check_rope_scaling(self.rope_scaling))
        for f in ("bos_token_id", "eos_token_id"):
            if not 0 <= getattr(self, f) < self.vocab_size:
                raise ValueError(
                    f"AquilaConfig.{f} ({getattr(self, f)}) is outside the vocabulary "
                    f"(vocab_size={self.vocab_size})"
                )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_params(self) -> int:
        """Exact parameter count, computed without building the model."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        attention = 2 * h * h + 2 * h * kv
        mlp = 3 * h * self.intermediate_size
        per_layer = attention + mlp + 2 * h
        return self.num_layers * per_layer + 2 * self.vocab_size * h + h

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token, ``6·N + 12·L·H·T`` (PaLM appendix B), with N the
        non-embedding parameters plus the output head and H the hidden size."""
        n = self.num_params - self.vocab_size * self.hidden_size
        return 6 * n + 12 * self.num_layers * self.hidden_size * seq_len

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> AquilaConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AquilaConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown AquilaConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


#: The bundled byte-level BPE tokenizer (lightning_aquila/assets/tokenizer) has 8192 ids,
#: its bos and eos last, as Aquila2's does.
BUNDLED_VOCAB = {"vocab_size": 8192, "bos_token_id": 8190, "eos_token_id": 8191}

PRESETS: dict[str, AquilaConfig] = {
    # Published Aquila2 sizes (BAAI's Hugging Face configs).
    "aquila2-7b": AquilaConfig(
        name="aquila2-7b", hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
        intermediate_size=11008, max_seq_len=2048,
    ),
    "aquila2-34b": AquilaConfig(
        name="aquila2-34b", hidden_size=6144, num_layers=60, num_heads=48, num_kv_heads=8,
        intermediate_size=24576, max_seq_len=4096, norm_eps=1e-5,
    ),
    "aquila2-70b": AquilaConfig(
        name="aquila2-70b", hidden_size=8192, num_layers=80, num_heads=64, num_kv_heads=8,
        intermediate_size=28672, max_seq_len=4096,
    ),
    # ~1.1B parameters with the full Aquila2 vocabulary: the single-GPU benchmark model.
    "aquila2-1b": AquilaConfig(
        name="aquila2-1b", hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=4,
        intermediate_size=5632, max_seq_len=2048,
    ),
    # ~125M parameters at a 32k vocabulary (GPT-3 Small's shape with GQA): the mixing
    # benchmark's model (configs/benchmarks/mixing). Give vocab_size/bos/eos of the store's
    # tokenizer in the config.
    "aquila2-125m": AquilaConfig(
        name="aquila2-125m", hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
        intermediate_size=2048, max_seq_len=1024,
    ),
    # ~21M parameters at a 32k vocabulary: the mixing benchmark's model
    # (configs/benchmarks/mixing), a hundred runs of one GPU sitting. Give vocab_size/bos/eos
    # of the store's tokenizer in the config.
    "aquila2-20m": AquilaConfig(
        name="aquila2-20m", hidden_size=256, num_layers=6, num_heads=4, num_kv_heads=2,
        intermediate_size=704, max_seq_len=1024,
    ),
    # ~2.8M parameters on the bundled tokenizer: the CPU quickstart's few hundred steps
    # take minutes on two cores.
    "aquila2-mini": AquilaConfig(
        name="aquila2-mini", hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_size=352, max_seq_len=512, **BUNDLED_VOCAB,
    ),
    # ~1M parameters: unit and multi-process tests.
    "aquila2-tiny": AquilaConfig(
        name="aquila2-tiny", hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=176, max_seq_len=256, **BUNDLED_VOCAB,
    ),
}
