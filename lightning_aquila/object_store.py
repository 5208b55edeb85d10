"""Object-store URLs (``s3://``, ``gs://``, any fsspec protocol) beside local paths.

A run whose ``trainer.default_root_dir`` is ``s3://bucket/run`` keeps its checkpoints,
``config.yaml`` and TSM run files under that URL. ``pathlib`` cannot hold such a URL
(``Path("s3://b/r")`` is the local path ``s3:/b/r``), so the code that places a run's files
asks here whether a location is remote and joins it as text. Filesystems come from
``fsspec.core.url_to_fs(url)`` without options, as Lightning's own ``get_filesystem``: the
credentials and the endpoint are the environment's (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3``, a profile, an instance role), so
``ModelCheckpoint``, the checkpoint plugin and the run files reach the same store. Kept free of
torch/Lightning imports.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any


def is_remote(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a URL of another filesystem than the local one."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...``: a URL stays a URL, a local path a local path."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` and the path within it."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def mtime_ns(info: dict[str, Any]) -> int:
    """The modification time of a listing entry (S3: ``LastModified``, to the second)."""
    for key in ("LastModified", "mtime", "updated", "created"):
        value = info.get(key)
        if isinstance(value, datetime):
            return int(value.timestamp() * 1e9)
        if isinstance(value, (int, float)):
            return int(value * 1e9)
        if isinstance(value, str):
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
    return 0


def listing(directory: str) -> list[tuple[str, int]]:
    """The files directly in the folder ``directory`` (a URL) as ``(url, mtime_ns)``; none
    when it does not exist. Read fresh (fsspec's listing cache would hide what another
    process wrote)."""
    fs, path = filesystem(directory)
    try:
        entries = fs.ls(path, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return [(fs.unstrip_protocol(e["name"]), mtime_ns(e)) for e in entries
            if e.get("type") == "file"]


def abort_incomplete_uploads(fs: Any, path: str) -> int:
    """Abort the multipart uploads of the key ``path`` that a killed writer left (S3 keeps
    and bills their parts until then); returns how many. A no-op on other stores."""
    if not hasattr(fs, "call_s3"):
        return 0
    bucket, key, _ = fs.split_path(path)
    found = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix=key)
    uploads = [u for u in found.get("Uploads", []) if u.get("Key") == key]
    for upload in uploads:
        fs.call_s3("abort_multipart_upload", Bucket=bucket, Key=key,
                   UploadId=upload["UploadId"])
    return len(uploads)


def local_copy(url: str) -> Path:
    """A local folder that stands for the remote folder ``url`` (files that are appended to,
    which object stores cannot do, are written here and uploaded whole):
    ``$XDG_CACHE_HOME/lightning-aquila/runs/<protocol>/<bucket>/<path>``, default
    ``~/.cache``."""
    protocol, rest = str(url).split("://", 1)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    parts = [p for p in rest.split("/") if p not in ("", ".", "..")]
    return cache.joinpath("lightning-aquila", "runs", protocol, *parts)


__all__ = ["abort_incomplete_uploads", "filesystem", "is_remote", "join", "listing",
           "local_copy", "mtime_ns", "name", "parent"]
