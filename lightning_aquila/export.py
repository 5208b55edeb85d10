"""``lightning-aquila export-hf``: a single-file Lightning checkpoint to a Hugging Face
directory. Sharded (FSDP/TP) checkpoints go through ``lightning-aquila consolidate`` first."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lightning_aquila.model import AquilaConfig, AquilaModel, export_hf

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_from_checkpoint(checkpoint: dict) -> AquilaModel:
    """Rebuild the decoder from an AquilaLM checkpoint (its config is stored alongside)."""
    if "aquila_config" not in checkpoint:
        raise ValueError("not an AquilaLM checkpoint: it has no 'aquila_config' entry")
    config = AquilaConfig.from_dict(checkpoint["aquila_config"])
    prefix = "model."
    state = {
        k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    with torch.device("meta"):
        model = AquilaModel(config)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-aquila export-hf", description=__doc__,
                                     allow_abbrev=False)
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file written by AquilaLM")
    parser.add_argument("--output", type=Path, required=True, help="directory to create")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="bf16",
                        help="dtype of the exported weights (default %(default)s)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer.json (or its directory) to copy into the export")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the output directory if it exists")
    args = parser.parse_args(argv)
    if not args.checkpoint.is_file():
        parser.error(f"{args.checkpoint} is not a checkpoint file (sharded? use consolidate)")
    checkpoint = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    model = model_from_checkpoint(checkpoint)
    path = export_hf(model, args.output, dtype=_DTYPES[args.dtype], tokenizer=args.tokenizer,
                     overwrite=args.overwrite)
    print(f"wrote {path} ({model.config.num_params / 1e6:.1f}M parameters, {args.dtype})")
    return 0
