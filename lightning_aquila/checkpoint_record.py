"""Size + CRC32C records of checkpoints: written at save, checked before a resume.

A checkpoint can be damaged after it was written whole: a copy to or from scratch storage
that stopped early, a filesystem that lost a block, a flipped bit on a disk or in transit, a
shard of a sharded checkpoint deleted by a cleanup script. ``torch.load`` may load such a file
without complaint (a flipped bit inside a tensor), and a resume would then train on wrong
weights. So every checkpoint gets a record of its size and CRC32C, and a resume compares.

**Why CRC32C, not sha256.** The threat is accidental damage, not an adversary. CRC32C is
computed by one CPU instruction (SSE4.2, ARMv8 CRC), about ten times faster than sha256 on one
core, so it can run over every byte while ``torch.save`` writes and over every shard at resume
without adding minutes to a large checkpoint. It detects every burst error up to 32 bits and
any odd number of flipped bits, misses other random damage with probability 2⁻³², and the
size catches every truncation. (The shard store's chunks carry a CRC32C too, through zarr's
``Crc32cCodec``.)

**Single files** (``AtomicCheckpointIO``): the sidecar ``.<name>.crc32c.json`` beside the file
holds a list of records; the file is intact when its size and CRC32C equal one of them. A save:

1. streams the new bytes into the temporary sibling, computing size and CRC32C as they pass,
   and fsyncs it;
2. writes the sidecar (atomically) as ``[new] + the records of the old file that still could
   match it`` (those of its current size);
3. renames the temporary file onto the name (``os.replace``) and fsyncs the directory;
4. writes the sidecar again as ``[new]``.

Crash-window argument. A crash before 2 leaves the old file and the old sidecar, which
matched. Between 2 and 3 the old file is in place and its record is still in the sidecar;
between 3 and 4 the new file is in place and its record is first. After 4 only the new one
matches. So at every instant the file under the name matches the sidecar when it is intact:
an intact checkpoint never looks damaged. A file that was damaged after its write matches no
record at any instant (a damaged file that happened to equal another record's size and CRC32C
is the 2⁻³² case): a damaged checkpoint never looks intact. The file never exists without a
record, because the record is written before the rename. Step 2 keeps only records of the
old file's size, and step 4 resets the list, so it stays one or two records long (plus one
per save that crashed in the window of 2-3, until the next save completes).

**Sharded checkpoints** (directories of ``torch.distributed.checkpoint``): ``checksums.json``
inside the directory records every other file's size and CRC32C, written after all shards and
before the directory is renamed into place whole; the rename is the commit, so there is no
window. Each rank checksums the shards it wrote.

A checkpoint without a record (written before records existed, or by another
``CheckpointIO``) is "unverified": accepted, with a note.

**Object storage** (``checkpoint_remote``) keeps the same sidecar beside the object, with one
more field while an upload is under way (``Uploading``). The sidecar's format, the checksum of
a file and the comparison of a file with its records are written once, here, for any fsspec
filesystem (``verify_file``): local files and objects get the same answers and messages.
Kept free of torch/Lightning imports.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import google_crc32c
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from lightning_aquila.atomic import write_bytes_atomically

SIDECAR_SUFFIX = ".crc32c.json"
MANIFEST_NAME = "checksums.json"
#: The sidecar's field for an upload under way (object storage only).
UPLOADING = "uploading"
_CHUNK = 8 << 20
#: The local filesystem, through the same interface as an object store's.
LOCAL = LocalFileSystem()


@dataclass(frozen=True)
class Record:
    """A file's size in bytes and its CRC32C (Castagnoli)."""

    size: int
    crc32c: int

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "crc32c": f"{self.crc32c:08x}"}

    @classmethod
    def from_json(cls, value: Any) -> Record:
        return cls(int(value["size"]), int(value["crc32c"], 16))


