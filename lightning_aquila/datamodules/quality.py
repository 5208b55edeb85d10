"""Document scores laid over training windows: what quality-aware sampling draws by.

The sampler draws fixed-length windows, not documents, so a document's score has to become a
window's. Window ``j`` *covers* tokens ``[j * seq_len, (j + 1) * seq_len)`` of the domain's
stream (its last, label-only token belongs to the next window), so the windows tile the
stream and every token belongs to one window. Then, per domain:

* a document's weight is ``exp(score / τ)``, ``0`` below the floor (documents under the
  ``floor_quantile`` of the domain's scores), and ``1`` for every kept document when ``τ`` is
  ``None`` (infinite);
* a window's weight is the token-weighted mean of the weights of the documents it covers,
  so the expected number of times a token is drawn is proportional to its document's weight;
* a window's *score* (what batches carry, for loss by score quantile) is the token-weighted
  mean of the raw scores it covers.

A document without a score (NaN) takes the domain's median score. Each epoch of a domain
draws window ``j`` a whole number of times with expectation ``x_j = min(max_repeats,
W * w_j / sum(w))`` (``W`` windows): the sampler rounds these at random, seeded per epoch
(``sampler.WeightedEpochOrder``). Everything here is a pure function of the document table,
so orders rebuilt after a resume are the same.

Arrays are processed in slices of windows so that memory stays at the document table plus a
few bytes per window, also at 10^8 documents (``benchmarks/quality_sampler_scale.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lightning_aquila.datamodules.shard_format import DataError
from lightning_aquila.quality_temperature import temperatures

if TYPE_CHECKING:
    from lightning_aquila.datamodules.store import ShardStore

#: Windows per slice when laying document values over windows.
SLICE_WINDOWS = 1 << 18
_QUALITY_KEYS = ("score", "temperature", "floor_quantile", "max_repeats")


@dataclass(frozen=True)
class QualityConfig:
    """The datamodule's ``quality:`` block, checked.

    Args:
        score: the store's score to sample by (``inspect`` lists them).
        temperature: ``τ`` per domain (``None``: no reweighting, today's order).
        floor_quantile: drop documents scored below this quantile of their domain's scores.
        max_repeats: the most times one window (so any document's text) is drawn in one
            epoch of its domain.
    """

    score: str
    temperature: dict[str, float | None]
    floor_quantile: float | None = None
    max_repeats: int | None = None

    @classmethod
    def parse(cls, spec: Any, domains: Sequence[str]) -> QualityConfig:
        """From YAML; bad input is a ``DataError`` naming the field and value."""
        if not isinstance(spec, Mapping):
            raise DataError(f"quality must be a mapping with {list(_QUALITY_KEYS)}, got "
                            f"{spec!r}")
        unknown = sorted(set(spec) - set(_QUALITY_KEYS))
        if unknown:
            raise DataError(f"quality has unknown key(s) {unknown}; use {list(_QUALITY_KEYS)}")
        score = spec.get("score")
        if not isinstance(score, str) or not score:
            raise DataError(f"quality.score must name a score of the store, got {score!r}")
        floor = spec.get("floor_quantile")
        if floor is not None and (isinstance(floor, bool) or not isinstance(floor, (int, float))
                                  or not 0.0 <= floor < 1.0):
            raise DataError(f"quality.floor_quantile must be a number in [0, 1), got {floor!r}")
        repeats = spec.get("max_repeats")
        if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int)
                                    or not 1 <= repeats <= 255):
            raise DataError(f"quality.max_repeats must be an integer in [1, 255], got "
                            f"{repeats!r}")
        try:
            temperature = temperatures(spec.get("temperature"), domains, "quality.temperature")
        except ValueError as exc:
            raise DataError(str(exc)) from None
        return cls(score, temperature, None if floor is None else float(floor), repeats)


def _sortable(values: np.ndarray) -> np.ndarray:
    """float32 values as uint32 keys in the same order (NaN aside)."""
    bits = values.view(np.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(np.uint32) ^ np.uint32(0x80000000)


def _from_sortable(key: int) -> float:
    bits = np.array([key ^ 0x80000000], dtype=np.uint32).view(np.int32)
    return float((bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(np.float32)[0])


def _chunks(values: np.ndarray | Sequence[np.ndarray], step: int) -> Iterator[np.ndarray]:
    """The non-NaN values of one array, or of several taken as one, a slice at a time."""
    for array in [values] if isinstance(values, np.ndarray) else values:
        for lo in range(0, len(array), step):
            chunk = array[lo:lo + step]
            yield chunk[~np.isnan(chunk)]


def lower_quantiles(values: np.ndarray | Sequence[np.ndarray], quantiles: Sequence[float],
                    step: int = 1 << 22) -> tuple[list[float], int]:
    """The ``method="lower"`` quantiles of the non-NaN float32 ``values`` (the order statistic
    at rank ``floor(q * (n - 1))``) and ``n``, exactly, in two passes of 16-bit histograms
    over the values' bits: no copy of the values, which at 10^8 documents would be as large
    as the table itself. ``values`` may be several arrays (every domain's table), pooled
    without concatenating them. NaN for every quantile when no value is set."""
    high = np.zeros(1 << 16, dtype=np.int64)
    for chunk in _chunks(values, step):
        high += np.bincount(_sortable(chunk) >> 16, minlength=1 << 16)
    n = int(high.sum())
    if n == 0:
        return [math.nan] * len(quantiles), 0
    below = np.concatenate([[0], np.cumsum(high)])
    found = []
    for q in quantiles:
        rank = math.floor(q * (n - 1))
        bucket = int(np.searchsorted(below, rank, side="right")) - 1
        low = np.zeros(1 << 16, dtype=np.int64)
        for chunk in _chunks(values, step):
            keys = _sortable(chunk)
            low += np.bincount(keys[(keys >> 16) == bucket] & 0xFFFF, minlength=1 << 16)
        inside = int(np.searchsorted(np.cumsum(low), rank - int(below[bucket]), side="right"))
        found.append(_from_sortable((bucket << 16) | inside))
    return found, n


def _integral(bounds: np.ndarray, values: np.ndarray, cumulative: np.ndarray,
              positions: np.ndarray) -> np.ndarray:
    """``sum over tokens t < position of value(document of t)``, relative to ``bounds[0]``:
    ``cumulative[i]`` is that sum at ``bounds[i]``."""
    doc = np.searchsorted(bounds, positions, side="right") - 1
    doc = np.minimum(doc, len(values) - 1)
    return cumulative[doc] + values[doc] * (positions - bounds[doc])


def _prefix(bounds: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, ...]:
    """The document table as ``_integral`` reads it: int64 bounds, float64 values and the
    running token-weighted sum at each bound (one pass over the documents)."""
    edges = np.asarray(bounds, dtype=np.int64)
    piece = np.asarray(values, dtype=np.float64)
    return edges, piece, np.concatenate([[0.0], np.cumsum(piece * np.diff(edges))])


def span_mean(bounds: np.ndarray, values: np.ndarray, spans: Sequence[tuple[int, int]],
              prefix: tuple[np.ndarray, ...] | None = None) -> float:
    """Token-weighted mean of ``values`` over token ``spans`` of the stream (a held-out
    window, which may cross the gaps between its part's ranges). ``prefix``: ``_prefix`` of
    the same table, for callers that ask about many windows."""
    if not spans:
        return math.nan
    edges, piece, cumulative = prefix if prefix is not None else _prefix(bounds, values)
    at = np.array([p for span in spans for p in span], dtype=np.int64)
    ends = _integral(edges, piece, cumulative, at)
    length = sum(b - a for a, b in spans)
    return float((ends[1::2] - ends[0::2]).sum() / length) if length else math.nan


class DomainScores:
    """One domain's document scores over its training windows.

    Holds the document table (``bounds``, ``values``; not copied) because a new temperature
    needs the documents again, plus one float32 per window (its score). The NaN default
    (median) and the floor (a quantile) are computed once, over scored documents, as lower
    order statistics (``lower_quantiles``).

    Args:
        bounds, values: as returned by ``store.document_scores``.
        seq_len: tokens per window (stride).
        windows: training windows of the domain (``TokenStream.windows(seq_len)``).
        floor_quantile: documents scored below this quantile get weight 0.
    """

    def __init__(self, bounds: np.ndarray, values: np.ndarray, seq_len: int, windows: int, *,
                 floor_quantile: float | None = None) -> None:
        if len(bounds) != len(values) + 1:
            raise ValueError(f"{len(bounds)} document bounds for {len(values)} scores")
        if windows > 0 and windows * seq_len > int(bounds[-1]) - int(bounds[0]):
            raise ValueError(f"{windows} windows of {seq_len} tokens do not fit in the "
                             f"{int(bounds[-1]) - int(bounds[0])} tokens the scores cover")
        self.bounds, self.values = bounds, values
        self.seq_len, self.windows = int(seq_len), int(windows)
        self.floor_quantile = floor_quantile
        wanted = [0.5] + ([floor_quantile] if floor_quantile is not None else [])
        quantiles, scored = lower_quantiles(values, wanted)
        if not scored:
            quantiles = [0.0] * len(wanted)
        self.scored = scored
        self.default = float(quantiles[0])
        self.floor = float(quantiles[1]) if floor_quantile is not None else -math.inf
        self.top = float(np.nanmax(values)) if scored else 0.0  # >= the median it fills NaN with
        self.window_scores = (self._over_windows(lambda v: v, np.float32) if scored
                              else np.full(self.windows, np.nan, dtype=np.float32))
        self._digest: str | None = None

    def _filled(self, values: np.ndarray) -> np.ndarray:
        return np.where(np.isnan(values), np.float32(self.default), values)

    def _over_windows(self, transform: Any, dtype: Any) -> np.ndarray:
        """``transform`` of each (NaN-filled) document value, averaged over every window;
        a slice of windows at a time, so the temporaries stay small."""
        out = np.empty(self.windows, dtype=dtype)
        for first in range(0, self.windows, SLICE_WINDOWS):
            count = min(SLICE_WINDOWS, self.windows - first)
            start, stop = first * self.seq_len, (first + count) * self.seq_len
            lo = max(0, int(np.searchsorted(self.bounds, start, side="right")) - 1)
            hi = int(np.searchsorted(self.bounds, stop, side="left"))
            edges = self.bounds[lo:hi + 1].astype(np.int64, copy=False)
            piece = transform(self._filled(self.values[lo:hi]).astype(np.float64))
            cumulative = np.concatenate([[0.0], np.cumsum(piece * np.diff(edges))])
            at = np.arange(first, first + count + 1, dtype=np.int64) * self.seq_len
            out[first:first + count] = np.diff(_integral(edges, piece, cumulative, at)
                                               ) / self.seq_len
        return out

    def weights(self, temperature: float | None) -> np.ndarray:
        """Each window's weight at ``temperature`` (float32; its scale is arbitrary)."""
        floor, top = self.floor, self.top

        def weight(v: np.ndarray) -> np.ndarray:
            kept = v >= floor
            if temperature is None:
                return kept.astype(np.float64)
            return np.where(kept, np.exp((v - top) / temperature), 0.0)

        return self._over_windows(weight, np.float32)

    def expected_counts(self, temperature: float | None, max_repeats: int | None
                        ) -> np.ndarray:
        """``x_j``: the expected draws of each window per epoch (float32), ``W * w_j / sum(w)``
        capped at ``max_repeats``. All-zero weights (everything under the floor, or scores so
        spread that ``exp`` underflows) are a ``ValueError``."""
        weights = self.weights(temperature)
        total = float(weights.sum(dtype=np.float64))
        if not total > 0:
            raise ValueError(f"every window has weight 0 at temperature {temperature} (floor "
                             f"{self.floor:.6g}, top score {self.top:.6g})")
        weights *= np.float32(self.windows / total)  # in place: no second array of W
        if max_repeats is not None:
            np.minimum(weights, np.float32(max_repeats), out=weights)
        elif float(weights.max()) > 255:
            raise ValueError(f"at temperature {temperature} one window would be drawn "
                             f"{float(weights.max()):.0f} times per epoch; set "
                             "quality.max_repeats (at most 255) or a higher temperature")
        return weights

    @property
    def digest(self) -> str:
        """A fingerprint of the score table, so a resume can tell when the scores changed
        (an epoch order built on other scores cannot be continued)."""
        if self._digest is None:
            h = hashlib.blake2b(digest_size=16)
            h.update(np.ascontiguousarray(self.values).view(np.uint8))
            h.update(np.asarray([len(self.values), self.windows, self.seq_len], np.int64))
            self._digest = h.hexdigest()
        return self._digest


def train_scores(store: ShardStore, config: QualityConfig, windows: Mapping[str, int],
                 seq_len: int) -> dict[str, DomainScores]:
    """Each domain's :class:`DomainScores` for ``config.score`` over its training windows."""
    from lightning_aquila.datamodules.store import document_scores

    found = {}
    for name, count in windows.items():
        bounds, values = document_scores(store, name, config.score, "train")
        found[name] = DomainScores(bounds, values, seq_len, count,
                                   floor_quantile=config.floor_quantile)
    return found


def heldout_window_scores(store: ShardStore, domain: str, score: str, default: float,
                          spans: Callable[[int, int], list[tuple[int, int]]],
                          window_ids: np.ndarray, seq_len: int) -> np.ndarray:
    """The score of each held-out window ``window_ids`` of one part (``spans`` maps a part
    range to held-out stream ranges): token-weighted over the ``seq_len`` tokens it covers,
    documents without a score taking ``default`` (the training median)."""
    from lightning_aquila.datamodules.store import document_scores

    bounds, values = document_scores(store, domain, score, "heldout")
    values = np.where(np.isnan(values), np.float32(default), values)
    prefix = _prefix(bounds, values)  # once per domain and part, not once per window
    return np.array([span_mean(bounds, values, spans(w * seq_len, (w + 1) * seq_len), prefix)
                     for w in np.asarray(window_ids).tolist()], dtype=np.float32)


__all__ = ["DomainScores", "QualityConfig", "heldout_window_scores", "lower_quantiles",
           "span_mean", "train_scores"]
