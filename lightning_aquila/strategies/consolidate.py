"""``lightning-aquila consolidate``: a sharded checkpoint to one file and/or a Hugging Face
directory.

``aquila_fsdp``/``aquila_tp``/``aquila_tp_fsdp`` save a directory with one shard per rank
(``torch.distributed.checkpoint``) plus ``meta.pt`` (loops, callbacks, datamodule, hparams);
DeepSpeed ZeRO saves its own partitioned layout. Both resume as they are under the strategy
that wrote them. This command assembles the full tensors on one machine (CPU memory must hold
them) into a standard Lightning checkpoint: ``state_dict`` with the model's full weights and
``optimizer_states`` keyed by parameter index as ``torch.optim`` does, so the file resumes
under any strategy (a single device included) and ``lightning-aquila export-hf`` reads it.
The command's flags and output are in ``cli/tools.py``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

_META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a sharded checkpoint


def is_distributed_checkpoint(path: Path) -> bool:
    """A ``torch.distributed.checkpoint`` directory written by Lightning."""
    return path.is_dir() and (path / ".metadata").is_file() and (path / _META_FILE).is_file()


def is_deepspeed_checkpoint(path: Path) -> bool:
    return path.is_dir() and any(path.glob("*/*model_states.pt"))


def _optimizer_by_index(state: dict[str, Any]) -> dict[str, Any]:
    """``torch.distributed.checkpoint`` keys optimizer state by parameter name; a plain
    ``torch.optim`` state dict by the parameter's position over all groups in order."""
    index: dict[str, int] = {}
    groups = []
    for group in state["param_groups"]:
        params = []
        for name in group["params"]:
            index.setdefault(name, len(index))
            params.append(index[name])
        groups.append({**group, "params": params})
    return {"state": {index[name]: value for name, value in state["state"].items()},
            "param_groups": groups}


def load_distributed_checkpoint(path: Path) -> dict[str, Any]:
    """The full checkpoint of a Lightning sharded checkpoint directory, in the single-file
    layout (``state_dict``, ``optimizer_states``, loops, callbacks, ...)."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    checkpoint = _load_distributed_checkpoint(path)
    if "state_dict" not in checkpoint and "model" in checkpoint:  # FSDPStrategy's layout
        checkpoint["state_dict"] = checkpoint.pop("model")
    keys = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)),
                  key=lambda k: int(k.split("_")[1]))
    if keys:
        states = [checkpoint.pop(k) for k in keys]
        checkpoint["optimizer_states"] = [
            _optimizer_by_index(s) if s.get("param_groups") and isinstance(
                s["param_groups"][0]["params"][0], str) else s
            for s in states
        ]
    return checkpoint


def load_deepspeed_checkpoint(path: Path) -> dict[str, Any]:
    """DeepSpeed's partitioned ZeRO checkpoint, merged to fp32 by Lightning's converter."""
    try:
        import deepspeed  # noqa: F401
        from lightning.pytorch.utilities.deepspeed import (
            convert_zero_checkpoint_to_fp32_state_dict,
        )
    except ImportError as error:
        raise RuntimeError(f"{path} is a DeepSpeed checkpoint; consolidating it needs "
                           "deepspeed (pip install lightning-aquila[deepspeed])") from error
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "consolidated.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(str(path), str(target))
        return torch.load(target, map_location="cpu", weights_only=False)


def consolidate(path: str | os.PathLike) -> dict[str, Any]:
    """The single-file checkpoint of a sharded (FSDP2/TP or DeepSpeed) checkpoint directory."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if is_distributed_checkpoint(path):
        return load_distributed_checkpoint(path)
    if is_deepspeed_checkpoint(path):
        return load_deepspeed_checkpoint(path)
    if path.is_file():
        raise ValueError(f"{path} is already a single-file checkpoint; "
                         "`lightning-aquila export-hf` reads it directly")
    raise ValueError(f"{path} is neither a sharded Lightning checkpoint (.metadata and "
                     f"{_META_FILE}) nor a DeepSpeed one (*/..model_states.pt)")