class ChecksumWriter:
    """A binary handle that counts and checksums what is written through it (``torch.save``
    streams into it, so the record costs no second read)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle, self.size, self.crc = handle, 0, 0

    def write(self, data: Any) -> int:
        view = np.frombuffer(data, dtype=np.uint8)  # no copy; google_crc32c refuses memoryview
        self.crc = google_crc32c.extend(self.crc, view)
        self.size += view.size
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    @property
    def record(self) -> Record:
        return Record(self.size, self.crc)


def checksum_stream(handle: IO[bytes]) -> Record:
    """Size and CRC32C of what is left to read from a binary handle, read in 8 MiB chunks into
    one buffer (a local file, an fsspec object handle)."""
    crc, size = 0, 0
    buffer = bytearray(_CHUNK)
    view = np.frombuffer(buffer, dtype=np.uint8)
    while count := handle.readinto(buffer):
        crc = google_crc32c.extend(crc, view[:count])
        size += count
    return Record(size, crc)


def checksum_bytes(data: bytes) -> Record:
    return Record(len(data), google_crc32c.extend(0, np.frombuffer(data, dtype=np.uint8)))


def checksum_file(path: str | os.PathLike[str], fs: Any = None) -> Record:
    """Size and CRC32C of a file, local or (``fs``: an fsspec filesystem) on object storage,
    streamed: memory holds one chunk."""
    if fs is None:
        with open(path, "rb", buffering=0) as handle:
            return checksum_stream(handle)
    with fs.open(str(path), "rb", block_size=_CHUNK, cache_type="none") as handle:
        return checksum_stream(handle)


# -- single files: the sidecar ------------------------------------------------------------
def sidecar_name(name: str) -> str:
    """Hidden and without ``.ckpt``: no checkpoint glob and no ``last*`` lookup finds it."""
    return f".{name}{SIDECAR_SUFFIX}"


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    return path.with_name(sidecar_name(path.name))


@dataclass(frozen=True)
class Uploading:
    """The mark an object store's save keeps in the sidecar while its upload is under way
    (``checkpoint_remote``): when it began, and the record of the new version once its bytes
    are all sent (``None`` before)."""

    started: float
    record: Record | None = None


def encode_sidecar(records: list[Record], uploading: Uploading | None = None) -> bytes:
    data: dict[str, Any] = {"format": "crc32c-v1", "records": [r.to_json() for r in records]}
    if uploading is not None:
        data[UPLOADING] = {"started": uploading.started, "record": None
                           if uploading.record is None else uploading.record.to_json()}
    return json.dumps(data).encode()


def decode_sidecar(text: bytes | str, name: str) -> tuple[list[Record], Uploading | None]:
    """The records and the upload mark of a sidecar's text; ``ValueError`` naming the
    sidecar ``name`` when it cannot be read."""
    try:
        data = json.loads(text)
        records = [Record.from_json(r) for r in data["records"]]
        mark = data.get(UPLOADING)
        if mark is not None:
            mark = Uploading(float(mark["started"]), None if mark["record"] is None
                             else Record.from_json(mark["record"]))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(f"its record {name} is unreadable ({error})") from None
    return records, mark


def load_sidecar(fs: Any, path: str) -> tuple[list[Record] | None, Uploading | None]:
    """The records and upload mark of the file ``path``'s sidecar on the fsspec filesystem
    ``fs``; ``(None, None)`` without one. ``ValueError`` when it cannot be read."""
    sidecar = posixpath.join(posixpath.dirname(path), sidecar_name(posixpath.basename(path)))
    try:
        text = fs.cat_file(sidecar)
    except FileNotFoundError:
        return None, None
    return decode_sidecar(text, posixpath.basename(sidecar))


def read_sidecar(path: str | os.PathLike[str]) -> list[Record] | None:
    """The records of a local file's sidecar; ``None`` when it has none. Raises
    ``ValueError`` when the sidecar cannot be read."""
    return load_sidecar(LOCAL, str(Path(path).absolute()))[0]


def _write_sidecar(path: Path, records: list[Record], fsync: bool) -> None:
    write_bytes_atomically(sidecar_path(path), encode_sidecar(records), fsync=fsync)


def begin_record(path: str | os.PathLike[str], new: Record, *, fsync: bool = True) -> None:
    """Step 2 of a save: the new record first, and those of the file now in place kept."""
    path = Path(path)
    try:
        old = read_sidecar(path) or []
    except ValueError:
        old = []
    current = path.stat().st_size if path.is_file() else None
    _write_sidecar(path, [new, *(r for r in old if r.size == current and r != new)], fsync)


def commit_record(path: str | os.PathLike[str], new: Record, *, fsync: bool = True) -> None:
    """Step 4 of a save, after the rename: only the new record."""
    _write_sidecar(Path(path), [new], fsync)


def remove_record(path: str | os.PathLike[str]) -> None:
    sidecar_path(path).unlink(missing_ok=True)


# -- sharded directories: the manifest ------------------------------------------------------
def shard_names(directory: str | os.PathLike[str], rank: int) -> list[str]:
    """The files ``torch.distributed.checkpoint`` wrote for ``rank`` (``__<rank>_<n>.distcp``)."""
    pattern = re.compile(rf"__{rank}_\d+\.distcp")
    return sorted(p.name for p in Path(directory).iterdir() if pattern.fullmatch(p.name))


def checksum_files(directory: str | os.PathLike[str], names: Iterable[str]
                   ) -> dict[str, dict[str, Any]]:
    return {name: checksum_file(Path(directory) / name).to_json() for name in names}


def write_manifest(directory: str | os.PathLike[str], records: dict[str, dict[str, Any]],
                   *, fsync: bool = True) -> None:
    """Records ``records`` (name → record JSON), plus every file of ``directory`` not in
    them, checksummed here."""
    directory = Path(directory)
    rest = [p.name for p in directory.iterdir()
            if p.is_file() and p.name != MANIFEST_NAME and p.name not in records]
    files = {**records, **checksum_files(directory, rest)}
    text = json.dumps({"format": "crc32c-v1", "files": dict(sorted(files.items()))}, indent=1)
    write_bytes_atomically(directory / MANIFEST_NAME, text.encode(), fsync=fsync)


# -- verification ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Verdict:
    """``state``: ``"intact"``, ``"unverified"`` (no record) or ``"damaged"``; ``problem``
    says what is wrong, for the one-line message; ``note`` what a resume from an intact one
    should say (an object store's newer upload that did not complete)."""

    state: str
    problem: str = ""
    note: str = ""

    @property
    def usable(self) -> bool:
        return self.state != "damaged"


def verify(path: str | os.PathLike[str]) -> Verdict:
    """Compare a local checkpoint (file or sharded directory) with its record."""
    path = Path(path)
    if path.is_dir():
        return _verify_directory(path)
    if not path.is_file():
        return Verdict("damaged", "missing")
    return verify_file(LOCAL, str(path.absolute()))


def verify_file(fs: Any, path: str, actual: Record | None = None) -> Verdict:
    """Compare the single-file checkpoint ``path`` of the fsspec filesystem ``fs`` (local,
    or an object store) with its sidecar. ``actual``: the record of its bytes, when they
    were checksummed as they were read for another purpose (a download): ``path`` is then
    not read again."""
    if actual is None:
        fs.invalidate_cache(path)  # s3fs caches listings: another process may have written
        try:
            size = fs.info(path)["size"]
        except FileNotFoundError:
            return Verdict("damaged", "missing")
    else:
        size = actual.size
    try:
        records, uploading = load_sidecar(fs, path)
    except ValueError as error:
        return Verdict("damaged", str(error))
    if records is None:
        return Verdict("unverified", f"no size/checksum record "
                                     f"({sidecar_name(posixpath.basename(path))})")
    return compare(size, lambda: checksum_file(path, fs) if actual is None else actual,
                   records, uploading)


def compare(size: int, checksum: Callable[[], Record], records: list[Record],
            uploading: Uploading | None = None) -> Verdict:
    """A file of ``size`` bytes against its ``records``: damaged when no record has its
    size, or (``checksum()``, run only then, as it reads the whole file) its CRC32C; intact
    otherwise, with a note when an upload of a newer version was under way."""
    if size not in {r.size for r in records}:
        return Verdict("damaged", f"size {size} bytes, recorded "
                                  f"{' or '.join(str(r.size) for r in records)}")
    actual = checksum()
    if actual not in records:
        return Verdict("damaged", f"checksum mismatch: crc32c {actual.crc32c:08x}, recorded "
                                  f"{' or '.join(f'{r.crc32c:08x}' for r in records)}")
    if uploading is not None and actual != uploading.record:
        started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(uploading.started))
        return Verdict("intact", note=f"the upload of a newer version, begun {started}, did "
                                      "not complete; this is the version before it")
    return Verdict("intact")


