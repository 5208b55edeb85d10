"""The shard store's on-disk format, shared by its reader (``store.py``) and its writer
(``writer.py``): names and constants, the metadata records (``Segment``, ``DomainInfo``),
the manifest check, the compression, and the URL-to-zarr-store rule.

Layout (the full description is ``docs/data-format.md``)::

    STORE/zarr.json                    root group; attrs["lightning_aquila"] is the manifest
    STORE/<domain>/zarr.json           domain group; its attrs are the domain's committed state
    STORE/<domain>/<split>/<segment>/  one immutable segment per ``prepare`` run and split
        tokens   uint32 [tokens]       documents' token ids, eos after each document
        offsets  int64  [documents+1]  where each document starts inside the segment
        quality  float32 [documents]   optional score per document (NaN where unknown)
        part     uint8 [documents]     held-out segments: 0 dev, 1 test, 255 unassigned
                                       (written since the dev/test split; older segments
                                       lack it; readers assign 255 and missing ones by hash)
        scores/<key>  float32 [documents]  a named document score (attached after prepare)

Named scores (``fasttext_hq``, ``ppl``, ...) are per-document columns attached to a prepared
store without re-tokenizing. The domain's attributes list them, ``scores: {name: {"key": key,
...}}``; the column of a segment is ``<split>/<segment>/scores/<key>``, NaN where a document
has no score. A segment without that array (written by a later ``prepare``) reads as all NaN.
Attaching or replacing writes every array under a fresh key, then commits by rewriting the
domain's attributes; removing commits first and deletes after. The ``quality`` array written
by ``prepare --quality-field`` reads as the score named ``quality``.

Segments exist so that nothing committed is ever rewritten: a ``prepare`` run writes new
segments, then commits them by rewriting the domain's attributes (one metadata object, which
zarr's local store writes by rename and object stores write in one PUT). A crash before that
leaves segments no attribute lists; readers never see them and the next writer deletes them.

A format change starts here; the reader and the writer follow from what this file says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.storage import FsspecStore, LocalStore

from lightning_aquila.object_store import is_remote

FORMAT_NAME = "lightning-aquila-shards"
FORMAT_VERSION = 1
MANIFEST_KEY = "lightning_aquila"
SPLITS = ("train", "heldout")
#: 256 Ki tokens = 1 MiB per decompressed chunk: large enough that decompression runs at
#: >100 M tokens/s, small enough that the loader's chunk cache holds a few per domain.
#: A held-out document's ``part`` when its writer gave none (readers assign it by hash).
UNASSIGNED_PART = 255
DEFAULT_CHUNK_TOKENS = 1 << 18
OFFSETS_CHUNK = 1 << 16
SCORE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class DataError(ValueError):
    """Bad data or a bad data request; the message names the store, domain, file or value."""


def codecs() -> list[Any]:
    """Compression for token arrays: byte-shuffled zstd (small ids leave high bytes empty),
    then a CRC32C so that a corrupt chunk fails loudly instead of decoding into wrong ids."""
    return [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()]


def check_domain_name(name: str) -> str:
    if not isinstance(name, str) or not _DOMAIN_NAME.match(name) or name in SPLITS:
        raise DataError(
            f"invalid domain name {name!r}: use letters, digits, '_', '-', '.' "
            f"(at most 128 characters, not {SPLITS})"
        )
    return name


def zarr_store(url: str, *, read_only: bool, storage_options: Mapping[str, Any] | None = None):
    """The zarr store behind a URL: a local path or ``file://`` URL becomes a ``LocalStore``
    (atomic writes by rename, which the commit relies on); anything else (``memory://``,
    ``s3://``, ``gs://``, ...) goes through fsspec."""
    url = str(url)
    if not is_remote(url):
        return LocalStore(url.removeprefix("file://"), read_only=read_only)
    return FsspecStore.from_url(url, storage_options=dict(storage_options or {}),
                                read_only=read_only)


# -- metadata -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Segment:
    """One committed, immutable piece of a split."""

    id: str
    tokens: int
    documents: int
    max_token_id: int


@dataclass(frozen=True)
class DomainInfo:
    """A domain's committed metadata (its group's attributes)."""

    name: str
    language: str
    tokenizer: dict[str, Any]
    sources: tuple[dict[str, Any], ...]
    segments: dict[str, tuple[Segment, ...]]
    has_quality: bool = False
    #: named document scores: ``{name: {"key": array key under scores/, ...about it}}``
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def score_names(self) -> list[str]:
        """The scores a reader can ask for: the attached ones and ``quality`` when
        ``prepare --quality-field`` wrote it."""
        return sorted({*self.scores, *(["quality"] if self.has_quality else [])})

    def score_key(self, name: str, where: str) -> str:
        """The array key of the score ``name`` in a segment; a ``DataError`` naming the
        scores the domain (at ``where``) has when it has no such score."""
        if name in self.scores:
            return f"scores/{self.scores[name]['key']}"
        if name == "quality" and self.has_quality:
            return "quality"
        raise DataError(f"{where} has no score {name!r}; it has {self.score_names or 'none'} "
                        "(attach one with `lightning-aquila score`)")

    def tokens(self, split: str = "train") -> int:
        return sum(s.tokens for s in self.segments.get(split, ()))

    def documents(self, split: str = "train") -> int:
        return sum(s.documents for s in self.segments.get(split, ()))

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens(split) for split in SPLITS)

    @property
    def total_documents(self) -> int:
        return sum(self.documents(split) for split in SPLITS)

    @property
    def max_token_id(self) -> int:
        return max((s.max_token_id for split in SPLITS for s in self.segments.get(split, ())),
                   default=-1)

    @property
    def tokenizer_hash(self) -> str:
        return str(self.tokenizer.get("hash", ""))

    def to_attrs(self) -> dict[str, Any]:
        return {
            "domain": self.name,
            "language": self.language,
            "tokenizer": dict(self.tokenizer),
            "sources": [dict(s) for s in self.sources],
            "segments": {split: [asdict(s) for s in segs] for split, segs in self.segments.items()},
            "has_quality": self.has_quality,
            **({"scores": {k: dict(v) for k, v in self.scores.items()}} if self.scores else {}),
            # Summaries for people and tools reading zarr.json directly; readers recompute.
            "tokens": {split: self.tokens(split) for split in SPLITS},
            "documents": {split: self.documents(split) for split in SPLITS},
            "max_token_id": self.max_token_id,
            **self.extra,
        }

    @classmethod
    def from_attrs(cls, where: str, attrs: Mapping[str, Any]) -> DomainInfo:
        try:
            if sorted(attrs["segments"]) != sorted(SPLITS):
                raise ValueError(f"segments are listed for splits {sorted(attrs['segments'])}, "
                                 f"not {list(SPLITS)}")
            segments = {
                split: tuple(_segment(s) for s in attrs["segments"][split]) for split in SPLITS
            }
            known = {"domain", "language", "tokenizer", "sources", "segments", "has_quality",
                     "scores", "tokens", "documents", "max_token_id"}
            info = cls(
                name=str(attrs["domain"]),
                language=str(attrs["language"]),
                tokenizer=dict(attrs["tokenizer"]),
                sources=tuple(dict(s) for s in attrs["sources"]),
                segments=segments,
                has_quality=bool(attrs.get("has_quality", False)),
                scores=_scores(attrs.get("scores", {})),
                extra={k: v for k, v in attrs.items() if k not in known},
            )
            # The summaries are written with the segment list: a disagreement is damage (a
            # flipped count, a dropped segment), which the chunk checksums cannot see.
            for key, count in (("tokens", info.tokens), ("documents", info.documents)):
                summary = {split: count(split) for split in SPLITS}
                if key in attrs and attrs[key] != summary:
                    raise ValueError(f"the {key} summary {attrs[key]!r} disagrees with the "
                                     f"segment list ({summary})")
            return info
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise DataError(
                f"{where}: domain metadata is incomplete or malformed ({exc!r})"
            ) from None


