"""The check before step 0 that everything turning token ids into embeddings or text agrees
with the tokenizer the store was prepared with (``store_tokenizer.py``).

A mismatch found later costs compute and reads badly: a probe encoding with another
tokenizer's 8,192 ids against a 4,096-row embedding dies at its first call, a hundred steps
in, with ``IndexError: index out of range in self``. So before the first step the datamodule
compares the model's vocabulary and special ids, the model's and datamodule's named
tokenizers and every probe's tokenizer with the store's, and a mismatch is one
``DataError`` line naming both sides and the fix.

:func:`run_tokenizer` is the rule a probe without a tokenizer of its own follows (the model's
named tokenizer, else the store's copy, else the bundled one), kept here so the check and
the probe cannot disagree on it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from lightning_aquila.datamodules.shard_format import DataError
from lightning_aquila.datamodules.store_tokenizer import StoreTokenizer


def _hashable(tokenizer: Any) -> bool:
    """A path or a ``tokenizers.Tokenizer``: what we can hash (an HF tokenizer object or a
    plain function is not ours to judge)."""
    from tokenizers import Tokenizer

    return isinstance(tokenizer, (str, os.PathLike, Tokenizer))


def _describe(tokenizer: Any) -> str:
    from lightning_aquila.tokenizer import DEFAULT_TOKENIZER, load_tokenizer, tokenizer_hash

    loaded = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    name = ("the bundled tokenizer" if isinstance(tokenizer, (str, os.PathLike))
            and os.path.abspath(tokenizer) == str(DEFAULT_TOKENIZER) else
            os.fspath(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else "a tokenizer")
    return f"{name} ({loaded.get_vocab_size():,} ids, hash {tokenizer_hash(loaded)[:8]})"


def _same(tokenizer: Any, record: StoreTokenizer) -> bool:
    from lightning_aquila.tokenizer import tokenizer_hash

    return tokenizer_hash(tokenizer) == record.hash


def run_tokenizer(module: Any, record: StoreTokenizer | None) -> Any:
    """The tokenizer a probe without one of its own encodes with: the model's ``tokenizer``
    when it names one, else the store's copy, else the bundled one."""
    named = getattr(module, "tokenizer", None)
    if named is not None:
        return named
    copy = record.load() if record is not None else None
    if copy is not None:
        return copy
    from lightning_aquila.tokenizer import DEFAULT_TOKENIZER

    return DEFAULT_TOKENIZER


def datamodule_tokenizer(trainer: Any) -> StoreTokenizer | None:
    """The tokenizer record of ``trainer``'s datamodule when it keeps one
    (``DomainDataModule.tokenizer_record``); none for any other datamodule, or no trainer."""
    record = getattr(getattr(trainer, "datamodule", None), "tokenizer_record", None)
    return record() if callable(record) else None


def probes_of(callbacks: Iterable[Any]) -> list[Any]:
    """Every probe of the trainer's callbacks (the monitor keeps them in ``probes``)."""
    return [probe for callback in callbacks for probe in getattr(callback, "probes", None) or []]


def references_of(callbacks: Iterable[Any]) -> list[tuple[str, str]]:
    """``(reference, tokenizer hash)`` of every mixture policy that reads a reference run
    whose tokenizer is recorded (DoReMi's ``ExcessLossMixture``)."""
    found = []
    for callback in callbacks:
        policy = getattr(callback, "policy", None)
        hash_ = getattr(policy, "reference_tokenizer", None)
        if hash_:
            found.append((os.fspath(policy.reference), hash_))
    return found


def check_run_tokenizer(record: StoreTokenizer, *, module: Any = None,
                        datamodule_tokenizer: Any = None, probes: Iterable[Any] = (),
                        references: Iterable[tuple[str, str]] = ()) -> None:
    """Raise a one-line ``DataError`` where the model, the datamodule's or model's named
    tokenizer, a probe, or a reference run (``(its metrics file, its tokenizer hash)``)
    disagrees with the store's tokenizer ``record``."""
    store = f"the store {record.store} was prepared with {record.describe()}"
    for label, tokenizer in (("the datamodule's tokenizer", datamodule_tokenizer),
                             ("the model's tokenizer", getattr(module, "tokenizer", None))):
        if tokenizer is not None and _hashable(tokenizer) and not _same(tokenizer, record):
            raise DataError(f"{label} is {_describe(tokenizer)}, but {store}; leave it unset "
                            "(the store's is used), or re-run prepare with it")
    config = getattr(module, "config", None)
    if config is not None:
        _check_model(config, record, store)
    for probe in probes:
        _check_probe(probe, module, record, store)
    for reference, hash_ in references:
        if hash_ != record.hash:
            raise DataError(f"the reference run {reference} trained with a tokenizer of hash "
                            f"{hash_[:8]}, but {store}: its losses are in another tokenizer's "
                            "units; train the reference run on this store")


def _check_model(config: Any, record: StoreTokenizer, store: str) -> None:
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and record.vocab_size is not None and vocab < record.vocab_size:
        raise DataError(f"the model's vocabulary has {vocab:,} ids, but {store}; leave "
                        "model.config.vocab_size unset (the store's is used) or set it to at "
                        f"least {record.vocab_size:,}")
    for field, ours in (("bos_token_id", record.bos_id), ("eos_token_id", record.eos_id)):
        theirs = getattr(config, field, None)
        if ours is not None and theirs is not None and theirs != ours:
            raise DataError(f"the model's {field} is {theirs}, but {store}, whose is {ours}; "
                            f"leave model.config.{field} unset (the store's is used)")


def _check_probe(probe: Any, module: Any, record: StoreTokenizer, store: str) -> None:
    name = f"probe {getattr(probe, 'name', type(probe).__name__)!r}"
    given = getattr(probe, "tokenizer", None)
    tokenizer = given if given is not None else run_tokenizer(module, record)
    if _hashable(tokenizer) and not _same(tokenizer, record):
        fix = ("drop the probe's tokenizer argument (the store's is used)" if given is not None
               else "re-run the store's prepare commands to record its tokenizer (this store "
                    "predates the copy), or give the probe tokenizer: PATH")
        raise DataError(f"{name} tokenizes with {_describe(tokenizer)}, but {store}; {fix}")
    bos = getattr(probe, "bos_token_id", None)
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if bos is not None and vocab is not None and not 0 <= bos < vocab:
        raise DataError(f"{name} has bos_token_id {bos}, outside the model's vocabulary of "
                        f"{vocab:,}; leave it unset (the model's is used)")


__all__ = ["check_run_tokenizer", "probes_of", "references_of", "run_tokenizer"]
