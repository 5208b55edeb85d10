"""The tokenizer a shard store records: the one source of truth for a run's token ids.

``prepare`` writes a copy of the ``tokenizer.json`` it tokenized with into the store (a byte
array ``_tokenizers/<hash>`` beside the domains, its special tokens as attributes), next to
the hash and ids each domain already records. Training then needs no tokenizer flags: the
model's vocabulary size, bos and eos, and the tokenizer the probes encode with, all come from
here (``cli/trainer.py``, ``callbacks/probes.py``), and the check before step 0 compares
everything else that turns ids into text against it (``vocabulary.py``).

Stores written before the copy existed still carry the hash and ids in each domain's
metadata; :attr:`StoreTokenizer.json` is ``None`` for them and readers fall back to what they
did before (the bundled tokenizer for probes), saying so once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_aquila.datamodules.shard_format import DataError

#: The group of the store root that holds the copies; not a valid domain name (a leading
#: ``_``), so it can never collide with one.
TOKENIZERS_GROUP = "_tokenizers"


@dataclass(frozen=True)
class StoreTokenizer:
    """What a store knows of the tokenizer its domains were prepared with."""

    store: str
    hash: str
    #: the name it was prepared from (the directory or file name ``prepare`` was given)
    name: str
    vocab_size: int | None
    bos_id: int | None
    eos_id: int | None
    #: the ``tokenizer.json`` text, ``None`` for a store prepared before copies were kept
    json: str | None

    def describe(self) -> str:
        """``tok (4,096 ids, hash 1a2b3c4d)``: how messages name it."""
        size = f"{self.vocab_size:,} ids, " if self.vocab_size else ""
        return f"{self.name or 'its tokenizer'} ({size}hash {self.hash[:8]})"

    def load(self) -> Any:
        """The copy as a ``tokenizers.Tokenizer``; ``None`` for an old store."""
        if self.json is None:
            return None
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.json)

    def model_config(self) -> dict[str, int]:
        """The ``AquilaConfig`` fields this tokenizer fixes (those the store knows)."""
        fields = {"vocab_size": self.vocab_size, "bos_token_id": self.bos_id,
                  "eos_token_id": self.eos_id}
        return {key: int(value) for key, value in fields.items() if value is not None}


def write_tokenizer_copy(root: Any, meta: Mapping[str, Any], tokenizer_json: str) -> None:
    """Store ``tokenizer_json`` under ``_tokenizers/<hash>`` of the zarr group ``root``
    unless a copy of that hash is there already (the hash fixes the content)."""
    key = f"{TOKENIZERS_GROUP}/{meta['hash']}"
    if key in root:
        return
    data = np.frombuffer(tokenizer_json.encode("utf-8"), dtype=np.uint8)
    array = root.create_array(key, shape=data.shape, dtype="uint8",
                              chunks=(max(1, len(data)),))
    array[:] = data
    array.attrs.put({"name": meta.get("name", ""), "file": "tokenizer.json",
                     **{k: meta.get(k) for k in ("vocab_size", "bos", "bos_id", "eos",
                                                 "eos_id")}})


def read_tokenizer_copy(root: Any, hash_: str) -> str | None:
    """The ``tokenizer.json`` text stored for ``hash_``, or ``None`` when there is none."""
    try:
        node = root[f"{TOKENIZERS_GROUP}/{hash_}"]
    except KeyError:
        return None
    return bytes(np.asarray(node[:], dtype=np.uint8)).decode("utf-8")


def store_tokenizer(store: Any, domains: Sequence[str] | None = None) -> StoreTokenizer:
    """The tokenizer of ``store``'s ``domains`` (a ``ShardStore``; default: all). Domains
    prepared with different tokenizers are a ``DataError`` naming them."""
    names = list(domains) if domains is not None else sorted(store.domains)
    if not names:
        raise DataError(f"shard store {store.url!r} has no domains")
    metas = {name: store.info(name).tokenizer for name in names}
    hashes = {name: str(meta.get("hash", "")) for name, meta in metas.items()}
    if len(set(hashes.values())) > 1:
        raise DataError(f"shard store {store.url!r}: domains were prepared with different "
                        f"tokenizers: {json.dumps(hashes)}; re-run prepare on the odd ones "
                        "with the others' tokenizer, or pick domains of one tokenizer")
    meta = metas[names[0]]
    return StoreTokenizer(store=store.url, hash=hashes[names[0]], name=str(meta.get("name", "")),
                          vocab_size=meta.get("vocab_size"), bos_id=meta.get("bos_id"),
                          eos_id=meta.get("eos_id"),
                          json=store.tokenizer_json(hashes[names[0]]))


__all__ = ["TOKENIZERS_GROUP", "StoreTokenizer", "read_tokenizer_copy", "store_tokenizer",
           "write_tokenizer_copy"]