def _scores(entry: Any) -> dict[str, dict[str, Any]]:
    """The ``scores`` attribute checked: names map to a mapping with a string ``key``
    (a wrong shape is a ``TypeError`` -> DataError naming the domain)."""
    if not isinstance(entry, Mapping) or not all(
            isinstance(name, str) and isinstance(about, Mapping)
            and isinstance(about.get("key"), str) and SCORE_NAME.match(name)
            for name, about in entry.items()):
        raise TypeError(f"the scores attribute {entry!r} is not {{name: {{'key': ...}}}}")
    return {name: dict(about) for name, about in entry.items()}


def check_score_name(name: str) -> str:
    if not isinstance(name, str) or not SCORE_NAME.match(name):
        raise DataError(f"invalid score name {name!r}: use letters, digits and '_' "
                        "(at most 64 characters, starting with a letter)")
    return name


def _segment(entry: Mapping[str, Any]) -> Segment:
    """A segment from its attribute entry; wrong types are a ``TypeError`` (-> DataError)."""
    segment = Segment(**entry)
    if not isinstance(segment.id, str) or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= low
            for n, low in ((segment.tokens, 0), (segment.documents, 0),
                           (segment.max_token_id, -1))):
        raise TypeError(f"segment entry {dict(entry)!r} does not hold an id and counts")
    return segment


def checked_manifest(url: str, manifest: Any, verb: str) -> dict[str, Any]:
    """The manifest with ``format``, ``version`` and ``domains`` checked (metadata has no
    checksum, so a damaged one must fail here, naming the store, not later as a
    ``TypeError``)."""
    if not isinstance(manifest, Mapping) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{url!r} is a zarr group but not a lightning-aquila shard store (no "
                        "manifest in its attributes)")
    version, names = manifest.get("version"), manifest.get("domains")
    if not isinstance(version, int) or not isinstance(names, list) or not all(
            isinstance(name, str) for name in names):
        raise DataError(f"shard store {url!r}: the manifest is malformed "
                        f"(version {version!r}, domains {names!r})")
    if version > FORMAT_VERSION:
        raise DataError(f"shard store {url!r} has format version {version}; this "
                        f"lightning-aquila {verb} up to {FORMAT_VERSION}")
    return {**manifest, "version": version, "domains": names}


def damaged(where: str, what: str, exc: Exception) -> DataError:
    return DataError(f"{where}: the metadata of {what} cannot be read ({type(exc).__name__}: "
                     f"{exc}); the store is damaged")



__all__ = ["DEFAULT_CHUNK_TOKENS", "FORMAT_NAME", "FORMAT_VERSION", "MANIFEST_KEY",
           "OFFSETS_CHUNK", "SCORE_NAME", "SPLITS", "UNASSIGNED_PART", "DataError", "DomainInfo",
           "Segment", "check_domain_name", "check_score_name", "checked_manifest", "codecs",
           "damaged", "zarr_store"]
