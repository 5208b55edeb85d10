"""``AtomicCheckpointIO``: checkpoint files that are complete under their name, or absent.

Lightning's ``TorchCheckpointIO`` (2.6) serialises to memory and writes through an fsspec
transaction: the bytes go to a file made by ``tempfile.mkstemp()`` in the system temporary
directory, which is then moved onto the target. When that directory is on another filesystem
than the checkpoints (the usual case on clusters: ``/tmp`` is node-local) the move is a copy
into the target path, so a kill during it leaves a truncated ``.ckpt``; a kill before it leaves
a checkpoint-sized file in ``/tmp``; nothing is fsynced; and the whole checkpoint is held in
memory twice. This plugin writes the checkpoint straight into a temporary file next to the
target, fsyncs it, renames it into place and fsyncs the directory (see
:mod:`lightning_aquila.atomic`).

``lightning-aquila fit`` installs it by default (unless the configuration names another
``CheckpointIO``), and ``AquilaParallelStrategy`` uses it when given none. Remote URLs
(``s3://`` and the like) keep Lightning's path, where one PUT is atomic by itself.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_aquila.atomic import atomic_file


def is_local_path(path: _PATH) -> bool:
    text = str(path)
    return "://" not in text or text.startswith("file://")


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary sibling, fsync, ``os.replace``, fsync the directory.

    Args:
        fsync: flush file and directory to stable storage before and after the rename. Turn
            it off only where a power loss cannot matter (the rename is atomic either way).
    """

    def __init__(self, fsync: bool = True) -> None:
        super().__init__()
        self.fsync = fsync

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint(storage_options={storage_options!r}): "
                "storage options are not supported; configure a CheckpointIO that uses them"
            )
        if not is_local_path(path):
            super().save_checkpoint(checkpoint, path)
            return
        target = str(path).removeprefix("file://")
        with atomic_file(target, "wb", fsync=self.fsync) as handle:
            torch.save(checkpoint, handle)

    def load_checkpoint(self, path: _PATH, map_location: Any = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        """As ``TorchCheckpointIO``'s, with the storages mapped to ``"cpu"`` by name rather
        than by Lightning's identity function: the same placement for plain tensors, and the
        only one that tensor subclasses in optimizer state (torchao's 8-bit AdamW moments)
        can be rebuilt with."""
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=weights_only)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fsync={self.fsync})"


__all__ = ["AtomicCheckpointIO", "is_local_path"]
