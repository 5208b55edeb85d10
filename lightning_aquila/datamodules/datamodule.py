"""DomainDataModule: the DMU as a LightningDataModule.

It serves packed training windows drawn by ``MixtureSampler`` from a shard store, two
validation loaders from the held-out split (its ``dev`` part, which decisions may read, then
its ``test`` part, which only reports read; every batch says its ``domain`` and ``part``),
and ``mixture`` (the contract the TSM and ATE use). Its ``state_dict`` is the sampler's
*consumed* position plus the mixture history, which is what Lightning puts into every
checkpoint. With ``quality``, windows are drawn by document score inside each domain
(``quality.py``) and every batch carries each sample's window ``score``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler

from lightning_aquila.datamodules.dataset import (
    HeldOutWindows,
    PartView,
    TrainWindows,
    interleave,
    spread_windows,
)
from lightning_aquila.datamodules.mixture import DomainMixture
from lightning_aquila.datamodules.quality import (
    DomainScores,
    QualityConfig,
    heldout_window_scores,
    lower_quantiles,
    train_scores,
)
from lightning_aquila.datamodules.sampler import MixtureSampler
from lightning_aquila.datamodules.shard_format import DataError
from lightning_aquila.datamodules.split import PARTS
from lightning_aquila.datamodules.storage_retry import StorageRetry
from lightning_aquila.datamodules.store import ShardStore, heldout_parts
from lightning_aquila.datamodules.store_tokenizer import StoreTokenizer, store_tokenizer
from lightning_aquila.datamodules.tokenizer_check import (
    check_run_tokenizer,
    probes_of,
    references_of,
)
from lightning_aquila.domain_weights import SPEC_NAMES, parse_spec, resolve_weights

STATE_VERSION = 1


class TrainLoader(DataLoader):
    """The training loader. Where it stands is the sampler's position, which the
    datamodule's ``state_dict`` saves and restores; this loader's own state is empty. Having
    one tells Lightning the loader resumes mid-epoch, which it otherwise warns it cannot."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Nothing to restore: the datamodule's state holds the position."""


