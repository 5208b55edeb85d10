"""Single-file checkpoints on object storage (``s3://`` and other fsspec URLs): whole and
verified, or the previous version, said in one line.

An object store has no rename, but one PUT, or the completion of one multipart upload,
replaces an object at once: a reader gets the old object or the new one, never a mix (S3 and
its compatibles since 2020, GCS, Azure block blobs). That completion plays the part of the
local ``os.replace``, and the same size + CRC32C sidecar as for local files
(``checkpoint_record``, ``.<name>.crc32c.json`` beside the object) is written around it,
plus a mark that an upload is under way. A save of ``<dir>/<name>`` (``AtomicCheckpointIO``):

1. aborts leftover multipart uploads of the key (a writer killed earlier), and writes the
   sidecar as the records of the object now in place (those of its size), marked
   ``uploading`` (when, no record yet);
2. streams ``torch.save`` into a multipart upload of ``part_size`` parts, computing size and
   CRC32C as the bytes pass; nothing of it is visible yet;
3. writes the sidecar as ``[new] + the old records``, still ``uploading``, naming the new one;
4. completes the upload: the one step that changes the object;
5. writes the sidecar as ``[new]``.

Crash windows. Before 4 the old object is in place, its record is in the sidecar, and the mark
says that a newer version was being uploaded: a resume loads the old object and says so in
one line. Between 4 and 5 the object is the one the mark names: intact, nothing to say. After 5
there is no mark. An object that matches no record is damaged (a store whose uploads are not
atomic and show half an object, a later bit flip, a copy that stopped early): never loaded; a
resume falls back to the newest intact checkpoint beside it (``checkpoint_check``). A failure
inside 2 aborts the upload, so the object stays as it was. Every step is one PUT, so the
sidecar itself is always whole. One writer per key at a time, as for local files.

The sidecar's format, the checksum and the comparison of an object with its records are
``checkpoint_record``'s, through the object store's fsspec filesystem. Kept free of
torch/Lightning imports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Any

from lightning_aquila import object_store
from lightning_aquila.checkpoint_record import (
    UPLOADING,
    ChecksumWriter,
    Record,
    Uploading,
    Verdict,
    checksum_bytes,
    encode_sidecar,
    load_sidecar,
    sidecar_name,
    verify_file,
)

_CHUNK = 8 << 20


def sidecar_url(url: str) -> str:
    """``<dir>/.<name>.crc32c.json``: hidden, without ``.ckpt``, as for local files."""
    return object_store.join(object_store.parent(url), sidecar_name(object_store.name(url)))


def read_sidecar(url: str) -> tuple[list[Record] | None, Uploading | None]:
    """The records of ``url``'s sidecar (``None`` without one) and its ``uploading`` mark.
    Raises ``ValueError`` when the sidecar cannot be read."""
    fs, path = object_store.filesystem(url)
    return load_sidecar(fs, path)


def write_sidecar(url: str, records: list[Record], mark: Uploading | None = None) -> None:
    """One PUT of the whole sidecar."""
    fs, path = object_store.filesystem(sidecar_url(url))
    fs.pipe_file(path, encode_sidecar(records, mark))


def remove_sidecar(url: str) -> None:
    fs, path = object_store.filesystem(sidecar_url(url))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


class RemoteSave:
    """Steps 1-5 of the module docstring around ``write(handle)``::

        with RemoteSave(url, part_size) as save:  # 1
            torch.save(checkpoint, save.writer)   # 2
                                                  # 3, 4, 5 on the way out

    An exception inside, or in steps 3 and 4, aborts the upload and leaves the object as it
    was."""

    def __init__(self, url: str, part_size: int) -> None:
        self.url, self.part_size = url, part_size
        self.fs, self.path = object_store.filesystem(url)
        self.writer: ChecksumWriter | None = None
        self._handle: Any = None

    def __enter__(self) -> RemoteSave:
        object_store.abort_incomplete_uploads(self.fs, self.path)
        try:
            old, _ = read_sidecar(self.url)
        except ValueError:
            old = None
        try:
            current = self.fs.info(self.path)["size"]
        except FileNotFoundError:
            current = None
        self.kept = [r for r in old or [] if r.size == current]
        self.mark = Uploading(started=time.time())
        write_sidecar(self.url, self.kept, self.mark)  # 1
        self._handle = self.fs.open(self.path, "wb", block_size=self.part_size)
        self.writer = ChecksumWriter(self._handle)
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if kind is not None:
            _discard(self._handle)
            return
        self.ready()
        self.complete()
        self.commit()

    def ready(self) -> None:
        """Step 3: the new record first, the old ones kept, still marked."""
        try:
            self.mark = dataclasses.replace(self.mark, record=self.writer.record)
            write_sidecar(self.url, [self.writer.record,
                                     *(r for r in self.kept if r != self.writer.record)],
                          self.mark)
        except BaseException:
            _discard(self._handle)
            raise

    def complete(self) -> None:
        """Step 4: the upload completes; the object is replaced at once."""
        try:
            self._handle.close()
        except BaseException:
            _discard(self._handle)
            raise

    def commit(self) -> None:
        """Step 5: only the new record."""
        write_sidecar(self.url, [self.writer.record])


def _discard(handle: Any) -> None:
    """Abort an upload: a buffered fsspec file would otherwise complete it when closed (or
    garbage-collected), publishing a partial object."""
    if handle is None:
        return
    discard = getattr(handle, "discard", None)
    if callable(discard):
        discard()
    handle.closed = True


# -- verification ---------------------------------------------------------------------------
def exists(url: str) -> bool:
    fs, path = object_store.filesystem(url)
    try:
        return fs.info(path).get("type") == "file"
    except FileNotFoundError:
        return False


def verify(url: str, data: bytes | None = None) -> Verdict:
    """Compare the object ``url`` (or ``data``, its bytes as read) with its sidecar."""
    fs, path = object_store.filesystem(url)
    return verify_file(fs, path, None if data is None else checksum_bytes(data))


# -- one download for the check and the load -------------------------------------------------
@dataclass
class Download:
    """A local copy of an object, checksummed as its bytes arrived, and the verdict on those
    bytes: the bytes a resume checks are the bytes it loads."""

    url: str
    #: size, ETag and time of the object when it was downloaded
    identity: tuple[Any, ...]
    #: a temporary file without a name: its space is freed when it is closed, or when the
    #: process ends however it ends
    file: IO[bytes]
    verdict: Verdict


_download: Download | None = None


def fetch(url: str) -> Download:
    """The object ``url`` downloaded once and compared with its sidecar.

    A resume checks the checkpoint before the trainer is built (``checkpoint_check``) and
    loads it inside ``trainer.fit`` (``AtomicCheckpointIO.load_checkpoint``); both ask here,
    and while the object is unchanged (one ``HEAD``: the same size, ETag and time) the second
    gets the copy the first downloaded. One copy is kept (the last fetched) in the run's
    local folder (``object_store.local_copy``), not in memory: a checkpoint may be larger
    than what the host can spare while the model is built. ``FileNotFoundError`` without
    the object."""
    global _download
    fs, path = object_store.filesystem(url)
    fs.invalidate_cache(path)  # s3fs caches listings: another process may have written
    info = fs.info(path)
    identity = (info.get("size"), info.get("ETag"), object_store.mtime_ns(info))
    if _download is not None and (_download.url, _download.identity) == (url, identity):
        return _download
    release()
    folder = object_store.local_copy(object_store.parent(url))
    folder.mkdir(parents=True, exist_ok=True)
    file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115  (kept open for the load)
    try:
        writer = ChecksumWriter(file)
        with fs.open(path, "rb", block_size=_CHUNK, cache_type="none") as source:
            shutil.copyfileobj(source, writer, _CHUNK)
        file.flush()
        verdict = verify_file(fs, path, writer.record)
    except BaseException:
        file.close()
        raise
    _download = Download(url, identity, file, verdict)
    return _download


def release() -> None:
    """Close the kept copy (a load is done with it)."""
    global _download
    if _download is not None:
        _download.file.close()
        _download = None


__all__ = ["UPLOADING", "Download", "RemoteSave", "exists", "fetch", "read_sidecar", "release",
           "remove_sidecar", "sidecar_url", "verify", "write_sidecar"]
