"""The model's vocabulary from the data: ``vocab_size``, ``bos_token_id`` and
``eos_token_id`` of ``model.config`` follow the tokenizer the shard store records, unless the
config or a flag sets them.

Before, training on one's own tokenizer took four flags (``--model.tokenizer``, and the three
ids), and getting one wrong failed late. Now ``prepare --tokenizer tok`` then ``fit`` is the
whole recipe: the store is the one source of truth, and the check before step 0
(``datamodules/tokenizer_check.py``) catches any disagreement left.
"""

from __future__ import annotations

from typing import Any


def _domain_datamodule(class_path: str | None) -> bool:
    if not class_path:
        return False
    from jsonargparse._util import import_object

    from lightning_aquila.datamodules import DomainDataModule

    try:
        cls = import_object(class_path)
    except Exception:  # the parser resolved it already; a failure here means "not ours"
        return False
    return isinstance(cls, type) and issubclass(cls, DomainDataModule)


def fill_model_vocabulary(config: Any) -> dict[str, int]:
    """Set the unset vocabulary fields of ``config.model.config`` (a jsonargparse namespace
    of a trainer command) from the store of a ``DomainDataModule``; returns what it set. A
    model imported from Hugging Face (``init_from``) keeps its own, and a store that cannot
    be opened is left to the datamodule, whose error names it."""
    from lightning_aquila.datamodules.shard_format import DataError
    from lightning_aquila.datamodules.store import ShardStore
    from lightning_aquila.datamodules.store_tokenizer import store_tokenizer

    model, data = config.get("model"), config.get("data")
    if model is None or data is None or model.get("init_from"):
        return {}
    if not _domain_datamodule(data.get("class_path")):
        return {}
    args = data.get("init_args")
    store = args.get("store") if args is not None else None
    if store is None:
        return {}
    try:
        record = store_tokenizer(ShardStore(str(store), args.get("storage_options")),
                                 args.get("domains"))
    except DataError:
        return {}
    given = dict(model.get("config") or {})
    added = {k: v for k, v in record.model_config().items() if k not in given}
    if added:
        model.config = {**given, **added}
    return added


__all__ = ["fill_model_vocabulary"]
