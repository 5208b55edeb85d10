"""Hugging Face interop: our decoder is a Llama, so export writes a Llama directory that
``transformers.AutoModelForCausalLM`` loads, and import reads Llama directories and BAAI's
Aquila2 checkpoints (same tensor names, ``model_type: aquila``, ``.bin`` shards).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lightning_aquila.atomic import PARTIAL_SUFFIX, replace_directory
from lightning_aquila.model.config import AquilaConfig
from lightning_aquila.model.model import AquilaModel

#: dtypes by the names a config or a command gives them: ``--dtype`` of ``export-hf`` and
#: ``consolidate``, and the FSDP plan's ``param_dtype``/``reduce_dtype``.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}

# (our parameter name, Hugging Face name); {i} is the layer index.
_NAME_MAP = [
    ("embed_tokens.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.attention.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
]


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_TO_HF = [(_compile(ours), theirs) for ours, theirs in _NAME_MAP]
_FROM_HF = [(_compile(theirs), ours) for ours, theirs in _NAME_MAP]


def _rename(name: str, table: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, target in table:
        match = pattern.match(name)
        if match:
            return target.replace("{i}", match.group(1)) if match.groups() else target
    raise KeyError(name)


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_rename(name, _TO_HF): tensor for name, tensor in state_dict.items()}


def from_hf_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in state_dict.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved
            continue
        try:
            out[_rename(name, _FROM_HF)] = tensor
        except KeyError:
            raise ValueError(f"unexpected tensor {name!r} in Hugging Face checkpoint") from None
    return out


def hf_config_dict(config: AquilaConfig, dtype: torch.dtype) -> dict:
    from transformers import LlamaConfig

    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    hf = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=config.norm_eps,
        rope_parameters=rope,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        tie_word_embeddings=False,
        hidden_act="silu",
        initializer_range=config.init_std,
    )
    data = hf.to_dict()
    data["architectures"] = ["LlamaForCausalLM"]
    data["torch_dtype"] = data["dtype"] = str(dtype).removeprefix("torch.")
    # transformers 5 reads rope_parameters; 4 reads rope_theta and rope_scaling at top level
    data["rope_parameters"] = rope
    data["rope_theta"] = config.rope_theta
    if config.rope_scaling:
        data["rope_scaling"] = dict(config.rope_scaling)
    return data


def config_from_hf(data: Mapping) -> AquilaConfig:
    """Llama (transformers 4 or 5) and BAAI Aquila2 ``config.json`` to AquilaConfig."""
    model_type = data.get("model_type")
    if model_type not in ("llama", "aquila"):
        raise ValueError(f"expected a llama or aquila config.json, got model_type={model_type!r}")
    if data.get("tie_word_embeddings"):
        raise ValueError("tied input/output embeddings are not an Aquila2 layout")
    rope = dict(data.get("rope_parameters") or data.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", data.get("rope_theta", 10000.0))
    if rope.pop("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor) are not an Aquila2 "
                         "layout")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    scaling = None if rope_type in ("default", None) else {"rope_type": rope_type, **rope}
    if rope_type in ("yarn", "llama3"):  # transformers' default for the pretraining length
        scaling.setdefault("original_max_position_embeddings",
                           data.get("max_position_embeddings", 4096))
    heads = data["num_attention_heads"]
    head_dim = data.get("head_dim") or data["hidden_size"] // heads
    if head_dim * heads != data["hidden_size"]:
        raise ValueError(
            f"head_dim {head_dim} x {heads} heads != hidden_size {data['hidden_size']}"
        )
    vocab = data["vocab_size"]
    return AquilaConfig(
        name=data.get("_name_or_path") or "imported",
        vocab_size=vocab,
        hidden_size=data["hidden_size"],
        num_layers=data["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=data.get("num_key_value_heads") or heads,
        intermediate_size=data["intermediate_size"],
        rope_theta=float(theta),
        rope_scaling=scaling,
        norm_eps=data.get("rms_norm_eps", 1e-5),
        max_seq_len=data.get("max_position_embeddings", 4096),
        bos_token_id=_first(data.get("bos_token_id"), vocab - 2, vocab),
        eos_token_id=_first(data.get("eos_token_id"), vocab - 1, vocab),
        init_std=data.get("initializer_range", 0.02),
    )


def _first(value: int | list[int] | None, default: int, vocab: int) -> int:
    """A special-token id from config.json (which may give a list), if it fits the vocab."""
    if isinstance(value, list):
        value = value[0] if value else None
    return value if value is not None and 0 <= value < vocab else default


def _shards(
    state_dict: Mapping[str, torch.Tensor], max_bytes: int
) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shard and size + nbytes > max_bytes:
            yield shard
            shard, size = {}, 0
        shard[name] = tensor
        size += nbytes
    if shard:
        yield shard


def export_hf(
    model: AquilaModel,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    tokenizer: str | os.PathLike | Any | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a Hugging Face Llama directory (config.json + safetensors).

    The directory is assembled under a temporary name and renamed into place, so a reader
    never sees half an export. ``tokenizer`` (a tokenizer.json or its directory, or a
    ``tokenizers.Tokenizer``) is written in so the export is self-contained.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True)")
    state = {
        name: (t.detach().to("cpu", dtype or t.dtype)).contiguous()
        for name, t in model.state_dict().items()
    }
    dtype = dtype or next(iter(state.values())).dtype
    hf_state = to_hf_state_dict(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=PARTIAL_SUFFIX, dir=path.parent))
    try:
        shards = list(_shards(hf_state, max_shard_bytes))
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for k, shard in enumerate(shards, 1):
                fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in hf_state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = hf_config_dict(model.config, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": model.config.bos_token_id,
                      "eos_token_id": model.config.eos_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        if tokenizer is not None and hasattr(tokenizer, "to_str"):
            (tmp / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
        elif tokenizer is not None:
            source = Path(tokenizer)
            source = source / "tokenizer.json" if source.is_dir() else source
            shutil.copyfile(source, tmp / "tokenizer.json")
        # swapped in whole: a kill never leaves half an export, nor none in place of the old
        replace_directory(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def _load_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    candidates = ["model.safetensors.index.json", "model.safetensors",
                  "pytorch_model.bin.index.json", "pytorch_model.bin"]
    for fname in candidates:
        file = path / fname
        if not file.exists():
            continue
        if fname.endswith(".index.json"):
            shard_files = sorted(set(json.loads(file.read_text())["weight_map"].values()))
        else:
            shard_files = [fname]
        state: dict[str, torch.Tensor] = {}
        for shard in shard_files:
            if shard.endswith(".safetensors"):
                state.update(load_file(path / shard))
            else:
                state.update(torch.load(path / shard, map_location="cpu", weights_only=True))
        return state
    raise FileNotFoundError(
        f"no model.safetensors[.index.json] or pytorch_model.bin[.index.json] in {path}"
    )


#: What a run may change in an imported model's config: the context and its rotary
#: positions (extending a checkpoint's context, as the Aquila2 16K variants did), never a
#: shape of the weights.
CONTEXT_FIELDS = ("max_seq_len", "rope_theta", "rope_scaling")


def import_hf(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
              context: Mapping[str, Any] | None = None, **kernels: Any) -> AquilaModel:
    """Load a Hugging Face Llama or BAAI Aquila2 directory as an AquilaModel; ``context``
    replaces any of :data:`CONTEXT_FIELDS` of its config (the other fields are the
    checkpoint's); ``kernels`` (``attention``, ``loss_impl``, ``loss_chunk_size``) go to
    ``AquilaModel``."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    config = config_from_hf(json.loads(config_file.read_text()))
    if context:
        config = AquilaConfig.from_dict({**config.to_dict(), **{
            k: v for k, v in context.items() if k in CONTEXT_FIELDS}})
    state = from_hf_state_dict(_load_hf_weights(path))
    with torch.device("meta"):
        model = AquilaModel(config, **kernels)
    missing = sorted(set(model.state_dict()) - set(state))
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if dtype is not None:
        state = {name: t.to(dtype) for name, t in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    return model
