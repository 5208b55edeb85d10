"""The decoder of a single-file AquilaLM checkpoint, for ``lightning-aquila export-hf`` and
``consolidate`` (``cli/tools.py``). Sharded (FSDP/TP) checkpoints go through
``strategies/consolidate.py`` first."""

from __future__ import annotations

import os
from typing import Any

import torch

from lightning_aquila.model import AquilaConfig, AquilaModel

#: The checkpoint entry holding the ``tokenizer.json`` text of the run's store (AquilaLM).
TOKENIZER_KEY = "aquila_tokenizer"


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



def export_tokenizer(checkpoint: dict, config: AquilaConfig,
                     given: str | os.PathLike | None = None) -> Any:
    """The tokenizer to put beside an export: ``given`` (a tokenizer.json or its directory),
    else the copy the checkpoint carries (``None`` for one from before copies were kept).
    Refused (``ValueError``, one line naming both sides and the fix) where its ids do not fit
    the model: more ids than the embedding has rows, or other bos/eos ids."""
    from tokenizers import Tokenizer

    from lightning_aquila.tokenizer import load_tokenizer, special_token_ids

    if given is not None:
        tokenizer, name = load_tokenizer(given), f"--tokenizer {os.fspath(given)}"
    elif checkpoint.get(TOKENIZER_KEY):
        tokenizer = Tokenizer.from_str(checkpoint[TOKENIZER_KEY])
        name = "the checkpoint's tokenizer"
    else:
        return None
    fix = ("give the tokenizer the model was trained with (leave --tokenizer unset to use "
           "the one the checkpoint carries)")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"{name} has {tokenizer.get_vocab_size():,} ids, but the model's "
                         f"vocabulary has {config.vocab_size:,}; {fix}")
    bos, eos = special_token_ids(tokenizer)
    for label, ours, theirs in (("bos", config.bos_token_id, bos),
                                ("eos", config.eos_token_id, eos)):
        if theirs is not None and ours != theirs:
            raise ValueError(f"{name} has {label} id {theirs}, but the model's is {ours}; {fix}")
    return tokenizer
