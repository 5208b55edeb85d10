"""The domain-mixture sampler: which window of which domain each sample of each batch is.

The *global* sequence is a pure function of (seed, global batch size, mixture history), and
each rank's share of it a function of (world size, rank, accumulation), so a resume can
continue the exact sequence, also on another number of ranks ("elastic determinism"):

* **Global batch b** is one optimizer step: ``global_batch = batch_size * world_size *
  accumulate`` samples. Each sample's domain is drawn from the weights in force at b, with a
  generator seeded by ``(seed, b)`` (no state carried between batches, no wall clock). Its
  micro-batch a (of ``accumulate``) on rank r is the slot ``s = a * world_size + r``: samples
  ``[s * batch_size, (s + 1) * batch_size)``. Keep the global batch size and the optimizer
  steps see the same samples whatever the world size (with ``accumulate=1`` rank r takes
  ``[r * batch_size, (r + 1) * batch_size)``, as before).
* **Per-domain cursors** count the windows the whole job has drawn from each domain; the
  samples of a domain in batch b take the next positions of that domain's epoch order, in
  sample order. Cursors are global, not per rank, so one rank's checkpoint restores every
  rank, and the world size may change across a resume without repeating or skipping data.
* **Epoch order** of a domain is a seeded permutation of its windows, built lazily and
  locality-friendly: windows are grouped into blocks of about one storage chunk, the blocks
  are permuted, and windows are shuffled within groups of ``shuffle_blocks`` consecutive
  blocks. A reader then needs only a few decompressed chunks per domain at a time.

* **Quality** (optional, ``quality.py``): with document scores, an epoch of a domain visits
  each window a whole number of times, ``c_j`` in ``{floor(x_j), ceil(x_j)}`` where ``x_j``
  is its expected count (``W * w_j / sum(w)``, capped at ``max_repeats``), rounded at random
  with seeded uniforms, so the epoch's length and counts are a function of (seed, domain,
  epoch, temperature). The multiset is ordered by the same
  block/group shuffle, and the cursor stays (epoch, position). A temperature change
  (``DomainMixture.set_quality_temperature``) is recorded with the first batch not yet drawn;
  a domain drawn at or after it whose epoch was built at another temperature starts a new
  epoch there. Without scores, or at temperature ``None`` without a floor, a domain's order
  is the plain one, bit for bit. Each row then carries its window's score as a third column
  (float32 bits, ``unpack_scores``).

The sampler runs in the main process (DataLoader workers only fetch the windows), so it sees
a weight change as soon as it is made; it applies from the first batch not yet drawn.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.datamodules.quality import DomainScores
from lightning_aquila.datamodules.shard_format import DataError

_DRAW = 0x6D6978  # tags keep the generator streams of different purposes apart
_BLOCKS = 0x626C6B
_GROUP = 0x677270
_COUNTS = 0x636E74


def domain_key(name: str) -> int:
    """A stable 64-bit key per domain name, so a domain's order does not depend on which
    other domains are present."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")


class Cursor(NamedTuple):
    """Position of the next window to draw from a domain: ``position`` in the order of
    ``epoch``, which covers ``windows`` windows (fixed for the epoch, so data appended to the
    store mid-epoch joins at the next epoch instead of shifting this one)."""

    epoch: int
    position: int
    windows: int
    #: the quality temperature the epoch's order was built at (``None``: none)
    temperature: float | None = None

    def state(self) -> dict[str, Any]:
        found = {"epoch": self.epoch, "position": self.position, "windows": self.windows}
        return found if self.temperature is None else {**found, "temperature": self.temperature}


def pack_scores(scores: np.ndarray) -> np.ndarray:
    """Window scores (float32) as int64 spec entries: their bit patterns, losslessly."""
    return np.asarray(scores, dtype=np.float32).view(np.int32).astype(np.int64)


def unpack_scores(column: np.ndarray) -> np.ndarray:
    """The float32 scores a spec's third column carries."""
    return np.asarray(column, dtype=np.int64).astype(np.int32).view(np.float32)


