"""Named document scores in a prepared store: attach (or replace) and remove one, atomically.

A score is a float32 column per segment, ``<split>/<segment>/scores/<key>``, listed in the
domain's attributes as ``scores: {name: {"key": key, ...}}`` (``shard_format.py``). The
attributes are the commit, as for ``prepare`` and ``remove-domain``: one metadata write,
which a local store makes by rename and an object store in one PUT.

- Attaching writes every column under a fresh key, then commits. A crash before the commit
  leaves arrays no attribute lists; readers never see them, and the next attach deletes them.
- Replacing is attaching under the same name: the old key's arrays are deleted after the
  commit, so a reader sees the old column or the new one, never a mix.
- Removing commits first (the name leaves the attributes), then deletes the arrays.

Every check (store, domain, name, lengths, values) runs before anything is written, and a
failure is one ``DataError`` line naming the store, domain, score and value. One writer per
domain at a time, as for ``prepare``: the commit is a read-modify-write of the attributes.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np
import zarr

from lightning_aquila.datamodules.shard_format import (
    OFFSETS_CHUNK,
    SPLITS,
    DataError,
    DomainInfo,
    check_score_name,
    codecs,
    zarr_store,
)
from lightning_aquila.datamodules.store import ShardStore


def attach_score(url: str, domain: str, name: str, values: Mapping[str, Any], *,
                 about: Mapping[str, Any] | None = None, replace_existing: bool = False,
                 storage_options: Mapping[str, Any] | None = None) -> DomainInfo:
    """Attach score ``name`` to every document of ``domain``: ``values[split]`` holds one
    value per document of that split, in stream order (``document_scores``'s order), NaN
    where a document has none. Both splits are scored (held-out loss per score quantile is
    reported), so each split with documents needs its values. An existing score of that
    name is a ``DataError`` unless ``replace_existing``. ``about`` is recorded beside the
    key (scorer, model, ...). Returns the domain's committed metadata."""
    store = ShardStore(url, storage_options)
    info = store.info(domain)
    where = f"{store.where(domain)}, score {name!r}"
    check_score_name(name)
    if name == "quality" and info.has_quality:
        raise DataError(f"{where}: 'quality' is the column `prepare --quality-field` wrote; "
                        "give the new score another name")
    if name in info.scores and not replace_existing:
        raise DataError(f"{where} exists; pass --replace to replace it or choose another name")
    columns = _checked_values(where, info, values)
    group = _domain_group(url, domain, storage_options)
    delete_unlisted_columns(group, info)
    key = f"{name}.{uuid.uuid4().hex[:12]}"
    write_columns(group, info, key, columns)
    old = info.scores.get(name)
    entry = {**dict(about or {}), "key": key,
             "attached": datetime.datetime.now(datetime.timezone.utc).isoformat(
                 timespec="seconds")}
    committed = _commit(group, where, info, {**info.scores, name: entry})
    if old is not None:
        _delete_columns(group, info, old["key"])
    return committed


def remove_score(url: str, domain: str, name: str, *,
                 storage_options: Mapping[str, Any] | None = None) -> DomainInfo:
    """Remove score ``name`` from ``domain``: the attributes stop listing it (the commit),
    then its arrays are deleted. An unknown name is a ``DataError`` naming the scores the
    domain has; the ``quality`` column of ``prepare`` is part of its segments and stays."""
    store = ShardStore(url, storage_options)
    info = store.info(domain)
    where = f"{store.where(domain)}, score {name!r}"
    if name not in info.scores:
        extra = (" ('quality' is prepare's column, part of the segments)"
                 if name == "quality" and info.has_quality else "")
        raise DataError(f"{store.where(domain)} has no attached score {name!r}; it has "
                        f"{sorted(info.scores) or 'none'}{extra}")
    group = _domain_group(url, domain, storage_options)
    committed = _commit(group, where, info,
                        {k: v for k, v in info.scores.items() if k != name})
    _delete_columns(group, info, info.scores[name]["key"])
    return committed


# -- steps (separate so that a test can stop between them, as a crash would) ----------------
def write_columns(group: zarr.Group, info: DomainInfo, key: str,
                  columns: Mapping[str, np.ndarray]) -> None:
    """Write ``columns[split]`` (float32, one value per document of the split) as
    ``scores/<key>`` of each segment; nothing is listed yet."""
    for split in SPLITS:
        start = 0
        for seg in info.segments.get(split, ()):
            part = columns[split][start:start + seg.documents]
            start += seg.documents
            array = group[split][seg.id].require_group("scores").create_array(
                key, shape=(seg.documents,), chunks=(OFFSETS_CHUNK,), dtype="float32",
                compressors=codecs(), config={"write_empty_chunks": True})
            array[:] = part


def delete_unlisted_columns(group: zarr.Group, info: DomainInfo) -> None:
    """Delete score arrays the attributes do not list: left by an attach that crashed
    before its commit, or by a replace or remove that crashed after it."""
    listed = {about["key"] for about in info.scores.values()}
    for split, seg in _segments(info):
        scores = _scores_group(group, split, seg)
        if scores is not None:
            for key in sorted(set(scores.array_keys()) - listed):
                del scores[key]


def _delete_columns(group: zarr.Group, info: DomainInfo, key: str) -> None:
    for split, seg in _segments(info):
        scores = _scores_group(group, split, seg)
        if scores is not None and key in scores:
            del scores[key]


def _commit(group: zarr.Group, where: str, info: DomainInfo,
            scores: dict[str, dict[str, Any]]) -> DomainInfo:
    """Rewrite the domain's attributes with ``scores``: the one write that makes the
    change visible. The segments must be those the columns were written for."""
    now = DomainInfo.from_attrs(where, group.attrs.asdict())
    if now.segments != info.segments:
        raise DataError(f"{where}: the domain changed while the score was written (a "
                        "`prepare` ran?); nothing was attached, run the scorer again")
    committed = replace(now, scores=scores)
    group.attrs.put(committed.to_attrs())
    return committed


# -- helpers --------------------------------------------------------------------------------
def _checked_values(where: str, info: DomainInfo,
                    values: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One float32 column per split, checked: every split with documents given, lengths
    equal to the split's documents, every value finite or NaN."""
    unknown = sorted(set(values) - set(SPLITS))
    if unknown:
        raise DataError(f"{where}: unknown split(s) {unknown}; splits are {list(SPLITS)}")
    columns = {}
    for split in SPLITS:
        documents = info.documents(split)
        if split not in values:
            if documents:
                raise DataError(f"{where}: no values for split {split!r} ({documents:,} "
                                "documents); both splits are scored")
            columns[split] = np.zeros(0, dtype=np.float32)
            continue
        try:
            column = np.asarray(values[split], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{where}: split {split!r} values are not numbers ({exc})") from None
        if column.ndim != 1 or len(column) != documents:
            raise DataError(f"{where}: split {split!r} has {documents:,} documents but "
                            f"{column.shape} values were given")
        bad = np.flatnonzero(np.isinf(column) | (np.abs(column) > np.finfo(np.float32).max))
        if len(bad):
            raise DataError(f"{where}: split {split!r} document {int(bad[0])} has value "
                            f"{float(column[bad[0]])}; a score is finite, or NaN for none")
        columns[split] = column.astype(np.float32)
    return columns


def _domain_group(url: str, domain: str,
                  storage_options: Mapping[str, Any] | None) -> zarr.Group:
    root = zarr.open_group(zarr_store(url, read_only=False, storage_options=storage_options),
                           mode="r+")
    return root[domain]


def _segments(info: DomainInfo) -> list[tuple[str, Any]]:
    return [(split, seg) for split in SPLITS for seg in info.segments.get(split, ())]


def _scores_group(group: zarr.Group, split: str, seg: Any) -> zarr.Group | None:
    try:
        node = group[f"{split}/{seg.id}/scores"]
    except KeyError:
        return None
    return node if isinstance(node, zarr.Group) else None


__all__ = ["attach_score", "delete_unlisted_columns", "remove_score", "write_columns"]
