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

Kept free of torch/Lightning imports.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from typing import Any

import google_crc32c
import numpy as np

from lightning_aquila import object_store
from lightning_aquila.checkpoint_record import SIDECAR_SUFFIX, ChecksumWriter, Record, Verdict

_CHUNK = 8 << 20
UPLOADING = "uploading"


def sidecar_url(url: str) -> str:
    """``<dir>/.<name>.crc32c.json``: hidden, without ``.ckpt``, as for local files."""
    return object_store.join(object_store.parent(url),
                             f".{object_store.name(url)}{SIDECAR_SUFFIX}")


def read_sidecar(url: str) -> tuple[list[Record] | None, dict[str, Any] | None]:
    """The records of ``url``'s sidecar (``None`` without one) and its ``uploading`` mark.
    Raises ``ValueError`` when the sidecar cannot be read."""
    fs, path = object_store.filesystem(sidecar_url(url))
    try:
        text = fs.cat_file(path).decode("utf-8")
    except FileNotFoundError:
        return None, None
    try:
        data = json.loads(text)
        records = [Record.from_json(r) for r in data["records"]]
        mark = data.get(UPLOADING)
        if mark is not None:
            mark = {"started": float(mark["started"]),
                    "record": None if mark["record"] is None else Record.from_json(mark["record"])}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"its record {object_store.name(sidecar_url(url))} is unreadable "
                         f"({error})") from None
    return records, mark


def write_sidecar(url: str, records: list[Record], mark: dict[str, Any] | None = None) -> None:
    """One PUT of the whole sidecar."""
    data: dict[str, Any] = {"format": "crc32c-v1", "records": [r.to_json() for r in records]}
    if mark is not None:
        data[UPLOADING] = {"started": mark["started"], "record": None if mark["record"] is None
                           else mark["record"].to_json()}
    fs, path = object_store.filesystem(sidecar_url(url))
    fs.pipe_file(path, json.dumps(data).encode())


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
        self.mark = {"started": time.time(), "record": None}
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
            self.mark = {**self.mark, "record": self.writer.record}
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
    """Compare the object ``url`` (or ``data``, its bytes as loaded) with its sidecar."""
    fs, path = object_store.filesystem(url)
    try:
        records, mark = read_sidecar(url)
    except ValueError as error:
        return Verdict("damaged", str(error))
    if data is None:
        try:
            fs.invalidate_cache(path)  # s3fs caches listings: another process may have written
            size = fs.info(path)["size"]
        except FileNotFoundError:
            return Verdict("damaged", "missing")
    else:
        size = len(data)
    if records is None:
        return Verdict("unverified", f"no size/checksum record "
                                     f"({object_store.name(sidecar_url(url))})")
    if size not in {r.size for r in records}:
        return Verdict("damaged", f"size {size} bytes, recorded "
                                  f"{' or '.join(str(r.size) for r in records)}")
    actual = _checksum(fs, path) if data is None else Record(
        len(data), google_crc32c.extend(0, np.frombuffer(data, dtype=np.uint8)))
    if actual not in records:
        return Verdict("damaged", f"checksum mismatch: crc32c {actual.crc32c:08x}, recorded "
                                  f"{' or '.join(f'{r.crc32c:08x}' for r in records)}")
    if mark is not None and actual != mark["record"]:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(mark["started"]))
        return Verdict("intact", note=f"the upload of a newer version, begun {started}, did "
                                      "not complete; this is the version before it")
    return Verdict("intact")


def _checksum(fs: Any, path: str) -> Record:
    crc, size = 0, 0
    with fs.open(path, "rb", block_size=_CHUNK, cache_type="none") as handle:
        while chunk := handle.read(_CHUNK):
            crc = google_crc32c.extend(crc, np.frombuffer(chunk, dtype=np.uint8))
            size += len(chunk)
    return Record(size, crc)


def newest(directories: list[str], pattern: Any) -> tuple[int, str] | None:
    """The newest checkpoint object whose name (without ``.ckpt``) ``pattern`` matches, as
    ``(mtime_ns, url)``."""
    found = [(mtime, url) for d in directories for url, mtime in object_store.listing(d)
             if url.endswith(".ckpt") and pattern.match(object_store.name(url)[:-5])]
    return max(found, key=lambda item: item[0], default=None)


def candidates(directory: str, exclude: str) -> list[str]:
    """The other checkpoint objects of ``directory``, newest first (S3 times its objects to
    the second, so ties go by the numbers in their names: ``step=12`` after ``step=9``)."""
    found = [(mtime, url) for url, mtime in object_store.listing(directory)
             if url.endswith(".ckpt") and not object_store.name(url).startswith(".")
             and url != exclude]
    return [url for _, url in sorted(found, key=lambda item: (item[0], _natural(item[1])),
                                     reverse=True)]


def _natural(text: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part
                 for part in re.split(r"(\d+)", object_store.name(text)))


__all__ = ["UPLOADING", "RemoteSave", "candidates", "exists", "newest", "read_sidecar",
           "remove_sidecar", "sidecar_url", "verify", "write_sidecar"]
