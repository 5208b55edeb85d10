"""The Training State Monitor (TSM) callback: wires its parts to Lightning's hooks, logs
what they measure, and publishes the ``TrainingState``.

It observes only. Everything it needs comes from the Batch and Step output contracts
(``batch["domain"]``, ``outputs["sample_loss"]``), from the trainer, and optionally from
``trainer.datamodule.mixture`` (the Mixture contract of ``lightning_aquila.mixture_protocol``;
what the mixture offers beyond it is found once, when training starts), so it works in any
Lightning project, not only with AquilaLM.

Ordering: the state is updated in ``on_train_batch_end`` once per optimizer step (held-out
values in ``on_validation_epoch_end``). Lightning runs callbacks in list order, so a callback
listed after the monitor (the ATE) sees this step's state, anomalies included, in its own
``on_train_batch_end`` (with ``deferred_checks``, the default on CUDA, the step loss, gradient
norm and anomalies arrive one step later, each under its own step). Every value in the state
is reduced across ranks, so every rank reads the same numbers. (ModelCheckpoint always runs
last, and a checkpoint reads any deferred check first, so it holds the monitor state of its
own step.)

What it measures, and how, is in the parts next to this file (the package docstring lists
them); this class holds the configuration and decides when each part runs.

Why this file is still long (about 550 lines): a third is the class docstring, which
documents each of the ~30 options a YAML user sets, and the constructor that checks them;
the rest is one short method per Lightning hook, each delegating to a part (``domain_loss``,
``held_out``, ``step_check``, ``weight_stats``, ``throughput``, ``score_buckets``). Splitting
the hooks further would scatter the one place that says when each part runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_aquila.callbacks.monitor.domain_loss import DomainLossTable
from lightning_aquila.callbacks.monitor.held_out import HeldOutParts, ValLossFn, next_token_loss
from lightning_aquila.callbacks.monitor.norms import local_part, shard_spec, squares_on_device
from lightning_aquila.callbacks.monitor.score_buckets import ScoreBuckets
from lightning_aquila.callbacks.monitor.step_check import SpikeDetector, StepChecker, due
from lightning_aquila.callbacks.monitor.throughput import ThroughputMeter
from lightning_aquila.callbacks.monitor.weight_stats import WeightStatistics
from lightning_aquila.callbacks.probes import Probe
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.mixture_protocol import MixtureAccess
from lightning_aquila.tracking.run_files import RUN_FILES_FORMAT, change_fields
from lightning_aquila.tracking.run_log import RunLog, resolve_run_dir


class TrainingStateMonitor(Callback):
    r"""Per-domain losses, held-out loss, gradient norm, weight statistics, throughput/MFU,
    anomalies and probes; logged as ``tsm/...`` to every attached logger and published as
    ``monitor.state`` (a :class:`TrainingState`) for the ATE.

    Intervals are in optimizer steps; ``None`` turns a measurement off. A value is logged at
    ``trainer.global_step``, the number of optimizer steps completed (Lightning's own
    ``self.log`` values of the same step carry ``global_step - 1``).

    Args:
        domains: domain names by index; default ``trainer.datamodule.mixture.domains``, else
            ``domain_<i>``.
        train_loss_every_n_steps: per-domain training loss (mean of ``sample_loss`` over the
            interval, summed and counted per domain across ranks), its EMA, tokens per domain.
        ema_decay: weight of the previous EMA at each interval.
        val_loss: held-out loss and perplexity per domain at every validation run: of the
            ``dev`` part (batches whose ``part`` is 0, or that carry none) as ``tsm/val_*``
            and in ``state.val_*``, which policies read; of the ``test`` part (``part`` 1) as
            ``tsm/test_*`` only, for reports, so that no decision reads the numbers that
            judge the run.
        val_loss_fn: ``fn(pl_module, batch) -> (loss_sum (B,), tokens (B,))``; the default is a
            no-grad next-token cross-entropy of ``pl_module(batch["input_ids"])``.
        grad_norm_every_n_steps: global gradient norm and one per optimizer parameter group
            (before clipping).
        lr_every_n_steps: learning rate of each parameter group.
        loss_every_n_steps: the step's global training loss (``tsm/loss``) at these steps as
            well as with the per-domain loss (``train_loss_every_n_steps``). ``1`` gives a
            step-by-step loss curve, e.g. to hold two runs' curves against each other, without
            shortening the interval the per-domain losses (and so a policy) average over.
        throughput_every_n_steps: tokens/s per device and MFU over the interval (validation
            time excluded); on CUDA also the peak memory allocated on any rank so far.
        peak_flops: peak FLOP/s of one device; default: what Lightning's
            ``get_available_flops`` knows of the device at the trainer's precision (none on
            CPU or an unlisted chip: then no MFU).
        flops_per_token: training FLOPs per token; default
            ``pl_module.config.flops_per_token(seq_len)`` when the module has it.
        mixture_every_n_steps: ``trainer.datamodule.mixture.weights``.
        weight_stats_every_n_steps: per layer, the weight norm, the update-to-weight ratio
            since the previous check and the change since the last stage boundary. Keeps two
            copies of the (local shard of the) weights on ``snapshot_device``.
        snapshot_device: where those copies live.
        checkpoint_snapshots: also save them in checkpoints (only when the weights are not
            sharded: a sharded run's snapshots are per rank and Lightning saves callback state
            from rank 0 only).
        detect_nonfinite: flag a non-finite loss or gradient norm.
        deferred_checks: read each step's loss and gradient norm (for anomaly detection,
            ``tsm/loss`` and ``tsm/grad_norm``) at the end of the *next* step, from a copy
            queued behind the step's work, so the host never waits for the GPU (a wait per
            step leaves the GPU idle while Lightning prepares the next one). Anomalies are
            then found, logged and acted on one step later, still with their own step.
            Default: on when the module is on CUDA.
        detect_spikes, spike_window, spike_zscore, spike_min_history: flag a step loss whose
            z-score against the previous ``spike_window`` step losses exceeds ``spike_zscore``
            (after ``spike_min_history`` steps).
        max_anomalies: how many recent anomalies ``state.anomalies`` keeps (all go to the
            event log).
        probes: evaluations run every ``probes_every_n_steps``, e.g. ``MultipleChoiceProbe``.
        run_files: write ``tsm/metrics.jsonl`` and ``tsm/events.jsonl`` under the run dir.
        run_dir: where those go; default: the first logger's version folder for CSV and
            TensorBoard loggers (``trainer.log_dir``), else ``trainer.default_root_dir``.
        score_buckets: training and held-out loss per quantile bucket of the score that
            batches carry (``batch["score"]``, with ``DomainDataModule(quality=...)``), logged
            with the per-domain losses as ``tsm/{train,val,test}_loss_by_score/q<k>`` and
            ``tsm/{train,val,test}_share_by_score/q<k>``. The edges are the score's quantiles
            over the training documents of all domains (the datamodule's
            ``score_quantiles``), fixed when training first starts, recorded in the run log
            (``score_buckets`` event) and kept by checkpoints. Off, silently, when batches carry
            no score; ``None`` turns it off.
        score_edges: inner bucket edges to use instead of quantiles (``len + 1`` buckets),
            e.g. for a datamodule without ``score_quantiles``; warns once if batches then
            carry no score.
        report_on_fit_end: write the run report (``report.png``/``report.html`` in the run
            dir) when ``fit`` ends, and hand both to every logger that has ``log_file``
            (``NeptuneLogger``), so the tracked run carries its report.
    """

    def __init__(
        self,
        domains: Sequence[str] | None = None,
        train_loss_every_n_steps: int | None = 10,
        ema_decay: float = 0.9,
        val_loss: bool = True,
        val_loss_fn: ValLossFn | None = None,
        grad_norm_every_n_steps: int | None = 10,
        lr_every_n_steps: int | None = 10,
        loss_every_n_steps: int | None = None,
        throughput_every_n_steps: int | None = 10,
        peak_flops: float | None = None,
        flops_per_token: float | None = None,
        mixture_every_n_steps: int | None = 10,
        weight_stats_every_n_steps: int | None = 100,
        snapshot_device: str = "cpu",
        checkpoint_snapshots: bool = True,
        detect_nonfinite: bool = True,
        deferred_checks: bool | None = None,
        detect_spikes: bool = True,
        spike_window: int = 100,
        spike_zscore: float = 5.0,
        spike_min_history: int = 20,
        max_anomalies: int = 100,
        probes: Sequence[Probe] | None = None,
        probes_every_n_steps: int | None = 500,
        run_files: bool = True,
        run_dir: str | None = None,
        score_buckets: int | None = 4,
        score_edges: Sequence[float] | None = None,
        report_on_fit_end: bool = False,
    ) -> None:
        for arg, value in [("train_loss_every_n_steps", train_loss_every_n_steps),
                           ("grad_norm_every_n_steps", grad_norm_every_n_steps),
                           ("lr_every_n_steps", lr_every_n_steps),
                           ("loss_every_n_steps", loss_every_n_steps),
                           ("throughput_every_n_steps", throughput_every_n_steps),
                           ("mixture_every_n_steps", mixture_every_n_steps),
                           ("weight_stats_every_n_steps", weight_stats_every_n_steps),
                           ("probes_every_n_steps", probes_every_n_steps)]:
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainingStateMonitor({arg}={value!r}): use a positive "
                                 "number of steps, or None to turn it off")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"TrainingStateMonitor(ema_decay={ema_decay!r}) must be in [0, 1)")
        if max_anomalies < 1:
            raise ValueError(f"TrainingStateMonitor(max_anomalies={max_anomalies!r}) must be "
                             "at least 1")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"TrainingStateMonitor(peak_flops={peak_flops!r}) must be positive")
        self.domains = list(domains) if domains is not None else None
        self.train_loss_every_n_steps = train_loss_every_n_steps
        self.ema_decay = ema_decay
        self.val_loss = val_loss
        self.val_loss_fn = val_loss_fn or next_token_loss
        self.grad_norm_every_n_steps = grad_norm_every_n_steps
        self.lr_every_n_steps = lr_every_n_steps
        self.loss_every_n_steps = loss_every_n_steps
        self.throughput_every_n_steps = throughput_every_n_steps
        self.peak_flops = peak_flops
        self.flops_per_token = flops_per_token
        self.mixture_every_n_steps = mixture_every_n_steps
        self.weight_stats_every_n_steps = weight_stats_every_n_steps
        self.snapshot_device = torch.device(snapshot_device)
        self.checkpoint_snapshots = checkpoint_snapshots
        self.detect_nonfinite = detect_nonfinite
        self.deferred_checks = deferred_checks
        self.detect_spikes = detect_spikes
        self.max_anomalies = max_anomalies
        self.probes = list(probes or [])
        self.probes_every_n_steps = probes_every_n_steps
        self.run_files = run_files
        self.run_dir_arg = run_dir
        self.report_on_fit_end = report_on_fit_end

        self.state = TrainingState()
        self.spikes = SpikeDetector(spike_window, spike_zscore, spike_min_history)
        self.run_dir: Path | str | None = None
        # the parts (one file each): what they hold is what the checkpoint holds
        self._losses = DomainLossTable(self.domains)
        self._checks = StepChecker(detect_nonfinite=detect_nonfinite,
                                   detect_spikes=detect_spikes, spikes=self.spikes,
                                   max_anomalies=max_anomalies,
                                   grad_norm_every=grad_norm_every_n_steps,
                                   train_loss_every=train_loss_every_n_steps,
                                   loss_every=loss_every_n_steps)
        self._weights = WeightStatistics(snapshot_device)
        self._throughput = ThroughputMeter(peak_flops, flops_per_token)
        self._held_out = HeldOutParts()  # dev and test
        self._score_buckets = ScoreBuckets(score_buckets, score_edges)
        #: The run's events and metrics (``tsm/*.jsonl``, the loggers): the engine writes
        #: through it too.
        self.run_log = RunLog()
        self.run_log.add_listener(self._on_event)
        self._module: LightningModule | None = None
        self._data: MixtureAccess | None = None  # trainer.datamodule.mixture, if any
        self._mixture_listened: Any = None
        self._last_step: int | None = None
        self._warned: set[str] = set()

    @property
    def anomaly_count(self) -> int:
        """Anomalies found in the whole run (``state.anomalies`` keeps the recent ones)."""
        return self._checks.anomaly_count

    # -- public ------------------------------------------------------------------------------
    def record_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Add an event to the run log (``tsm/events.jsonl``) and return it: the same as
        ``monitor.run_log.event(kind, step, **fields)`` with ``step`` defaulting to the
        current step. Call it on every rank (only global rank 0 writes). Kinds with a meaning
        here: ``"stage"`` (``name=...``) starts a data stage: the state's
        ``stage``/``stage_step`` change and the weights now become the reference of
        ``stage_change``; ``"rollback"``: the current step was undone, so its deferred check
        is not read. Any other kind (``"weights"``, ``"skip_data"``, ...) is recorded as given.
        """
        return self.run_log.event(kind, int(fields.pop("step", self.state.step)), **fields)

    def _on_event(self, event: dict[str, Any]) -> None:
        """What the state learns from the run log, whoever recorded the event."""
        if event["kind"] == "stage":
            self.state.stage = str(event.get("name", event.get("stage", "")))
            self.state.stage_step = event["step"]
            measuring = self._module is not None and self.weight_stats_every_n_steps is not None
            self._weights.begin_stage(self._module if measuring else None)
        elif event["kind"] == "rollback":  # that step trained on weights now thrown away
            self._checks.pending = None

    # -- setup and teardown --------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module
        self.run_dir = resolve_run_dir(trainer, self.run_dir_arg)
        self.run_log.open(self.run_dir, write=self.run_files and trainer.is_global_zero)
        if self.run_log.remote is not None:
            rank_zero_info(f"TrainingStateMonitor: run files go to {self.run_dir}/tsm, uploaded "
                           f"at every checkpoint and at the end (written in "
                           f"{self.run_log.local_dir}/tsm meanwhile)")
        self._throughput.resolve_peak(self.peak_flops, trainer)
        strategy = type(trainer.strategy).__name__
        if strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
            self._warn_once(strategy, f"TrainingStateMonitor: under {strategy} parameters and "
                            "gradients are flat local shards, so grad norm and weight statistics "
                            "cover this rank's shard only; use ModelParallelStrategy (FSDP2/TP).")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.run_log.close()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Run files on object storage are uploaded with every checkpoint."""
        self.run_log.sync()

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        try:
            self._data = mixture = MixtureAccess.of(getattr(trainer, "datamodule", None),
                                                    "TrainingStateMonitor")
        except ValueError as error:
            self._warn_once("mixture", f"{error}; its weights are not logged")
            self._data = mixture = None
        if self.domains is None and mixture is not None:
            self._losses.names = mixture.domains
        if mixture is not None and self._mixture_listened is not mixture.mixture and (
                mixture.add_listener(self._on_mixture_change)):
            self._mixture_listened = mixture.mixture
        self._last_step = trainer.global_step
        self._reset_step()
        self._checks.pending = None
        self._checks.deferred = (pl_module.device.type == "cuda" if self.deferred_checks is None
                                 else bool(self.deferred_checks))
        self._losses.restore(trainer, pl_module.device)
        self._score_buckets.start(trainer, pl_module.device, self.run_log.event)
        self._throughput.start()
        history = [change_fields(c) for c in mixture.history()] if mixture else []
        self.run_log.event("session_start", trainer.global_step, format=RUN_FILES_FORMAT,
                           batch_index=self.state.batch_index, world_size=trainer.world_size,
                           domains=self._losses.names,
                           batches_per_step=trainer.accumulate_grad_batches,
                           mixture_history=history, tokenizer=_store_tokenizer_hash(trainer))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_pending()

    def _flush_pending(self) -> None:
        """Finishes a deferred check now (before a checkpoint, at the end of training)."""
        trainer = getattr(self._module, "_trainer", None)  # None while no trainer holds it
        if trainer is None:
            return
        for checked_step, found in self._checks.finish_pending(
                trainer, self.state, self._losses.domains_present, self.run_log.event):
            self.run_log.log_metrics(trainer, checked_step, found)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.report_on_fit_end and self.run_files and trainer.is_global_zero):
            return
        from lightning_aquila.tracking.report import write_report

        try:
            png, page = write_report(self.run_log.local_dir or self.run_dir)
            self.run_log.sync(png, page)
        except Exception as error:  # a finished training run must not fail over its plot
            rank_zero_warn(f"TrainingStateMonitor: could not write the run report: {error!r}")
            return
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_file", None)):
                logger.log_file(page, "report/html")
                logger.log_file(png, "report/figure")

    # -- training -----------------------------------------------------------------------------
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Gradient norm per parameter group, before clipping (Lightning clips after this
        hook), reduced over shards. Needed every step when non-finite detection is on."""
        if not self._checks.wants_grad_norm(trainer.global_step + 1):
            return
        names = [g.get("name") or f"group_{i}" for i, g in enumerate(optimizer.param_groups)]
        if len(trainer.optimizers) > 1:
            index = next(i for i, o in enumerate(trainer.optimizers) if _same(o, optimizer))
            names = [f"optimizer_{index}/{n}" for n in names]
        pieces = [(name, local_part(p.grad), shard_spec(p.grad))
                  for name, group in zip(names, optimizer.param_groups)
                  for p in group["params"] if p.grad is not None]
        # Kept on the device: the step's check reads them with its loss in one transfer.
        self._checks.add_grad_squares(squares_on_device(pieces))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        self.state.batch_index += 1
        self._accumulate(trainer, pl_module, outputs, batch)
        if trainer.global_step == self._last_step:
            return  # accumulating gradients: the optimizer step has not happened yet
        self._last_step = trainer.global_step
        self.state.step = step = trainer.global_step
        metrics: dict[str, float] = {}
        for checked_step, found in self._checks.check(
                trainer, self.state, self._losses.presence, self._losses.domains_present,
                self.run_log.event):
            if checked_step == step:
                metrics.update(found)
            else:  # deferred: the previous step's, logged at that step
                self.run_log.log_metrics(trainer, checked_step, found)
        if due(self.train_loss_every_n_steps, step):
            metrics.update(self._losses.end_interval(trainer, self.state, self.ema_decay))
            metrics.update(self._score_buckets.end_interval(trainer))
        if due(self.lr_every_n_steps, step):
            metrics.update(self._learning_rates(trainer))
        if due(self.throughput_every_n_steps, step):
            metrics.update(self._throughput.measure(trainer, pl_module, self.state))
        if due(self.mixture_every_n_steps, step):
            metrics.update(self._mixture_weights())
        if due(self.weight_stats_every_n_steps, step):
            metrics.update(self._weight_stats(pl_module))
        if due(self.probes_every_n_steps, step) and self.probes:
            metrics.update(self._run_probes(pl_module))
        self._reset_step()
        self.run_log.log_metrics(trainer, step, metrics)

    def _accumulate(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                    batch: Any) -> None:
        """Adds one batch to the step's loss and the interval's per-domain table, on device
        and without a host sync when the domain names are known."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # the step was skipped
        if pl_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
        self._checks.add_batch(loss, batch.get("batch_index") if isinstance(batch, dict)
                               else None)
        input_ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(input_ids, torch.Tensor):
            self._throughput.add_batch(input_ids)
        domain = batch.get("domain") if isinstance(batch, dict) else None
        sample_loss = outputs.get("sample_loss") if isinstance(outputs, dict) else None
        if domain is None or sample_loss is None:
            self._warn_once("contract", "TrainingStateMonitor: batches need 'domain' and "
                            "training_step outputs need 'sample_loss' (the Step output contract) "
                            "for per-domain loss; per-domain accounting is off.")
            return
        tokens = float(input_ids.shape[-1]) if isinstance(input_ids, torch.Tensor) else 0.0
        self._losses.add(domain, sample_loss, tokens, loss.device)
        if self._score_buckets.active:
            score = batch.get("score")
            if isinstance(score, torch.Tensor):
                self._score_buckets.add(score, sample_loss, tokens, loss.device)
            elif self._score_buckets.given is not None:
                self._warn_once("score", "TrainingStateMonitor(score_edges=...): training "
                                "batches carry no 'score'; loss by score is off.")

    def _learning_rates(self, trainer: Trainer) -> dict[str, float]:
        groups = [g for optimizer in trainer.optimizers for g in optimizer.param_groups]
        if not groups:
            return {}
        self.state.lr = float(groups[0]["lr"])
        metrics = {"tsm/lr": self.state.lr}
        if len(groups) > 1:
            for i, group in enumerate(groups):
                metrics[f"tsm/lr_group/{group.get('name') or f'group_{i}'}"] = float(group["lr"])
        return metrics

    def _mixture_weights(self) -> dict[str, float]:
        if self._data is None:
            return {}
        self.state.mixture = self._data.weights
        return {f"tsm/mixture/{k}": v for k, v in self.state.mixture.items()}

    def _weight_stats(self, pl_module: LightningModule) -> dict[str, float]:
        stats = self._weights.measure(pl_module)
        self.state.weight_stats = stats
        self.state.weight_step = self.state.step
        return {f"tsm/weights/{layer}/{stat}": value
                for layer, values in stats.items() for stat, value in values.items()}

    def _run_probes(self, pl_module: LightningModule) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for probe in self.probes:
            name = getattr(probe, "name", type(probe).__name__)
            for key, value in probe(pl_module).items():
                self.state.probes[f"{name}/{key}"] = float(value)
                metrics[f"tsm/probe/{name}/{key}"] = float(value)
        return metrics

    # -- validation ---------------------------------------------------------------------------
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._throughput.pause()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._throughput.resume()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._held_out.reset(pl_module.device)
        self._score_buckets.reset_held_out(pl_module.device)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        """The held-out loss: what ``validation_step`` returned as ``sample_loss_sum`` and
        ``sample_tokens`` (``AquilaLM`` does), else a no-grad forward of its own
        (``val_loss_fn``), since a module's ``validation_step`` need not return anything. A
        ``val_loss_fn`` given explicitly always runs."""
        if not self.val_loss or trainer.sanity_checking or not isinstance(batch, dict):
            return
        if "domain" not in batch:
            self._warn_once("val_domain", "TrainingStateMonitor: validation batches have no "
                            "'domain'; held-out loss per domain is off.")
            return
        returned = (self.val_loss_fn is next_token_loss and isinstance(outputs, dict)
                    and "sample_loss_sum" in outputs and "sample_tokens" in outputs)
        if returned:
            loss_sum, tokens = outputs["sample_loss_sum"], outputs["sample_tokens"]
        else:
            with torch.no_grad():
                loss_sum, tokens = self.val_loss_fn(pl_module, batch)
        scored = self._score_buckets.active and batch.get("score") is not None
        self._held_out.add(batch, loss_sum, tokens, self._score_buckets if scored else None)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.val_loss or trainer.sanity_checking:
            return
        step = trainer.global_step
        metrics = self._held_out.end(self.state, self._losses.name, step)
        metrics.update(self._score_buckets.end_held_out())
        self.run_log.log_metrics(trainer, step, metrics)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Format 1 (``RUN_FILES_FORMAT``): these keys, whatever part holds them now."""
        self._flush_pending()  # the checkpoint holds the state of its own step
        snapshots = self._weights.checkpointed(self._module) if self.checkpoint_snapshots else None
        trainer = getattr(self._module, "_trainer", None) if self._module is not None else None
        state = {"format": RUN_FILES_FORMAT, "state": self.state.to_dict(),
                 "spike_window": list(self.spikes.window), "anomaly_count": self.anomaly_count,
                 "stage_reference_pending": self._weights.stage_reference_pending,
                 "snapshots": snapshots, "domain_tables": self._losses.gathered(trainer)}
        if self._score_buckets.active:  # absent otherwise: the format-1 keys stay as they were
            state["score_buckets"] = self._score_buckets.state_dict(trainer)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = TrainingState.from_dict(state_dict["state"])
        self.spikes.window.clear()
        self.spikes.window.extend(state_dict["spike_window"])
        self._checks.anomaly_count = state_dict["anomaly_count"]
        self._losses.restored = state_dict.get("domain_tables")  # applied in on_train_start
        if state_dict.get("score_buckets"):
            self._score_buckets.load_state_dict(state_dict["score_buckets"])
        self._weights.restore(state_dict.get("snapshots"),
                              state_dict.get("stage_reference_pending", False),
                              stage_named=self.state.stage is not None)

    # -- plumbing ------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._checks.reset_step()
        self._losses.reset_step()

    def _on_mixture_change(self, change: Any) -> None:
        fields = change_fields(change)
        step = fields.pop("step", None)
        self.run_log.event("mixture", self.state.step if step is None else step, **fields)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _store_tokenizer_hash(trainer: Trainer) -> str | None:
    """The hash of the tokenizer the run's store was prepared with, when the datamodule
    knows it (a run used as a DoReMi reference is checked against it: its losses are in
    that tokenizer's units)."""
    from lightning_aquila.datamodules.tokenizer_check import datamodule_tokenizer

    record = datamodule_tokenizer(trainer)
    return None if record is None else record.hash


def _same(a: Any, b: Any) -> bool:
    """Lightning hands hooks a wrapped optimizer; compare what it wraps."""
    return getattr(a, "optimizer", a) is getattr(b, "optimizer", b)


__all__ = ["TrainingStateMonitor"]
