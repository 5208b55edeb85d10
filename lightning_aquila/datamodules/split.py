"""Which tokens of a ``prepare`` run go to the held-out split, and routing them there.

Two rules, both pure functions of the sources' content hashes, so a store is reproducible:

* **documents** (the usual case): a document is held out whole when the hash of (source
  hash, record number) is below the held-out fraction. Training never sees a held-out
  document. A domain that would get no held-out document from its first such run (a dozen
  documents at 1%) holds out the one with the smallest hash instead, when that document is a
  small part of the run (see :func:`plan_split`).
* **windows** (one document, or a few large ones: a book as one ``.txt`` file): each
  document's token stream, its eos included, is cut into windows of
  :data:`HELDOUT_WINDOW_TOKENS` tokens (a document's tail joins its last window, so a window
  holds 1 to 2x that many tokens only at a document's end, and fewer only in a document
  shorter than one window), and window *j* of a document is held out when the hash of
  (source hash, record number, *j*) is below the fraction. If that holds out no window of
  the whole run, the run's last window is held out. A held-out window and the training tokens
  on either side of it become separate pieces ("documents" of their splits); only a
  document's last piece ends with eos, so no document boundary is invented.

Every held-out piece then belongs to one of two **parts**, by the same kind of hash: ``dev``
(what mixture policies and any other decision may read) or ``test`` (what only reports read),
half each on average. Under the documents rule a held-out document is in one part whole;
under the windows rule each window is, and neighbouring windows of different parts become
separate pieces. The part of each held-out piece is recorded in the store (``part``, 0 dev,
1 test), so the split is a fact of the data, not of the code that reads it.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

#: The unit the held-out split is cut in when documents are too few or too large to hold out
#: whole: long enough for packed validation windows, short enough that 1% of a single book
#: spreads over many places in it.
HELDOUT_WINDOW_TOKENS = 1024
#: Holding out a whole document is only done when it is at most this share of the run's bytes
#: (several documents of which one is held out), or the run is smaller than
#: ``SMALL_RUN_BYTES`` (too little text for windows: a unit test, a handful of snippets).
MAX_WHOLE_DOCUMENT_SHARE = 0.25
SMALL_RUN_BYTES = 64 << 10

Key = tuple[str, int]  # (source sha256, record number)
#: The held-out parts, by their recorded number: 0 for dev, 1 for test.
PARTS = ("dev", "test")
#: The share of held-out pieces in the test part.
TEST_FRACTION = 0.5


class SplitSink(Protocol):
    """Where routed tokens go (``DomainWriter``)."""

    def extend(self, split: str, tokens: np.ndarray) -> None: ...

    def end_document(self, split: str, quality: float | None = None,
                     part: int | None = None) -> None: ...


def _hash(text: str) -> float:
    digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def record_hash(sha256: str, record: int) -> float:
    """A document's place in [0, 1): the rule holds it out when below the fraction."""
    return _hash(f"{sha256}:{record}")


def held_out(sha256: str, record: int, fraction: float) -> bool:
    """Whether a document is held out: a hash, so the choice is stable and reproducible."""
    return fraction > 0 and record_hash(sha256, record) < fraction


def window_held_out(sha256: str, record: int, window: int, fraction: float) -> bool:
    """Whether window ``window`` of a document is held out (the ``windows`` rule)."""
    return fraction > 0 and _hash(f"{sha256}:{record}:{window}") < fraction


def heldout_part(sha256: str, record: int, window: int | None = None) -> int:
    """The part of a held-out document (or of one of its windows, under the windows rule):
    1 (test) when its hash is below :data:`TEST_FRACTION`, else 0 (dev)."""
    key = f"{sha256}:{record}" if window is None else f"{sha256}:{record}:{window}"
    return int(_hash(f"{key}:part") < TEST_FRACTION)


@dataclass(frozen=True)
class SplitPlan:
    """How one run splits: by whole documents (``forced``: one held out whatever its hash)
    or by token windows."""

    mode: Literal["documents", "windows"] = "documents"
    forced: Key | None = None


def plan_split(records: Iterable[tuple[str, int, int]], fraction: float, *,
               domain_has_heldout: bool) -> SplitPlan:
    """The rule for a run whose records are ``(sha256, record, bytes)``, in run order.

    A domain that already has held-out data, or a run the hash rule holds out a document of,
    splits by documents (the scan stops at the first such record). Otherwise one record, or a
    lowest-hash record holding more than ``MAX_WHOLE_DOCUMENT_SHARE`` of a run of at least
    ``SMALL_RUN_BYTES``, means windows; else that record is held out whole.
    """
    if fraction <= 0 or domain_has_heldout:
        return SplitPlan()
    best: tuple[float, str, int, int] | None = None
    count = total = 0
    for sha, record, size in records:
        value = record_hash(sha, record)
        if value < fraction:
            return SplitPlan()
        count, total = count + 1, total + size
        if best is None or value < best[0]:
            best = (value, sha, record, size)
    if best is None:
        return SplitPlan()
    _, sha, record, size = best
    if count == 1 or (total >= SMALL_RUN_BYTES and size > MAX_WHOLE_DOCUMENT_SHARE * total):
        return SplitPlan("windows")
    return SplitPlan("documents", (sha, record))