class DomainDataModule(LightningDataModule):
    """Domain-mixture pretraining data from a shard store built by ``lightning-aquila prepare``.

    Args:
        store: URL of the shard store (local path, ``file://``, ``memory://``, ``s3://``...).
        seq_len: tokens per training sample; windows of ``seq_len + 1`` tokens are packed from
            each domain's stream (documents separated by eos) with stride ``seq_len``.
        weights: initial mixture: a mapping ``domain -> weight`` (rescaled to sum to 1; left
            out domains get 0), ``"natural"`` (proportional to training tokens),
            ``"uniform"``, ``"temperature:T"`` (``p_i ∝ n_i^(1/T)`` over training tokens
            ``n_i``) or ``"unimax:N"`` (UniMax: uniform, but no domain past ``N`` epochs of
            the run's token budget, ``trainer.max_steps`` global batches; the rest to the
            larger domains).
        batch_size: samples per batch per data-parallel rank.
        num_workers: DataLoader worker processes for training (they only read windows; the
            sampler stays in the main process). Validation loaders read in the main process.
        seed: seeds every draw; the global sample sequence is a function of (seed, global
            batch size, mixture history), where the global batch is ``batch_size x
            data-parallel ranks x the trainer's accumulate_grad_batches`` (one optimizer step).
            Keep it when the world size changes and a resumed run draws what it would have.
        tokenizer: the tokenizer the store must have been prepared with (checked in
            ``setup``, as are the model and the probes). Not needed: the store records
            its tokenizer, which the model and probes follow unless told otherwise.
        val_windows_per_domain: ``dev`` held-out windows per domain, spread over the part
            (0: no dev loader). Policies and rollback read these losses.
        test_windows_per_domain: ``test`` held-out windows per domain (default: as many as
            ``val_windows_per_domain``; 0: no test loader). Only reports read these.
        val_batch_size: batch size of the validation loaders (default: ``batch_size``).
        domains: the store's domains to use (default: all, sorted by name).
        prefetch_factor: batches each worker reads ahead (see docs/data.md: this bounds how
            many batches a weight change waits for).
        pin_memory: pin training batches for faster host-to-GPU copies.
        shuffle_blocks: storage blocks whose windows are shuffled together; larger mixes
            better, smaller needs fewer cached chunks per worker.
        epoch_batches: optimizer steps (global batches) per Lightning epoch (default: enough
            to cover every training window once); the loader yields ``epoch_batches x
            accumulate_grad_batches`` micro-batches.
        verify: ``"chunks"`` checks in ``setup`` that every chunk exists; ``"full"`` also
            decodes them all (catches corruption up front); ``"none"`` skips both.
        storage_options: fsspec options for remote stores (credentials, endpoints).
        storage_retry: how every process that reads the store (each loader worker on its
            own, and the main one) waits for it when it is unreachable or throttling:
            ``{max_wait_s: 300, first_delay_s: 1, max_delay_s: 30}`` (the defaults; give any
            of them). A read that fails with a connection error, a timeout or a 5xx/429
            answer (after s3fs's and botocore's own retries) is retried with exponential
            backoff (pauses from ``first_delay_s``, doubling, at most ``max_delay_s``), and
            the process says so in one line (``waiting for s3://...``). Past ``max_wait_s``
            it stops with one line naming the store and the bound; resume with
            ``--ckpt_path last``. ``max_wait_s: 0`` stops at the first failure. Keep
            ``max_wait_s`` under the process group's timeout when other ranks wait for
            this one (docs/crash-safety.md, "Object-store faults").
        quality: sample by document score inside each domain (docs/data.md, "Sampling by
            score"): ``{score: NAME, temperature: τ or {domain: τ}, floor_quantile: q,
            max_repeats: k}``. ``score`` is one of the store's scores; a document's weight is
            ``exp(score / τ)`` (``τ`` null: no reweighting, the plain order); documents
            below the ``q`` quantile of their domain are dropped; no window is drawn more
            than ``k`` times per epoch of its domain. Batches then carry ``score``.
    """

    def __init__(
        self,
        store: str,
        seq_len: int = 2048,
        weights: Mapping[str, float] | str = "natural",
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        tokenizer: str | None = None,
        val_windows_per_domain: int = 32,
        test_windows_per_domain: int | None = None,
        val_batch_size: int | None = None,
        domains: Sequence[str] | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
        shuffle_blocks: int = 8,
        epoch_batches: int | None = None,
        verify: Literal["chunks", "full", "none"] = "chunks",
        storage_options: Mapping[str, Any] | None = None,
        quality: Mapping[str, Any] | None = None,
        storage_retry: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        # ``tokenizer`` is the model's hyperparameter (Lightning refuses a key both hold with
        # different values); the store records the tokenizer anyway.
        self.save_hyperparameters(ignore=["tokenizer"])
        for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1),
                                 ("num_workers", num_workers, 0), ("seed", seed, 0),
                                 ("val_windows_per_domain", val_windows_per_domain, 0),
                                 ("prefetch_factor", prefetch_factor, 1),
                                 ("shuffle_blocks", shuffle_blocks, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise DataError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("val_batch_size", val_batch_size), ("epoch_batches", epoch_batches)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise DataError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if test_windows_per_domain is not None and (
                not isinstance(test_windows_per_domain, int)
                or isinstance(test_windows_per_domain, bool) or test_windows_per_domain < 0):
            raise DataError("test_windows_per_domain must be an integer >= 0 or None, got "
                            f"{test_windows_per_domain!r}")
        if isinstance(weights, str):
            try:
                parse_spec(weights, "weights")
            except ValueError as exc:
                raise DataError(str(exc)) from None
        elif not isinstance(weights, Mapping):
            raise DataError(f"weights must be a mapping domain -> weight or one of "
                            f"{list(SPEC_NAMES)}, got {weights!r}")
        if domains is not None and (not isinstance(domains, (list, tuple)) or not all(
                isinstance(d, str) for d in domains)):
            raise DataError(f"domains must be a list of domain names, got {domains!r}")
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise DataError(f"storage_options must be a mapping, got {storage_options!r}")
        self.storage_retry = StorageRetry.parse(storage_retry)
        if verify not in ("chunks", "full", "none"):
            raise DataError(f"verify must be 'chunks', 'full' or 'none', got {verify!r}")
        if quality is not None:  # checked again once the store's domains are known
            named = quality.get("temperature") if isinstance(quality, Mapping) else None
            QualityConfig.parse(quality, list(named) if isinstance(named, Mapping) else [])
        self.store_url = str(store)
        self.seq_len, self.batch_size, self.num_workers = seq_len, batch_size, num_workers
        self.seed, self.tokenizer = seed, tokenizer
        self.weights_config = weights
        self.val_windows_per_domain = val_windows_per_domain
        self.test_windows_per_domain = (val_windows_per_domain if test_windows_per_domain
                                        is None else test_windows_per_domain)
        self.val_batch_size = val_batch_size or batch_size
        self.domain_selection = list(domains) if domains is not None else None
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.shuffle_blocks, self.epoch_batches = shuffle_blocks, epoch_batches
        self.verify, self.storage_options = verify, dict(storage_options or {})
        self.quality_spec = quality
        self.quality: QualityConfig | None = None  # checked against the store's domains
        self._scores: dict[str, DomainScores] = {}
        self._store: ShardStore | None = None
        self._mixture: DomainMixture | None = None
        self.sampler: MixtureSampler | None = None
        self._checked = False
        self._tokenizer_record: StoreTokenizer | None = None
        self._views: dict[str, list[PartView]] | None = None
        self._pending_state: Mapping[str, Any] | None = None
        self.num_replicas, self.rank = 1, 0

    # -- the store and the mixture (available before setup, for callbacks) --------------------
    @property
    def store(self) -> ShardStore:
        if self._store is None:
            self._store = ShardStore(self.store_url, self.storage_options,
                                     retry=self.storage_retry)
        return self._store

    @property
    def domains(self) -> list[str]:
        return self.mixture.domains

    @property
    def mixture(self) -> DomainMixture:
        """The Mixture contract object (``domains``, ``weights``, ``set_weights``, history)."""
        if self._mixture is None:
            self._mixture = self._build_mixture()
        return self._mixture

    def _build_mixture(self) -> DomainMixture:
        store = self.store
        if not store.domains:
            raise DataError(f"shard store {store.url!r} has no domains")
        if self.domain_selection is not None:
            for name in self.domain_selection:
                store.info(name)
            domains = list(self.domain_selection)
        else:
            domains = sorted(store.domains)
        for name in domains:
            if store.info(name).tokens("train") == 0:
                raise DataError(f"{store.where(name, 'train')} is empty: it has no training "
                                "tokens")
        unique = {d: store.info(d).tokens("train") for d in domains}
        try:
            if isinstance(self.weights_config, str):
                weights = resolve_weights(self.weights_config, domains, unique, "weights",
                                          budget=self._budget_tokens())
                if weights is None:  # only unimax:N can be unresolved: no budget yet
                    raise DataError(f"weights {self.weights_config!r} need the run's token "
                                    "budget (trainer.max_steps), which is known only inside "
                                    "a fit with max_steps set")
            else:
                weights = dict(self.weights_config)
            if self.quality_spec is not None:
                self.quality = QualityConfig.parse(self.quality_spec, domains)
            return DomainMixture(domains, weights, normalize=True, unique_tokens=unique,
                                 reason=f"initial ({self.weights_config})"
                                 if isinstance(self.weights_config, str) else "initial",
                                 quality_temperature=self.quality.temperature
                                 if self.quality else None)
        except DataError:
            raise
        except ValueError as exc:
            raise DataError(f"shard store {store.url!r}: {exc}") from None

    def _budget_tokens(self) -> int | None:
        """The run's training tokens: ``trainer.max_steps`` global batches of ``seq_len``
        tokens; ``None`` outside a fit or without ``max_steps``."""
        trainer = getattr(self, "trainer", None)
        steps = getattr(trainer, "max_steps", -1) if trainer is not None else -1
        if steps is None or steps <= 0:
            return None
        replicas, _ = self._world()
        return steps * self.batch_size * replicas * self._accumulation() * self.seq_len

    # -- checks ------------------------------------------------------------------------------
    def check(self) -> None:
        """Everything that can be wrong with the data, raised before training starts."""
        store, domains = self.store, self.mixture.domains
        record = self.tokenizer_record()
        if record.json is None:
            rank_zero_warn(f"shard store {store.url!r} holds no copy of its tokenizer (it was "
                           "prepared before stores kept one): probes without a tokenizer of "
                           "their own use the model's or the bundled one; re-run its prepare "
                           "commands to record it")
        callbacks = getattr(getattr(self, "trainer", None), "callbacks", None) or []
        check_run_tokenizer(record, module=self._module(), datamodule_tokenizer=self.tokenizer,
                            probes=probes_of(callbacks), references=references_of(callbacks))
        config = getattr(self._module(), "config", None)
        vocab_size = getattr(config, "vocab_size", None)
        if vocab_size is not None:
            for name in domains:
                high = store.info(name).max_token_id
                if high >= vocab_size:
                    raise DataError(f"{store.where(name)} holds token id {high}, outside the "
                                    f"model's vocabulary of {vocab_size}")
        max_seq_len = getattr(config, "max_seq_len", None)
        if max_seq_len is not None and self.seq_len > max_seq_len:
            raise DataError(f"seq_len {self.seq_len} is longer than the model's max_seq_len "
                            f"{max_seq_len}")
        for name in domains:
            tokens = store.info(name).tokens("train")
            if tokens < self.seq_len + 1:
                raise DataError(
                    f"seq_len {self.seq_len} is too long for {store.where(name, 'train')}: its "
                    f"token stream has {tokens} tokens, a window needs {self.seq_len + 1}"
                )
            parts = (self.val_windows_per_domain > 0) + (self.test_windows_per_domain > 0)
            if parts:
                held = store.info(name).tokens("heldout")
                if held < parts * self.seq_len + 1:
                    raise DataError(
                        f"{store.where(name, 'heldout')} has {held} tokens, too few for "
                        f"{'a dev and a test window' if parts == 2 else 'one window'} of "
                        f"seq_len {self.seq_len}; prepare with a larger --held-out-fraction, "
                        "or set val_windows_per_domain=0 and test_windows_per_domain=0"
                    )
        if self.quality is not None:
            for name in domains:
                try:
                    store.info(name).score_key(self.quality.score, store.where(name))
                except DataError as exc:
                    raise DataError(f"quality.score: {exc}") from None
        if self.verify != "none":
            store.verify(domains, full=self.verify == "full")

    def _module(self) -> Any:
        trainer = getattr(self, "trainer", None)
        return getattr(trainer, "lightning_module", None) if trainer is not None else None

    def tokenizer_record(self) -> StoreTokenizer:
        """The tokenizer the store's domains (those of this run) were prepared with: the
        source of the model's vocabulary, bos and eos, and the probes' tokenizer."""
        if self._tokenizer_record is None:
            self._tokenizer_record = store_tokenizer(self.store, self.mixture.domains)
        return self._tokenizer_record

    def _world(self) -> tuple[int, int]:
        """Data-parallel (num_replicas, rank): tensor-parallel peers share a data rank."""
        trainer = getattr(self, "trainer", None)
        strategy = getattr(trainer, "strategy", None) if trainer is not None else None
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) if strategy else None
        if kwargs:
            return int(kwargs.get("num_replicas", 1)), int(kwargs.get("rank", 0))
        return 1, 0

    def _accumulation(self) -> int:
        """The trainer's gradient accumulation: it is part of the global batch (one optimizer
        step), which is what the sample sequence is defined on."""
        trainer = getattr(self, "trainer", None)
        return int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer else 1

    # -- Lightning hooks ---------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if not self._checked:
            self.check()
            self._checked = True
        if self.sampler is None:
            self.num_replicas, self.rank = self._world()
            windows = {d: self.store.stream(d).windows(self.seq_len) for d in self.domains}
            chunk = min(self.store.array(d, "train", s.id, "tokens").chunks[0]
                        for d in self.domains for s in self.store.info(d).segments["train"])
            if self.quality is not None:
                self._scores = train_scores(self.store, self.quality, windows, self.seq_len)
            self.sampler = MixtureSampler(
                self.mixture, windows, batch_size=self.batch_size,
                num_replicas=self.num_replicas, rank=self.rank, seed=self.seed,
                block_windows=max(1, chunk // self.seq_len), shuffle_blocks=self.shuffle_blocks,
                epoch_batches=self.epoch_batches, accumulate=self._accumulation(),
                quality=self._scores or None,
                max_repeats=self.quality.max_repeats if self.quality else None,
            )
            if self.quality is not None:
                self.sampler.check_quality()
            self.mixture.tokens_per_step = self.sampler.global_batch * self.seq_len
            if self._pending_state is not None:
                state, self._pending_state = self._pending_state, None
                self.load_state_dict(state)

    def train_dataloader(self) -> DataLoader:
        if self.sampler is None:
            self.setup("fit")
        # Outside Lightning nothing reports consumption: count a batch when it is drawn.
        self.sampler.consume_on_yield = self.trainer is None
        # Chunks one epoch group can touch per domain (a block spans at most two chunks).
        cache_chunks = 2 * (self.shuffle_blocks + 1)
        dataset = TrainWindows(self.store_url, self.domains, self.seq_len,
                               storage_options=self.storage_options, cache_chunks=cache_chunks,
                               retry=self.storage_retry)
        workers = self.num_workers
        return TrainLoader(
            dataset, batch_size=None, sampler=self.sampler, num_workers=workers,
            prefetch_factor=self.prefetch_factor if workers else None,
            persistent_workers=workers > 0, pin_memory=self.pin_memory,
        )

    def heldout_views(self) -> dict[str, list[PartView]]:
        """Each held-out part (``dev``, ``test``) of each domain, in mixture order, as the
        store records it (``heldout_parts``). A domain prepared before parts were recorded
        is split by a hash over its held-out documents, and one whose documents leave a part
        without a window (a single held-out document) has its held-out windows split in two
        halves instead, the first dev, the second test; both are said once, naming the
        domains."""
        if self._views is not None:
            return self._views
        views: dict[str, list[PartView]] = {name: [] for name in PARTS}
        unrecorded, halved = [], []
        for name in self.domains:
            ranges, recorded = heldout_parts(self.store, name)
            if not recorded:
                unrecorded.append(name)
            found = {part: PartView(ranges[part]) for part in PARTS}
            if any(v.windows(self.seq_len) == 0 for v in found.values()):
                halved.append(name)
                total = self.store.info(name).tokens("heldout")
                middle = ((total - 1) // self.seq_len // 2) * self.seq_len
                # the stream's own windows, first half dev, second half test (a window's
                # last token is the next one's first, as in training windows)
                found = {"dev": PartView([(0, middle + 1)]),
                         "test": PartView([(middle, total)])}
            for part in PARTS:
                views[part].append(found[part])
        if unrecorded:
            rank_zero_warn(
                f"shard store {self.store.url!r}: domain(s) {unrecorded} were prepared before "
                "held-out parts were recorded; their held-out documents are split into dev "
                "and test by a hash of (segment, document), the same on every run. Prepare "
                "them again to record the split in the store.")
        if halved:
            rank_zero_warn(
                f"shard store {self.store.url!r}: the held-out documents of domain(s) "
                f"{halved} leave the dev or the test part without a window of seq_len "
                f"{self.seq_len}; each one's held-out windows are split into two halves "
                "instead (disjoint windows, not whole documents). Prepare with a larger "
                "--held-out-fraction for a split on whole documents.")
        self._views = views
        return views

    def val_dataloader(self) -> list[DataLoader]:
        """The ``dev`` loader, then the ``test`` one (each left out at 0 windows): each
        holds the spread windows of every domain, taken one domain at a time in turn."""
        if self.sampler is None:
            self.setup("validate")
        loaders = []
        for part, wanted in (("dev", self.val_windows_per_domain),
                             ("test", self.test_windows_per_domain)):
            if wanted:
                loaders.append(self._heldout_loader(part, wanted))
        return loaders

    def _heldout_loader(self, part: str, wanted: int) -> DataLoader:
        if self.num_replicas > 1:
            wanted = max(self.num_replicas, wanted - wanted % self.num_replicas)
        views = self.heldout_views()[part]
        per_domain = []
        for name, view in zip(self.domains, views):
            ids = spread_windows(view.windows(self.seq_len), wanted)
            if self.num_replicas > 1:
                ids = ids[:len(ids) - len(ids) % self.num_replicas]
            if len(ids) < self.num_replicas:
                raise DataError(f"{self.store.where(name, 'heldout')} has {len(ids)} {part} "
                                f"windows, fewer than the {self.num_replicas} data-parallel "
                                "ranks")
            per_domain.append(ids)
        domains, windows = interleave(per_domain)
        scores = None
        if self.quality is not None:
            found = [dict(zip(ids.tolist(), heldout_window_scores(
                self.store, name, self.quality.score, self._scores[name].default, view.spans,
                ids, self.seq_len))) for name, view, ids in zip(self.domains, views, per_domain)]
            scores = np.array([found[d][w] for d, w in zip(domains.tolist(), windows.tolist())],
                              dtype=np.float32)
        dataset = HeldOutWindows(self.store_url, self.domains, views, domains, windows,
                                 self.seq_len, PARTS.index(part),
                                 storage_options=self.storage_options, scores=scores,
                                 retry=self.storage_retry)
        sampler = (DistributedSampler(dataset, num_replicas=self.num_replicas, rank=self.rank,
                                      shuffle=False, drop_last=True)
                   if self.num_replicas > 1 else None)
        return DataLoader(dataset, batch_size=self.val_batch_size, sampler=sampler,
                          shuffle=False)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Counts the training batches the loop actually takes: the sampler has drawn ahead
        (prefetching), and a checkpoint must record what was consumed, not what was drawn."""
        trainer = getattr(self, "trainer", None)
        if self.sampler is not None and trainer is not None and trainer.training:
            self.sampler.mark_consumed()
        return batch

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        return {
            "version": STATE_VERSION,
            "seq_len": self.seq_len,
            "sampler": self.sampler.state_dict(),
            "mixture": self.mixture.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a checkpoint; see docs/data.md for what may change across a resume
        (domains, configured weights, world size) and how."""
        if not state_dict:
            return
        if int(state_dict.get("version", 0)) > STATE_VERSION:
            raise DataError(f"datamodule state version {state_dict['version']} is newer than "
                            f"this lightning-aquila understands ({STATE_VERSION})")
        if self.sampler is None:  # Lightning calls setup first; a manual call may not
            self._pending_state = state_dict
            return
        self.sampler.load_state_dict(state_dict["sampler"],
                                     same_windows=state_dict["seq_len"] == self.seq_len)
        self.mixture.load_state_dict(state_dict["mixture"],
                                     next_batch_index=self.sampler.next_batch)

    # -- conveniences ------------------------------------------------------------------------
    def natural_weights(self) -> dict[str, float]:
        """Weights proportional to each domain's training tokens (the "natural" mixture)."""
        tokens = {d: self.store.info(d).tokens("train") for d in self.domains}
        total = sum(tokens.values())
        return {d: n / total for d, n in tokens.items()}

    def score_quantiles(self, quantiles: Sequence[float]) -> tuple[str, list[float], int] | None:
        """``(score name, quantiles, scored documents)`` of the score batches carry
        (``quality.score``) over the training documents of every domain pooled, each
        document counted once and unscored ones left out (exact lower order statistics, as
        the floor's); ``None`` without ``quality``. The monitor fixes its loss-by-score
        buckets by them, so that a bucket means the same documents all run long."""
        if self.quality is None:
            return None
        if self.sampler is None:
            self.setup("fit")
        found, scored = lower_quantiles([s.values for s in self._scores.values()], quantiles)
        return self.quality.score, found, scored

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(store={self.store_url!r}, seq_len={self.seq_len}, "
                f"batch_size={self.batch_size}, num_workers={self.num_workers})")