class EpochOrder:
    """The order in which one domain's windows are visited in each epoch."""

    def __init__(self, domain: str, seed: int, block_windows: int, shuffle_blocks: int) -> None:
        self.key = domain_key(domain)
        self.seed = int(seed)
        self.block_windows = max(1, int(block_windows))
        self.shuffle_blocks = max(1, int(shuffle_blocks))
        self._epochs: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._groups: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    def _layout(self, epoch: int, windows: int) -> tuple[np.ndarray, np.ndarray]:
        """The permuted blocks of an epoch and where each group starts (in positions)."""
        key = (epoch, windows)
        if key not in self._epochs:
            n_blocks = math.ceil(windows / self.block_windows)
            rng = np.random.default_rng([self.seed, _BLOCKS, self.key, epoch])
            blocks = rng.permutation(n_blocks)
            sizes = self._sizes(epoch, windows, blocks)
            group_sizes = np.add.reduceat(sizes, np.arange(0, n_blocks, self.shuffle_blocks))
            starts = np.concatenate([[0], np.cumsum(group_sizes)])
            self._epochs[key] = (blocks, starts)
            if len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return self._epochs[key]

    def _group(self, epoch: int, windows: int, group: int) -> np.ndarray:
        key = (epoch, windows, group)
        if key not in self._groups:
            blocks, _ = self._layout(epoch, windows)
            mine = blocks[group * self.shuffle_blocks:(group + 1) * self.shuffle_blocks]
            ids = np.concatenate([self._ids(epoch, windows, int(b)) for b in mine])
            rng = np.random.default_rng([self.seed, _GROUP, self.key, epoch, group])
            self._groups[key] = rng.permutation(ids)
            if len(self._groups) > 64:
                self._groups.popitem(last=False)
        return self._groups[key]

    def _sizes(self, epoch: int, windows: int, blocks: np.ndarray) -> np.ndarray:
        """Positions each of ``blocks`` takes in the epoch: its windows."""
        return np.minimum(self.block_windows, windows - blocks * self.block_windows)

    def _ids(self, epoch: int, windows: int, block: int) -> np.ndarray:
        """The window ids ``block`` puts into the epoch's multiset."""
        return np.arange(block * self.block_windows,
                         min((block + 1) * self.block_windows, windows))

    def length(self, epoch: int, windows: int) -> int:
        """Positions in ``epoch``'s order: every window once."""
        return windows

    def windows(self, epoch: int, windows: int, positions: np.ndarray) -> np.ndarray:
        """Window ids at ``positions`` (each < ``length(epoch, windows)``) of ``epoch``'s
        order."""
        positions = np.asarray(positions, dtype=np.int64)
        _, starts = self._layout(epoch, windows)
        groups = np.searchsorted(starts, positions, side="right") - 1
        out = np.empty_like(positions)
        for group in np.unique(groups):
            picked = groups == group
            out[picked] = self._group(epoch, windows, int(group))[positions[picked]
                                                                   - starts[group]]
        return out