@dataclass
class _Window:
    key: Key
    index: int
    tokens: list[np.ndarray]
    ends: bool = False
    quality: float | None = None

    @property
    def part(self) -> int:
        return heldout_part(self.key[0], self.key[1], self.index)


@dataclass
class SplitRouter:
    """Sends each document's tokens, and the eos after it, to its split under a plan.

    ``begin`` a document, ``add`` its tokens (in any number of parts), ``end`` it; ``finish``
    after the run's last document. Counts per split (``tokens``, ``pieces``) and per source
    (``by_source[sha]``: ``train``/``heldout`` tokens, ``train_pieces``/``heldout_pieces``)
    are what the summary and the source records report; ``parts`` counts the held-out
    pieces of each part (``dev``, ``test``).
    """

    sink: SplitSink
    plan: SplitPlan
    fraction: float
    eos: int
    window: int = HELDOUT_WINDOW_TOKENS
    tokens: Counter[str] = field(default_factory=Counter)
    pieces: Counter[str] = field(default_factory=Counter)
    by_source: dict[str, Counter[str]] = field(default_factory=dict)
    parts: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._key: Key = ("", 0)
        self._quality: float | None = None
        self._split = "train"
        self._length = 0  # tokens of the current document so far
        self._current: _Window | None = None  # windows mode: the window being filled
        self._held_back: _Window | None = None  # windows mode: complete, not yet written
        self._open: dict[str, bool] = {"train": False, "heldout": False}
        self._part: int | None = None  # the part of the held-out piece being written

    # -- documents ---------------------------------------------------------------------------
    def begin(self, sha256: str, record: int, quality: float | None = None) -> None:
        self._key, self._quality, self._length = (sha256, record), quality, 0
        if self.plan.mode == "documents":
            chosen = held_out(sha256, record, self.fraction) or self.plan.forced == self._key
            self._split = "heldout" if chosen else "train"
            self._part = heldout_part(sha256, record) if chosen else None
        else:
            self._current = _Window(self._key, 0, [], quality=quality)

    def add(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        self._length += len(ids)
        if self.plan.mode == "documents":
            self._write(self._split, ids, self._key[0])
            return
        assert self._current is not None
        while len(ids):
            filled = sum(len(t) for t in self._current.tokens)
            if filled == self.window:  # full, and more follows: it is not the last
                self._push(self._current)
                self._current = _Window(self._key, self._current.index + 1, [],
                                        quality=self._quality)
                filled = 0
            take = self.window - filled
            self._current.tokens.append(ids[:take])
            ids = ids[take:]

    def end(self) -> bool:
        """End the current document; ``False`` (nothing written) when it had no tokens."""
        if self._length == 0:
            self._current = None
            return False
        self.add(np.array([self.eos], dtype=np.uint32))
        if self.plan.mode == "documents":
            self._close(self._split, self._quality, self._key[0])
        else:
            assert self._current is not None
            current, previous = self._current, self._held_back
            short = sum(len(t) for t in current.tokens) < self.window
            if short and previous is not None and previous.key == self._key:
                previous.tokens += current.tokens  # a document's tail joins its last window
                previous.ends = True
            else:
                current.ends = True
                self._push(current)
            self._current = None
        return True

    def finish(self) -> None:
        """Write the held-back window: held out if the run has held out no window yet."""
        window, self._held_back = self._held_back, None
        if window is not None:
            force = self.pieces["heldout"] == 0 and self.tokens["train"] > 0
            self._emit(window, "heldout" if force else self._window_split(window))

    # -- windows -----------------------------------------------------------------------------
    def _window_split(self, window: _Window) -> str:
        sha, record = window.key
        return ("heldout" if window_held_out(sha, record, window.index, self.fraction)
                else "train")

    def _push(self, window: _Window) -> None:
        previous, self._held_back = self._held_back, window
        if previous is not None:
            self._emit(previous, self._window_split(previous))

    def _emit(self, window: _Window, split: str) -> None:
        other = "train" if split == "heldout" else "heldout"
        sha = window.key[0]
        if self._open[other]:  # the document goes on in the other split: a new piece
            self._close(other, window.quality, sha)
        if split == "heldout":
            if self._open["heldout"] and self._part != window.part:  # and in the other part
                self._close("heldout", window.quality, sha)
            self._part = window.part
        for part in window.tokens:
            self._write(split, part, sha)
        if window.ends:
            self._close(split, window.quality, sha)

    # -- writing -----------------------------------------------------------------------------
    def _write(self, split: str, ids: np.ndarray, sha: str) -> None:
        self.sink.extend(split, ids)
        self._open[split] = True
        self.tokens[split] += len(ids)
        self.by_source.setdefault(sha, Counter())[split] += len(ids)

    def _close(self, split: str, quality: float | None, sha: str) -> None:
        part = self._part if split == "heldout" else None
        self.sink.end_document(split, quality, part)
        if part is not None:
            self.parts[PARTS[part]] += 1
        self._open[split] = False
        self.pieces[split] += 1
        self.by_source.setdefault(sha, Counter())[f"{split}_pieces"] += 1
