"""``lightning-aquila remove-domain``: take a domain out of a shard store.

The manifest's domain list is the store's table of contents: readers open only the domains
it names. Removing a domain is therefore one metadata write (the root group's attributes,
which a local store writes by rename and an object store in one PUT): before it the domain is
fully there, after it the domain is gone for every new reader. Only then are its files
deleted; a crash in between leaves an unlisted group that no reader sees and that the next
``prepare`` of that name clears.

A run training from the store keeps the domain list it started with. If the domain's files
are deleted under it, its next read of that domain fails naming the missing chunk; resuming
from its last checkpoint then continues without the domain (the remaining domains keep their
cursors, see docs/data.md). ``--keep-data`` unlists the domain but leaves its files, so a run
reading it now goes on undisturbed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import zarr

from lightning_aquila.datamodules.shard_format import (
    MANIFEST_KEY,
    checked_manifest,
    zarr_store,
)
from lightning_aquila.datamodules.store import ShardStore


def remove_domain(url: str, domain: str, *, keep_data: bool = False,
                  storage_options: Mapping[str, Any] | None = None) -> None:
    """Unlist ``domain`` from the store's manifest (atomically), then delete its files
    unless ``keep_data``. A domain the store does not list is a ``DataError`` naming the
    domains it has; the store is then unchanged.

    Args:
        url: store path or URL
        domain: the domain to remove
        keep_data: only unlist the domain; leave its files for runs reading them
        storage_options: fsspec options for a remote store (JSON on the command line)
    """
    ShardStore(url, storage_options).info(domain)  # opens and checks the store; names domains
    root = zarr.open_group(zarr_store(url, read_only=False, storage_options=storage_options),
                           mode="r+")
    manifest = checked_manifest(url, root.attrs[MANIFEST_KEY], "writes")
    manifest["domains"] = [name for name in manifest["domains"] if name != domain]
    root.attrs[MANIFEST_KEY] = manifest  # the commit
    if not keep_data and domain in root:
        del root[domain]