def _verify_directory(path: Path) -> Verdict:
    manifest = path / MANIFEST_NAME
    if not manifest.is_file():
        return Verdict("unverified", f"no size/checksum record ({MANIFEST_NAME})")
    try:
        files = {name: Record.from_json(r)
                 for name, r in json.loads(manifest.read_text(encoding="utf-8"))["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        return Verdict("damaged", f"its record {MANIFEST_NAME} is unreadable ({error})")
    missing = sorted(name for name in files if not (path / name).is_file())
    if missing:
        return Verdict("damaged", f"missing shard {', '.join(missing)}")
    for name, record in sorted(files.items()):
        size = (path / name).stat().st_size
        if size != record.size:
            return Verdict("damaged", f"shard {name} is {size} bytes, recorded {record.size}")
    for name, record in sorted(files.items()):
        actual = checksum_file(path / name)
        if actual != record:
            return Verdict("damaged", f"shard {name}: checksum mismatch: crc32c "
                                      f"{actual.crc32c:08x}, recorded {record.crc32c:08x}")
    return Verdict("intact")


__all__ = ["MANIFEST_NAME", "SIDECAR_SUFFIX", "UPLOADING", "ChecksumWriter", "Record",
           "Uploading", "Verdict", "begin_record", "checksum_bytes", "checksum_file",
           "checksum_files", "commit_record", "encode_sidecar", "load_sidecar", "read_sidecar",
           "remove_record", "shard_names", "sidecar_name", "sidecar_path", "verify",
           "verify_file", "write_manifest"]
