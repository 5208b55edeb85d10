"""``AtomicCheckpointIO``: checkpoint files that are complete under their name, or absent.

Lightning's ``TorchCheckpointIO`` (2.6) serialises to memory and writes through an fsspec
transaction: the bytes go to a file made by ``tempfile.mkstemp()`` in the system temporary
directory, which is then moved onto the target. When that directory is on another filesystem
than the checkpoints (the usual case on clusters: ``/tmp`` is node-local) the move is a copy
into the target path, so a kill during it leaves a truncated ``.ckpt``; a kill before it leaves
a checkpoint-sized file in ``/tmp``; nothing is fsynced; and the whole checkpoint is held in
memory twice. This plugin writes the checkpoint straight into a temporary file next to the
target, fsyncs it, renames it into place and fsyncs the directory (see
:mod:`lightning_aquila.atomic`). On the way it records the file's size and CRC32C in a
sidecar, and it refuses to load a file that does not match its record
(:mod:`lightning_aquila.checkpoint_record`).

``lightning-aquila fit`` installs it by default (unless the configuration names another
``CheckpointIO``), and ``AquilaParallelStrategy`` uses it when given none. On object storage
(``s3://`` and other fsspec URLs) there is no rename: ``torch.save`` streams into a multipart
upload, whose completion replaces the object at once, and the same record is written around
it with a mark that an upload is under way (:mod:`lightning_aquila.checkpoint_remote`).
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from lightning_aquila import checkpoint_remote, object_store
from lightning_aquila.atomic import atomic_file
from lightning_aquila.checkpoint_check import ensure_loadable
from lightning_aquila.checkpoint_record import (
    ChecksumWriter,
    begin_record,
    commit_record,
    remove_record,
)

#: S3 refuses parts below 5 MiB (except the last one).
MIN_PART_SIZE = 5 << 20


def is_local_path(path: _PATH) -> bool:
    return not object_store.is_remote(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a temporary sibling, fsync, ``os.replace``, fsync the directory;
    on object storage a multipart upload between records (``checkpoint_remote``).

    Args:
        fsync: flush file and directory to stable storage before and after the rename. Turn
            it off only where a power loss cannot matter (the rename is atomic either way).
        part_size: bytes per part of an upload to object storage (at least 5 MiB; default
            8 MiB, as the AWS CLI). Memory holds one part, not the whole checkpoint.
    """

    def __init__(self, fsync: bool = True, part_size: int = 8 << 20) -> None:
        super().__init__()
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"AtomicCheckpointIO(part_size={part_size}): object stores take "
                             f"parts of at least {MIN_PART_SIZE} bytes (5 MiB)")
        self.fsync, self.part_size = fsync, part_size

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH,
                        storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(
                f"AtomicCheckpointIO.save_checkpoint(storage_options={storage_options!r}): "
                "storage options are not supported; configure a CheckpointIO that uses them"
            )
        if not is_local_path(path):
            with checkpoint_remote.RemoteSave(str(path), self.part_size) as save:
                torch.save(checkpoint, save.writer)
            return
        target = str(path).removeprefix("file://")
        writer: ChecksumWriter | None = None

        def record_before_rename() -> None:  # see checkpoint_record: steps 2 and 4
            begin_record(target, writer.record, fsync=self.fsync)

        with atomic_file(target, "wb", fsync=self.fsync,
                         before_replace=record_before_rename) as handle:
            writer = ChecksumWriter(handle)
            torch.save(checkpoint, writer)
        commit_record(target, writer.record, fsync=self.fsync)

    def load_checkpoint(self, path: _PATH, map_location: Any = "cpu",
                        weights_only: bool | None = None) -> dict[str, Any]:
        """As ``TorchCheckpointIO``'s, with the storages mapped to ``"cpu"`` by name rather
        than by Lightning's identity function: the same placement for plain tensors, and the
        only one that tensor subclasses in optimizer state (torchao's 8-bit AdamW moments)
        can be rebuilt with. A file that does not match its size/checksum record is refused
        (``ValueError``), never loaded; on object storage the bytes loaded are the ones
        checked: the copy that the resume's check downloaded, when the object has not
        changed since (``checkpoint_remote.fetch``), else a new one."""
        if not is_local_path(path):
            download = checkpoint_remote.fetch(str(path))
            try:
                if not download.verdict.usable:
                    raise ValueError(f"checkpoint {path} is damaged "
                                     f"({download.verdict.problem}); not loading it")
                download.file.seek(0)
                return pl_load(download.file, map_location=map_location,
                               weights_only=weights_only)
            finally:
                checkpoint_remote.release()
        ensure_loadable(str(path).removeprefix("file://"))
        return super().load_checkpoint(path, map_location=map_location,
                                       weights_only=weights_only)

    def remove_checkpoint(self, path: _PATH) -> None:
        """The file, then its record (a crash between leaves a record without a file, which
        nothing reads; the other order could leave a file without its record)."""
        super().remove_checkpoint(path)
        if is_local_path(path):
            remove_record(str(path).removeprefix("file://"))
        else:
            checkpoint_remote.remove_sidecar(str(path))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fsync={self.fsync}, part_size={self.part_size})"


__all__ = ["AtomicCheckpointIO", "is_local_path"]