class WeightedEpochOrder(EpochOrder):
    """An epoch order in which window ``j`` appears ``c_j`` times: its expected count ``x_j``
    rounded at random, ``c_j = floor(x_j) + (U_j < frac(x_j))``, with one seeded uniform per
    window and epoch. Every ``c_j`` is ``floor(x_j)`` or ``ceil(x_j)`` (never above an
    integer cap on ``x``) and its mean is ``x_j``; windows are rounded independently, so
    windows of equal weight are not drawn in lockstep. An epoch's counts (one byte per
    window) are made when the epoch is first reached; its length is their sum."""

    def __init__(self, domain: str, seed: int, block_windows: int, shuffle_blocks: int,
                 expected: np.ndarray) -> None:
        super().__init__(domain, seed, block_windows, shuffle_blocks)
        self.expected = np.asarray(expected, dtype=np.float32)  # each <= 255 (one byte)
        self._counts: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._lengths: dict[int, int] = {}  # epoch -> its length, asked several times a batch

    def counts(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(c, per block)``: each window's count in ``epoch`` (uint8) and each block's."""
        if epoch not in self._counts:
            rng = np.random.default_rng([self.seed, _COUNTS, self.key, epoch])
            counts = np.empty(len(self.expected), dtype=np.uint8)
            per_block = np.empty(math.ceil(len(counts) / self.block_windows), dtype=np.int64)
            # windows per slice, whole blocks: bounded temporaries
            step = self.block_windows * max(1, (1 << 22) // self.block_windows)
            for lo in range(0, len(counts), step):
                x = self.expected[lo:lo + step]
                whole = np.floor(x)
                up = rng.random(len(x), dtype=np.float32) < (x - whole)
                counts[lo:lo + step] = whole.astype(np.uint8) + up
                per_block[lo // self.block_windows:(lo + len(x) - 1) // self.block_windows + 1
                          ] = np.add.reduceat(counts[lo:lo + len(x)],
                                              np.arange(0, len(x), self.block_windows),
                                              dtype=np.int64)
            self._counts[epoch] = (counts, per_block)
            if len(self._counts) > 3:
                self._counts.popitem(last=False)
        return self._counts[epoch]

    def _sizes(self, epoch: int, windows: int, blocks: np.ndarray) -> np.ndarray:
        return self.counts(epoch)[1][blocks]

    def _ids(self, epoch: int, windows: int, block: int) -> np.ndarray:
        ids = super()._ids(epoch, windows, block)
        return np.repeat(ids, self.counts(epoch)[0][ids])

    def length(self, epoch: int, windows: int) -> int:
        if epoch not in self._lengths:  # a sum over every block: once per epoch, not per call
            self._lengths[epoch] = int(self.counts(epoch)[1].sum())
        return self._lengths[epoch]


class MixtureSampler(DistributedSampler):
    """Yields one batch spec per step: an int64 array ``(batch_size, 2)`` of
    ``(domain index, window index)`` rows for this rank; with ``quality`` scores, ``(batch_size,
    3)``, the third column the window's score (``unpack_scores``).

    It subclasses ``DistributedSampler`` only so that Lightning recognises it as already
    rank-aware and does not wrap it in a ``DistributedSamplerWrapper`` (which would re-split
    the stream). ``set_epoch`` is accepted and ignored: the sequence continues across
    Lightning's epochs by batch index.

    A "nominal epoch" of ``epoch_batches`` global batches (``epoch_batches * accumulate``
    micro-batches) is what ``len()`` reports and where an iterator stops; each new iterator
    continues from the first micro-batch not yet consumed.

    ``quality`` maps domains to their :class:`DomainScores` (domains left out have none);
    the temperature in force at each batch is the mixture's (``temperature_at``), and
    ``max_repeats`` caps how often one window is drawn per epoch of its domain.
    """

    def __init__(self, mixture: DomainMixture, windows: Mapping[str, int], *, batch_size: int,
                 num_replicas: int = 1, rank: int = 0, seed: int = 0, block_windows: int = 128,
                 shuffle_blocks: int = 8, epoch_batches: int | None = None,
                 consume_on_yield: bool = False, accumulate: int = 1,
                 quality: Mapping[str, DomainScores] | None = None,
                 max_repeats: int | None = None) -> None:
        Sampler.__init__(self)
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if accumulate <= 0:
            raise ValueError(f"accumulate must be positive, got {accumulate}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside the world of {num_replicas}")
        missing = [d for d in mixture.domains if windows.get(d, 0) <= 0]
        if missing:
            raise ValueError(f"domain(s) {missing} have no training windows")
        self.mixture = mixture
        self.batch_size = int(batch_size)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.seed = int(seed)
        self.block_windows, self.shuffle_blocks = int(block_windows), int(shuffle_blocks)
        self.accumulate = int(accumulate)
        #: samples per rank-slot row: one micro-batch of every rank, ``accumulate`` rows a step
        self.row = self.batch_size * self.num_replicas
        self.global_batch = self.row * self.accumulate
        self.available = {d: int(windows[d]) for d in mixture.domains}
        self.epoch_batches = int(epoch_batches or max(
            1, math.ceil(sum(self.available.values()) / self.global_batch)))
        # DistributedSampler attributes that Lightning and users may read.
        self.epoch, self.shuffle, self.drop_last = 0, True, True
        self.num_samples, self.total_size = self.batch_size, self.global_batch
        self._orders = {d: EpochOrder(d, self.seed, self.block_windows, self.shuffle_blocks)
                        for d in mixture.domains}
        self.quality = {d: quality[d] for d in mixture.domains if d in quality} if quality else {}
        for name, scores in self.quality.items():
            if scores.windows != self.available[name]:
                raise ValueError(f"domain {name!r}: scores laid over {scores.windows} windows, "
                                 f"the sampler has {self.available[name]}")
        self.max_repeats = max_repeats
        self._weighted: OrderedDict[tuple[str, float | None], WeightedEpochOrder] = OrderedDict()
        # Consumed position: the next global batch training will take, how many of its
        # micro-batches it has taken (mid-accumulation), and the cursors before that batch.
        self._next_batch = 0
        self._next_micro = 0
        first = self.mixture.temperature_at(0)
        self._cursors = {d: Cursor(0, 0, n, first.get(d)) for d, n in self.available.items()}
        # Yielded but not yet consumed: (batch index, micro-batch, cursors before, after).
        self._pending: deque[tuple[int, int, dict[str, Cursor], dict[str, Cursor]]] = deque()
        self._drawn = 0  # first batch index not yet drawn
        #: Without a trainer to report consumption (a plain loop over the loader), treat each
        #: batch as consumed when yielded, so nothing accumulates.
        self.consume_on_yield = consume_on_yield
        mixture.bind(lambda: self._drawn, lambda: self._next_batch)

    # -- drawing -----------------------------------------------------------------------------
    def domains_of_batch(self, batch_index: int) -> np.ndarray:
        """Domain index of every sample of global batch ``batch_index`` (all ranks)."""
        weights = self.mixture.weights_at(batch_index)
        cdf = np.cumsum(weights)
        if not cdf[-1] > 0:
            raise ValueError(f"the mixture has no positive weight at batch {batch_index} for "
                             f"domains {self.mixture.domains}")
        u = np.random.default_rng([self.seed, _DRAW, batch_index]).random(self.global_batch)
        choice = np.searchsorted(cdf, u * cdf[-1], side="right")
        return np.minimum(choice, len(weights) - 1)

    def _order(self, domain: str, temperature: float | None) -> EpochOrder:
        """The domain's epoch order at ``temperature``: weighted when it has scores and a
        temperature or a floor, else the plain one."""
        scores = self.quality.get(domain)
        if scores is None or (temperature is None and scores.floor_quantile is None):
            return self._orders[domain]
        key = (domain, temperature)
        if key not in self._weighted:
            self._weighted[key] = WeightedEpochOrder(
                domain, self.seed, self.block_windows, self.shuffle_blocks,
                scores.expected_counts(temperature, self.max_repeats))
            if len(self._weighted) > 2 * len(self.quality):  # the current and the last
                self._weighted.popitem(last=False)
        self._weighted.move_to_end(key)
        return self._weighted[key]

    def check_quality(self) -> None:
        """Build each scored domain's order at the temperature it starts with, so that
        weights that cannot be drawn (all under the floor, a window past 255 draws an epoch)
        are a ``DataError`` naming the domain before training, not at the first batch."""
        for name in self.quality:
            try:
                self._order(name, self._cursors[name].temperature)
            except ValueError as exc:
                raise DataError(f"quality, domain {name!r}: {exc}") from None

    def _locate(self, domain: str, cursor: Cursor, ahead: np.ndarray) -> tuple[np.ndarray, ...]:
        """(epoch, position, windows) of the windows ``ahead`` places past ``cursor``;
        epochs after the cursor's use the domain's current window count."""
        order = self._order(domain, cursor.temperature)
        ahead = cursor.position + np.asarray(ahead, dtype=np.int64)
        epoch = np.full_like(ahead, cursor.epoch)
        windows = np.full_like(ahead, cursor.windows)
        length = order.length(cursor.epoch, cursor.windows)
        later = ahead >= length
        if later.any() and type(order) is EpochOrder:
            n = self.available[domain]
            rest = ahead[later] - cursor.windows
            epoch[later] = cursor.epoch + 1 + rest // n
            ahead[later] = rest % n
            windows[later] = n
        elif later.any():  # weighted epochs differ in length: walk them
            n, current = self.available[domain], cursor.epoch
            rest, at = ahead[later] - length, np.flatnonzero(later)
            while len(at):
                current += 1
                size = order.length(current, n)
                here = rest < size
                epoch[at[here]], ahead[at[here]], windows[at[here]] = current, rest[here], n
                rest, at = rest[~here] - size, at[~here]
        return epoch, ahead, windows

    def _draw(self, batch_index: int, cursors: dict[str, Cursor]) -> np.ndarray:
        """``(domain, window)`` of every sample of global batch ``batch_index`` (all ranks
        and micro-batches), advancing ``cursors`` past it."""
        choice = self.domains_of_batch(batch_index)
        spec = np.empty((self.global_batch, 3 if self.quality else 2), dtype=np.int64)
        spec[:, 0] = choice
        temperature = self.mixture.temperature_at(batch_index)
        for index in np.unique(choice):
            name = self.mixture.domains[index]
            members = np.flatnonzero(choice == index)
            cursor = cursors[name]
            if cursor.temperature != temperature.get(name):  # a change: a new epoch order
                cursor = Cursor(cursor.epoch + 1, 0, self.available[name], temperature.get(name))
            order = self._order(name, cursor.temperature)
            epochs, positions, windows = self._locate(name, cursor, np.arange(len(members)))
            for epoch in np.unique(epochs):
                at = epochs == epoch
                spec[members[at], 1] = order.windows(int(epoch), int(windows[at][0]),
                                                     positions[at])
            epoch, position, windows = self._locate(name, cursor, np.array([len(members)]))
            cursors[name] = Cursor(int(epoch[0]), int(position[0]), int(windows[0]),
                                   cursor.temperature)
            if self.quality:
                scores = self.quality.get(name)
                spec[members, 2] = pack_scores(np.full(len(members), np.nan) if scores is None
                                               else scores.window_scores[spec[members, 1]])
        return spec

    def micro_batch(self, spec: np.ndarray, micro: int) -> np.ndarray:
        """This rank's rows of micro-batch ``micro`` of a global batch's ``spec``."""
        lo = (micro * self.num_replicas + self.rank) * self.batch_size
        return spec[lo:lo + self.batch_size]

    def __len__(self) -> int:
        return self.epoch_batches * self.accumulate

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[np.ndarray]:
        start = self._next_batch
        stop = (start // self.epoch_batches + 1) * self.epoch_batches
        self._pending.clear()
        self._drawn = start
        return self._generate(start, self._next_micro, stop, dict(self._cursors))

    def _generate(self, start: int, first_micro: int, stop: int,
                  cursors: dict[str, Cursor]) -> Iterator[np.ndarray]:
        for batch_index in range(start, stop):
            before = dict(cursors)
            spec = self._draw(batch_index, cursors)
            after = dict(cursors)
            self._drawn = batch_index + 1
            if self.mixture.is_skipped(batch_index):
                continue
            for micro in range(first_micro if batch_index == start else 0, self.accumulate):
                if self.consume_on_yield:
                    self._advance(batch_index, micro, before, after)
                else:
                    self._pending.append((batch_index, micro, before, after))
                yield self.micro_batch(spec, micro)

    def _advance(self, batch_index: int, micro: int, before: dict[str, Cursor],
                 after: dict[str, Cursor]) -> None:
        """Record micro-batch ``micro`` of ``batch_index`` as consumed."""
        if micro + 1 == self.accumulate:
            self._next_batch, self._next_micro, self._cursors = batch_index + 1, 0, after
        else:
            self._next_batch, self._next_micro, self._cursors = batch_index, micro + 1, before

    # -- consumption and state ---------------------------------------------------------------
    @property
    def next_batch(self) -> int:
        """The global index of the next batch training will take."""
        return self._next_batch

    def mark_consumed(self) -> int:
        """Training took the oldest micro-batch yielded; returns its global batch index."""
        if not self._pending:
            raise RuntimeError(
                "a training batch was reported consumed but the sampler has none outstanding; "
                "is the train dataloader built by this datamodule?"
            )
        batch_index, micro, before, after = self._pending.popleft()
        self._advance(batch_index, micro, before, after)
        return batch_index

    def state_dict(self) -> dict[str, Any]:
        """The consumed position (not the drawn one: batches in the prefetch queue are drawn
        again after a resume)."""
        return {
            "next_batch": self._next_batch,
            # samples of next_batch already consumed (a checkpoint taken mid-accumulation)
            "next_sample": self._next_micro * self.row,
            "cursors": {d: c.state() for d, c in self._cursors.items()},
            "order": {"seed": self.seed, "block_windows": self.block_windows,
                      "shuffle_blocks": self.shuffle_blocks},
            "global_batch": self.global_batch,
            "layout": {"batch_size": self.batch_size, "world_size": self.num_replicas,
                       "accumulate": self.accumulate},
            **({"quality": self._quality_state()} if self.quality else {}),
        }

    def _quality_state(self) -> dict[str, dict[str, Any]]:
        """What a domain's weighted epoch orders depend on besides seed and temperature."""
        return {d: {"digest": s.digest, "floor_quantile": s.floor_quantile,
                    "max_repeats": self.max_repeats} for d, s in self.quality.items()}

    def load_state_dict(self, state: Mapping[str, Any], *, same_windows: bool = True) -> None:
        """Continue from a checkpoint's consumed position.

        Domains that stayed keep their cursors; new domains start at their first epoch;
        removed ones are dropped. A domain starts a fresh epoch instead of continuing (with a
        warning) when the checkpoint's epoch order cannot be reproduced: the order parameters
        changed, ``same_windows`` is False (``seq_len`` changed), or it has fewer windows than
        the checkpoint's epoch covered.

        The world size, micro-batch size and accumulation may change. With the global batch
        size kept, the run goes on with the very global batches it would have drawn; with
        another one the data continues without repeats or gaps but the batches differ (a
        warning). A checkpoint taken mid-accumulation resumes inside that global batch when
        its consumed samples are whole rows of the new layout, else it raises ``ValueError``.
        """
        saved_global = int(state.get("global_batch", self.global_batch))
        next_sample = int(state.get("next_sample", 0))
        if saved_global != self.global_batch:
            if next_sample:
                raise ValueError(
                    f"the checkpoint was taken inside global batch {state['next_batch']} "
                    f"(after {next_sample} of its {saved_global} samples); resume it with "
                    f"the same global batch size, not {self.global_batch}")
            warnings.warn(
                f"resuming with a global batch of {self.global_batch} samples instead of the "
                f"checkpoint's {saved_global}: the data continues without repeats or gaps, "
                "but the batches are no longer those of the original run", stacklevel=2)
        if next_sample % self.row:
            raise ValueError(
                f"the checkpoint was taken after {next_sample} samples of global batch "
                f"{state['next_batch']}, which is not a whole number of micro-batch rows of "
                f"{self.row} (batch_size x world size); resume with a layout that divides it, "
                "or from a checkpoint at an optimizer step")
        order = {"seed": self.seed, "block_windows": self.block_windows,
                 "shuffle_blocks": self.shuffle_blocks}
        reorder = dict(state.get("order", order)) != order or not same_windows
        saved_quality = state.get("quality", {})
        mine_quality = self._quality_state() if self.quality else {}
        cursors: dict[str, Cursor] = {}
        restarted: list[str] = []
        first = self.mixture.temperature_at(int(state["next_batch"]))
        for name, n in self.available.items():
            saved = state["cursors"].get(name)
            if saved is None:
                cursors[name] = Cursor(0, 0, n, first.get(name))
                continue
            temperature = saved.get("temperature")
            cursor = Cursor(int(saved["epoch"]), int(saved["position"]), int(saved["windows"]),
                            None if temperature is None else float(temperature))
            weighted = type(self._order(name, cursor.temperature)) is not EpochOrder
            if reorder or cursor.windows > n or (weighted and (
                    cursor.windows != n
                    or saved_quality.get(name) != mine_quality.get(name))):
                restarted.append(name)
                cursor = Cursor(cursor.epoch + 1, 0, n, cursor.temperature)
            cursors[name] = cursor
        if restarted:
            warnings.warn(
                f"resuming: domain(s) {restarted} start a new epoch because their epoch order "
                "changed since the checkpoint (seed, seq_len, block or shuffle settings, "
                "fewer windows in the store, or, sampled by score, other scores, windows, "
                "floor or max_repeats)",
                stacklevel=2,
            )
        self._next_batch = int(state["next_batch"])
        self._next_micro = next_sample // self.row
        self._cursors = cursors
        self._pending.clear()
        self._drawn = self._next_batch
