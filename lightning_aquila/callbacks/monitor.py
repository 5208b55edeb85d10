"""The Training State Monitor (TSM): watches a run, logs it, and publishes a ``TrainingState``.

It observes only. Everything it needs comes from the Batch and Step output contracts
(``batch["domain"]``, ``outputs["sample_loss"]``), from the trainer, and optionally from
``trainer.datamodule.mixture``, so it works in any Lightning project, not only with AquilaLM.

Ordering: the state is updated in ``on_train_batch_end`` once per optimizer step (held-out
values in ``on_validation_epoch_end``). Lightning runs callbacks in list order, so a callback
listed after the monitor (the ATE) sees this step's state, anomalies included, in its own
``on_train_batch_end``. Every value in the state is reduced across ranks, so every rank reads
the same numbers. (ModelCheckpoint always runs last, so a checkpoint taken at a step holds the
monitor state of that step.)

Run files (global rank 0 only), under the run directory (see ``run_dir``):
``tsm/metrics.jsonl`` (one JSON object per emission: ``step``, ``time`` and metric values)
and ``tsm/events.jsonl`` (anomalies, stages, mixture changes, sessions, and what other
callbacks pass to ``record_event``). Both are appended a whole line at a time and flushed;
a process killed mid-write leaves at most a torn last line, which the report's reader skips.
The format is documented in ``docs/monitor.md``.

Why this file is long: it is one Lightning callback, and its hooks share the state they fill
(per-domain accumulators, the spike detector, snapshots for update ratios, the run files), so
they stay together in one class. The arithmetic they call lives in ``measures.py``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Hashable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.tensor import DTensor

from lightning_aquila.callbacks.measures import (
    HeldOutLoss,
    JsonlAppender,
    SpikeDetector,
    ValLossFn,
    clean_name,
    layer_of,
    local_part,
    next_token_loss,
    peak_memory,
    shard_spec,
    squares_on_device,
    sum_of_squares,
    throughput,
)
from lightning_aquila.callbacks.probes import Probe
from lightning_aquila.callbacks.state import Anomaly, TrainingState

#: Version of the run-file format written under ``<run_dir>/tsm/``.
RUN_FILES_FORMAT = 1

# -- the callback ----------------------------------------------------------------------------------
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
        val_loss: held-out loss and perplexity per domain at every validation run.
        val_loss_fn: ``fn(pl_module, batch) -> (loss_sum (B,), tokens (B,))``; the default is a
            no-grad next-token cross-entropy of ``pl_module(batch["input_ids"])``.
        grad_norm_every_n_steps: global gradient norm and one per optimizer parameter group
            (before clipping).
        lr_every_n_steps: learning rate of each parameter group.
        loss_every_n_steps: the step's global training loss (``tsm/loss``); default: with
            the per-domain training loss (``train_loss_every_n_steps``). ``1`` gives a
            step-by-step loss curve, e.g. to hold two runs' curves against each other, without
            shortening the interval the per-domain losses (and so a policy) average over.
        throughput_every_n_steps: tokens/s per device and MFU over the interval (validation
            time excluded); on CUDA also the peak memory allocated on any rank so far.
        peak_flops: peak FLOP/s of one device (default: H100 bf16 dense, 989 TFLOP/s).
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
        detect_spikes, spike_window, spike_zscore, spike_min_history: flag a step loss whose
            z-score against the previous ``spike_window`` step losses exceeds ``spike_zscore``
            (after ``spike_min_history`` steps).
        max_anomalies: how many recent anomalies ``state.anomalies`` keeps (all go to the
            event log).
        probes: evaluations run every ``probes_every_n_steps``, e.g. ``MultipleChoiceProbe``.
        run_files: write ``tsm/metrics.jsonl`` and ``tsm/events.jsonl`` under the run dir.
        run_dir: where those go; default: the first logger's version folder for CSV and
            TensorBoard loggers (``trainer.log_dir``), else ``trainer.default_root_dir``.
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
        peak_flops: float = 989e12,
        flops_per_token: float | None = None,
        mixture_every_n_steps: int | None = 10,
        weight_stats_every_n_steps: int | None = 100,
        snapshot_device: str = "cpu",
        checkpoint_snapshots: bool = True,
        detect_nonfinite: bool = True,
        detect_spikes: bool = True,
        spike_window: int = 100,
        spike_zscore: float = 5.0,
        spike_min_history: int = 20,
        max_anomalies: int = 100,
        probes: Sequence[Probe] | None = None,
        probes_every_n_steps: int | None = 500,
        run_files: bool = True,
        run_dir: str | None = None,
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
        if peak_flops <= 0:
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
        self.detect_spikes = detect_spikes
        self.max_anomalies = max_anomalies
        self.probes = list(probes or [])
        self.probes_every_n_steps = probes_every_n_steps
        self.run_files = run_files
        self.run_dir_arg = run_dir
        self.report_on_fit_end = report_on_fit_end

        self.state = TrainingState()
        self.spikes = SpikeDetector(spike_window, spike_zscore, spike_min_history)
        self.anomaly_count = 0
        self.run_dir: Path | None = None
        self._names: list[str] | None = self.domains
        self._module: LightningModule | None = None
        self._metrics_file: JsonlAppender | None = None
        self._events_file: JsonlAppender | None = None
        self._mixture_listened: Any = None
        self._held_out = HeldOutLoss()
        self._warned: set[str] = set()
        # per optimizer step
        self._last_step: int | None = None
        self._step_loss = 0.0  # tensor once a batch arrives
        self._step_batches = 0
        self._step_presence: torch.Tensor | None = None  # samples per domain in this step
        self._step_data_index: Any = None  # batch["batch_index"] of the step's last batch
        self._grad_groups: dict[str, torch.Tensor] = {}  # squared norms, on device
        # per interval
        self._domain_table: torch.Tensor | None = None  # (domains, [loss sum, samples, tokens])
        self._restored_tables: list[Any] | None = None  # per rank, from a checkpoint
        self._mark_time = 0.0
        self._mark_tokens = 0
        self._paused = 0.0
        self._val_started: float | None = None
        self._last_seq_len: int | None = None
        # weight snapshots: parameter name -> local shard; and their bookkeeping
        self._previous: dict[str, torch.Tensor] = {}
        self._stage_reference: dict[str, torch.Tensor] = {}
        self._stage_reference_pending = True  # take the reference at the next weight check
        self._pending_events: list[dict[str, Any]] = []  # recorded before the files opened

    # -- public ------------------------------------------------------------------------------
    def record_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """Add an event to the run's event log (``tsm/events.jsonl``) and return it.

        Call it on every rank (only global rank 0 writes). ``step`` defaults to the current
        step. Kinds with a meaning here: ``"stage"`` (``name=...``) starts a data stage: the
        state's ``stage``/``stage_step`` change and the weights now become the reference of
        ``stage_change``; ``"rollback"`` (``to_step=...``) tells the report that steps after
        ``to_step`` were undone. Any other kind (``"weights"``, ``"skip_data"``, ...) is
        recorded as given.
        """
        event = {"kind": kind, "step": int(fields.pop("step", self.state.step)),
                 "time": time.time(), **fields}
        if kind == "stage":
            self.state.stage = str(fields.get("name", fields.get("stage", "")))
            self.state.stage_step = event["step"]
            self._stage_reference = {}
            self._stage_reference_pending = True  # before training: the first check's weights
            if self._module is not None and self.weight_stats_every_n_steps is not None:
                self._stage_reference = self._snapshot(self._module)
                self._stage_reference_pending = False
        self._write_event(event)
        return event

    # -- setup and teardown --------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._module = pl_module
        self.run_dir = self._resolve_run_dir(trainer)
        if self.run_files and trainer.is_global_zero and self._metrics_file is None:
            self._metrics_file = JsonlAppender(self.run_dir / "tsm" / "metrics.jsonl")
            self._events_file = JsonlAppender(self.run_dir / "tsm" / "events.jsonl")
            for event in self._pending_events:
                self._events_file.write(event)
        self._pending_events = []
        strategy = type(trainer.strategy).__name__
        if strategy in ("FSDPStrategy", "DeepSpeedStrategy"):
            self._warn_once(strategy, f"TrainingStateMonitor: under {strategy} parameters and "
                            "gradients are flat local shards, so grad norm and weight statistics "
                            "cover this rank's shard only; use ModelParallelStrategy (FSDP2/TP).")

    def _resolve_run_dir(self, trainer: Trainer) -> Path:
        """``run_dir``, else the first logger's own version folder when it has one (CSV and
        TensorBoard: ``trainer.log_dir``), else ``trainer.default_root_dir``. (Other loggers'
        ``save_dir``, e.g. MLflow's tracking folder, is shared by many runs.)"""
        if self.run_dir_arg is not None:
            return Path(self.run_dir_arg)
        if trainer.loggers and isinstance(trainer.loggers[0], (CSVLogger, TensorBoardLogger)):
            return Path(trainer.log_dir)  # every rank calls this: it broadcasts rank 0's
        return Path(trainer.default_root_dir)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for appender in (self._metrics_file, self._events_file):
            if appender is not None:
                appender.close()
        self._metrics_file = self._events_file = None

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        self.teardown(trainer, pl_module, "fit")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        mixture = _mixture(trainer)
        if self.domains is None and mixture is not None:
            self._names = list(mixture.domains)
        if mixture is not None and self._mixture_listened is not mixture and hasattr(
                mixture, "add_listener"):
            mixture.add_listener(self._on_mixture_change)
            self._mixture_listened = mixture
        self._last_step = trainer.global_step
        self._reset_step()
        self._restore_domain_table(trainer, pl_module)
        self._mark_time, self._mark_tokens, self._paused = time.perf_counter(), 0, 0.0
        history = [_change_dict(c) for c in getattr(mixture, "history", [])]
        self._write_event({"kind": "session_start", "step": trainer.global_step,
                           "time": time.time(), "format": RUN_FILES_FORMAT,
                           "batch_index": self.state.batch_index,
                           "world_size": trainer.world_size, "domains": self._names,
                           "batches_per_step": trainer.accumulate_grad_batches,
                           "mixture_history": history})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not (self.report_on_fit_end and self.run_files and trainer.is_global_zero):
            return
        from lightning_aquila.report import write_report

        try:
            png, page = write_report(self.run_dir)
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
        step = trainer.global_step + 1
        if not (self.detect_nonfinite or _due(self.grad_norm_every_n_steps, step)):
            return
        names = [g.get("name") or f"group_{i}" for i, g in enumerate(optimizer.param_groups)]
        if len(trainer.optimizers) > 1:
            index = next(i for i, o in enumerate(trainer.optimizers) if _same(o, optimizer))
            names = [f"optimizer_{index}/{n}" for n in names]
        pieces = [(name, local_part(p.grad), shard_spec(p.grad))
                  for name, group in zip(names, optimizer.param_groups)
                  for p in group["params"] if p.grad is not None]
        # Kept on the device: _check_step reads them with the step's loss in one transfer.
        for name, square in squares_on_device(pieces).items():
            self._grad_groups[str(name)] = self._grad_groups.get(str(name), 0.0) + square

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
        metrics = self._check_step(trainer)
        if _due(self.train_loss_every_n_steps, step):
            metrics.update(self._train_loss(trainer))
        if _due(self.loss_every_n_steps, step) and self.state.loss is not None:
            metrics["tsm/loss"] = self.state.loss
        if _due(self.grad_norm_every_n_steps, step) and self.state.grad_norm is not None:
            metrics["tsm/grad_norm"] = self.state.grad_norm
            for group, norm in self.state.grad_norm_groups.items():
                metrics[f"tsm/grad_norm_group/{group}"] = norm
        if _due(self.lr_every_n_steps, step):
            metrics.update(self._learning_rates(trainer))
        if _due(self.throughput_every_n_steps, step):
            metrics.update(self._throughput(trainer, pl_module))
        if _due(self.mixture_every_n_steps, step):
            metrics.update(self._mixture_weights(trainer))
        if _due(self.weight_stats_every_n_steps, step):
            metrics.update(self._weight_stats(pl_module))
        if _due(self.probes_every_n_steps, step) and self.probes:
            metrics.update(self._run_probes(pl_module))
        self._reset_step()
        self._emit(trainer, step, metrics)

    def _accumulate(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                    batch: Any) -> None:
        """Adds one batch to the step's loss and the interval's per-domain table, on device
        and without a host sync when the domain names are known."""
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return  # the step was skipped
        if pl_module.automatic_optimization:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it for accumulation
        self._step_loss = self._step_loss + loss.detach().double()
        self._step_batches += 1
        self._step_data_index = batch.get("batch_index") if isinstance(batch, dict) else None
        input_ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if isinstance(input_ids, torch.Tensor):
            self._mark_tokens += input_ids.numel()
            self._last_seq_len = input_ids.shape[-1]
        domain = batch.get("domain") if isinstance(batch, dict) else None
        sample_loss = outputs.get("sample_loss") if isinstance(outputs, dict) else None
        if domain is None or sample_loss is None:
            self._warn_once("contract", "TrainingStateMonitor: batches need 'domain' and "
                            "training_step outputs need 'sample_loss' (the Step output contract) "
                            "for per-domain loss; per-domain accounting is off.")
            return
        domain = domain.reshape(-1).long()
        size = len(self._names) if self._names is not None else int(domain.max()) + 1
        self._domain_table = _grown(self._domain_table, size, 3, loss.device)
        self._step_presence = _grown(self._step_presence, size, 1, loss.device)
        tokens = float(input_ids.shape[-1]) if isinstance(input_ids, torch.Tensor) else 0.0
        rows = torch.stack([sample_loss.detach().reshape(-1).double(),
                            torch.ones_like(domain, dtype=torch.float64),
                            torch.full_like(domain, tokens, dtype=torch.float64)], dim=1)
        self._domain_table.index_add_(0, domain.to(loss.device), rows.to(loss.device))
        self._step_presence.index_add_(0, domain.to(loss.device), rows[:, 1:2].to(loss.device))

    def _check_step(self, trainer: Trainer) -> dict[str, float]:
        """The step's global loss and gradient norm; anomalies. One small all-reduce and one
        host sync per step, which reads the loss and the gradient norms together (none when
        detection is off and neither the train nor the grad-norm interval is due)."""
        wants_loss = (self.detect_nonfinite or self.detect_spikes
                      or _due(self.train_loss_every_n_steps, self.state.step)
                      or _due(self.loss_every_n_steps, self.state.step))
        has_loss = wants_loss and isinstance(self._step_loss, torch.Tensor)
        names = list(self._grad_groups)
        values: list[torch.Tensor] = []
        if has_loss:
            pair = torch.stack([self._step_loss.reshape(()),
                                torch.tensor(float(self._step_batches), dtype=torch.float64,
                                             device=self._step_loss.device)])
            values.append(self._sum_over_ranks(trainer, pair, per_domain=False))
        if names:
            squares = torch.stack([torch.as_tensor(self._grad_groups[n], dtype=torch.float64)
                                   for n in names])
            values.append(squares.to(values[0].device) if values else squares)
        read = torch.cat(values).tolist() if values else []
        grad_sq = None
        if names:
            by_group = dict(zip(names, read[len(read) - len(names):]))
            grad_sq = sum(by_group.values())
            self.state.grad_norm = math.sqrt(grad_sq)
            self.state.grad_norm_groups = {k: math.sqrt(v) for k, v in by_group.items()}
        if not has_loss:
            return {}
        loss_sum, count = read[0], read[1]
        self.state.loss = loss_sum / count
        found: list[Anomaly] = []
        if self.detect_nonfinite and not math.isfinite(self.state.loss):
            found.append(self._anomaly("nonfinite_loss", self.state.loss))
        if self.detect_nonfinite and grad_sq is not None and not math.isfinite(grad_sq):
            found.append(self._anomaly("nonfinite_grad", self.state.grad_norm))
        if self.detect_spikes:
            z = self.spikes.update(self.state.loss)
            if z is not None:
                found.append(self._anomaly("spike", self.state.loss, zscore=z))
        if not found:
            return {}
        domains = self._step_domains(trainer)
        metrics: dict[str, float] = {}
        for anomaly in found:
            anomaly.domains = domains
            self.anomaly_count += 1
            self.state.anomalies.append(anomaly)
            metrics[f"tsm/anomaly/{anomaly.kind}"] = 1.0
            if anomaly.zscore is not None:
                metrics["tsm/anomaly/zscore"] = anomaly.zscore
            event = {"kind": "anomaly", "step": anomaly.step, "time": time.time(),
                     "type": anomaly.kind, **{k: v for k, v in asdict(anomaly).items()
                                              if k not in ("kind", "step")}}
            self._write_event(event)
        del self.state.anomalies[: -self.max_anomalies]
        metrics["tsm/anomaly/count"] = float(self.anomaly_count)
        return metrics

    def _anomaly(self, kind: str, value: float | None, zscore: float | None = None) -> Anomaly:
        return Anomaly(step=self.state.step, kind=kind,
                       value=float("nan") if value is None else float(value),
                       batch_index=self._offending_batch_index(), zscore=zscore,
                       num_batches=self._step_batches)

    def _offending_batch_index(self) -> int:
        """The data's own index of the step's last batch when the batch carries one
        (``batch["batch_index"]``: the sampler's numbering, which skipped batches do not
        shift), else the monitor's count of training batches so far, minus one."""
        index = self._step_data_index
        if isinstance(index, torch.Tensor) and index.numel() > 0:
            return int(index.reshape(-1)[0])
        if isinstance(index, int):
            return index
        return self.state.batch_index - 1

    def _step_domains(self, trainer: Trainer) -> list[str]:
        if self._step_presence is None:
            return []
        presence = self._sum_over_ranks(trainer, self._step_presence.reshape(-1).clone())
        return [self._name(i) for i, n in enumerate(presence.tolist()) if n > 0]

    def _train_loss(self, trainer: Trainer) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.state.loss is not None:
            metrics["tsm/loss"] = self.state.loss
        if self._domain_table is None:
            return metrics
        table = self._sum_over_ranks(trainer, self._domain_table.clone()).tolist()
        self._domain_table.zero_()
        replication = _replication(trainer)
        for index, (loss_sum, samples, tokens) in enumerate(table):
            name = self._name(index)
            if samples > 0:
                mean = loss_sum / samples
                previous = self.state.train_loss.get(name)
                ema = mean if previous is None or not math.isfinite(previous) else (
                    self.ema_decay * previous + (1 - self.ema_decay) * mean)
                self.state.train_loss_last[name] = mean
                self.state.train_loss[name] = ema
                metrics[f"tsm/train_loss/{name}"] = mean
                metrics[f"tsm/train_loss_ema/{name}"] = ema
            seen = self.state.tokens_per_domain.get(name, 0) + round(tokens / replication)
            self.state.tokens_per_domain[name] = seen
            metrics[f"tsm/tokens/{name}"] = float(seen)
        self.state.tokens = sum(self.state.tokens_per_domain.values())
        self.state.train_step = self.state.step
        metrics["tsm/tokens_total"] = float(self.state.tokens)
        return metrics

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

    def _throughput(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        now = time.perf_counter()
        seconds = now - self._mark_time - self._paused
        tokens = self._mark_tokens
        self._mark_time, self._mark_tokens, self._paused = now, 0, 0.0
        if seconds <= 0 or tokens == 0:
            return {}
        per_device, mfu = throughput(tokens, seconds, _replication(trainer),
                                     self._flops_per_token(pl_module), self.peak_flops)
        self.state.tokens_per_sec, self.state.mfu = per_device, mfu
        metrics = {"tsm/tokens_per_sec": per_device}
        if mfu is not None:
            metrics["tsm/mfu"] = mfu
        peak = peak_memory(pl_module.device)
        if peak is not None:  # every rank is on CUDA, or none is
            peak = torch.tensor([float(peak)], device=pl_module.device)
            if trainer.world_size > 1:
                peak = trainer.strategy.reduce(peak, reduce_op="max")
            metrics["tsm/peak_memory_gib"] = float(peak) / 2**30
        return metrics

    def _flops_per_token(self, pl_module: LightningModule) -> float | None:
        if self.flops_per_token is not None:
            return self.flops_per_token
        config = getattr(pl_module, "config", None)
        if callable(getattr(config, "flops_per_token", None)) and self._last_seq_len:
            return float(config.flops_per_token(self._last_seq_len))
        return None

    def _mixture_weights(self, trainer: Trainer) -> dict[str, float]:
        mixture = _mixture(trainer)
        if mixture is None:
            return {}
        self.state.mixture = {k: float(v) for k, v in mixture.weights.items()}
        return {f"tsm/mixture/{k}": v for k, v in self.state.mixture.items()}

    # -- weight statistics ---------------------------------------------------------------------
    def _snapshot(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        return {clean_name(name): local_part(p).detach().to(self.snapshot_device, copy=True)
                for name, p in pl_module.named_parameters()}

    def _weight_stats(self, pl_module: LightningModule) -> dict[str, float]:
        """Per layer: ``norm`` = ‖W‖, ``update_ratio`` = ‖W − W_prev‖ / ‖W_prev‖ (W_prev: the
        weights at the previous check) and ``stage_change`` = ‖W − W_stage‖ / ‖W_stage‖
        (W_stage: the weights when the current stage began, or at the run's first check).
        Computed from local shards, reduced over the mesh, never gathered."""
        params = [(clean_name(n), p) for n, p in pl_module.named_parameters()]
        previous = _matching(self._previous, params)
        reference = _matching(self._stage_reference, params)
        pieces: list[tuple[Hashable, torch.Tensor, Any]] = []
        for name, p in params:
            layer, local, spec = layer_of(name), local_part(p).detach(), shard_spec(p)
            pieces.append(((layer, "norm"), local, spec))
            for kind, snapshot in (("update", previous), ("stage", reference)):
                if name in snapshot:
                    # in the weights' own dtype: the difference of two nearby floats is exact
                    # (Sterbenz), and no full-precision copy of a large matrix is made
                    old = snapshot[name].to(local.device)
                    pieces.append(((layer, kind), local - old, spec))
                    pieces.append(((layer, f"{kind}_ref"), old, spec))
        squares = sum_of_squares(pieces)
        stats: dict[str, dict[str, float]] = {}
        for (layer, kind), value in squares.items():
            stats.setdefault(layer, {})
            if kind == "norm":
                stats[layer]["norm"] = math.sqrt(value)
            elif kind in ("update", "stage"):
                ref = squares[(layer, f"{kind}_ref")]
                ratio = math.sqrt(value / ref) if ref > 0 else float("nan")
                stats[layer]["update_ratio" if kind == "update" else "stage_change"] = ratio
        self.state.weight_stats = stats
        self.state.weight_step = self.state.step
        self._previous = self._snapshot(pl_module)
        if self._stage_reference_pending:
            self._stage_reference = self._previous
            self._stage_reference_pending = False
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
        self._val_started = time.perf_counter()

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_started is not None:
            self._paused += time.perf_counter() - self._val_started
            self._val_started = None

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._held_out = self._held_out.to(pl_module.device)
        self._held_out.reset()

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
        self._held_out.update(batch["domain"], loss_sum, tokens)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.val_loss or trainer.sanity_checking:
            return
        sums, tokens = self._held_out.compute()  # every rank: gathers across ranks
        self._held_out.reset()
        if tokens.numel() == 0 or float(tokens.sum()) == 0:
            return
        metrics: dict[str, float] = {}
        self.state.val_loss, self.state.val_ppl = {}, {}
        for index, (loss_sum, count) in enumerate(zip(sums.tolist(), tokens.tolist())):
            if count > 0:
                name = self._name(index)
                self.state.val_loss[name] = loss = loss_sum / count
                self.state.val_ppl[name] = ppl = _exp(loss)
                metrics[f"tsm/val_loss/{name}"], metrics[f"tsm/val_ppl/{name}"] = loss, ppl
        self.state.val_loss_avg = float(sums.sum() / tokens.sum())
        self.state.val_worst_domain = max(self.state.val_loss, key=self.state.val_loss.__getitem__)
        self.state.val_step = trainer.global_step
        metrics["tsm/val_loss_avg"] = self.state.val_loss_avg
        metrics["tsm/val_ppl_avg"] = _exp(self.state.val_loss_avg)
        metrics["tsm/val_loss_worst"] = self.state.val_loss[self.state.val_worst_domain]
        self._emit(trainer, trainer.global_step, metrics)

    # -- checkpoint state ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        snapshots = None
        if self.checkpoint_snapshots and self._module is not None and not any(
                isinstance(p, DTensor) for p in self._module.parameters()):
            snapshots = {"previous": self._previous, "stage": self._stage_reference}
        return {"format": RUN_FILES_FORMAT, "state": self.state.to_dict(),
                "spike_window": list(self.spikes.window), "anomaly_count": self.anomaly_count,
                "stage_reference_pending": self._stage_reference_pending, "snapshots": snapshots,
                "domain_tables": self._gathered_domain_tables()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = TrainingState.from_dict(state_dict["state"])
        self.spikes.window.clear()
        self.spikes.window.extend(state_dict["spike_window"])
        self.anomaly_count = state_dict["anomaly_count"]
        snapshots = state_dict.get("snapshots")
        self._restored_tables = state_dict.get("domain_tables")  # applied in on_train_start
        if snapshots is not None:
            self._previous = dict(snapshots["previous"])
            self._stage_reference = dict(snapshots["stage"])
            self._stage_reference_pending = state_dict.get("stage_reference_pending", False)
        else:
            # Sharded weights: snapshots are not checkpointed. Update ratios restart at the
            # next check; so does the stage reference when no stage was named, while a named
            # stage's stage_change waits for the next stage boundary.
            self._previous, self._stage_reference = {}, {}
            self._stage_reference_pending = self.state.stage is None

    def _gathered_domain_tables(self) -> list[list[list[float]]] | None:
        """Every rank's per-domain table of the current train-loss interval (its own samples
        since the last emission), rank 0's first, as exact float64 values. A checkpoint
        falls anywhere inside an interval; restoring each rank's own part makes the
        interval's losses, and so every policy decision taken on them, bitwise those of an
        uninterrupted run. Collective under several processes: Lightning builds a
        checkpoint's callback state on every rank."""
        if self._domain_table is None:
            return None
        trainer = getattr(self._module, "_trainer", None) if self._module is not None else None
        table = self._domain_table.detach()
        if trainer is None or trainer.world_size == 1:
            return [table.tolist()]
        size = torch.tensor([float(table.shape[0])], device=table.device)
        size = int(trainer.strategy.reduce(size, reduce_op="max").item())
        gathered = trainer.strategy.all_gather(_grown(table.clone(), size, 3, table.device))
        return [part.tolist() for part in gathered]

    def _restore_domain_table(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Each rank takes back its own part of the interval's table; on another world size
        (the parts cannot be reassigned) rank 0 takes their sum, so the interval's totals
        still hold."""
        tables, self._restored_tables = self._restored_tables, None
        if not tables:
            return
        parts = torch.tensor(tables, dtype=torch.float64)  # (ranks, domains, 3)
        if len(parts) == trainer.world_size:
            table = parts[trainer.global_rank]
        elif trainer.global_rank == 0:
            table = parts.sum(0)
        else:
            table = torch.zeros_like(parts[0])
        self._domain_table = table.to(pl_module.device)

    # -- plumbing ------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._step_loss, self._step_batches, self._grad_groups = 0.0, 0, {}
        if self._step_presence is not None:
            self._step_presence.zero_()

    def _name(self, index: int) -> str:
        if self._names is not None and index < len(self._names):
            return self._names[index]
        return f"domain_{index}"

    def _sum_over_ranks(self, trainer: Trainer, table: torch.Tensor,
                        per_domain: bool = True) -> torch.Tensor:
        """All-reduce (sum). A per-domain table may be shorter on some ranks when the domain
        names are not known (a rank has not seen the last domains yet): lengths are agreed
        first. The input may be modified in place."""
        if trainer.world_size == 1:
            return table
        if per_domain and self._names is None:
            size = torch.tensor([float(table.shape[0])], device=table.device)
            size = int(trainer.strategy.reduce(size, reduce_op="max").item())
            columns = table.shape[1] if table.dim() == 2 else None
            table = _grown(table, size, columns, table.device)
        return trainer.strategy.reduce(table, reduce_op="sum")

    def _emit(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if not metrics:
            return
        for key, value in metrics.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if self._metrics_file is not None:
            self._metrics_file.write({"step": step, "time": time.time(), **metrics})

    def _write_event(self, event: dict[str, Any]) -> None:
        if self._events_file is not None:
            self._events_file.write(event)
        elif self.run_dir is None:  # not set up yet: written when the run files open
            self._pending_events.append(event)

    def _on_mixture_change(self, change: Any) -> None:
        record = _change_dict(change)
        step = record.pop("step", None)
        self._write_event({"kind": "mixture", "step": self.state.step if step is None else step,
                           "time": time.time(), **record})

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)


def _due(every: int | None, step: int) -> bool:
    return every is not None and step > 0 and step % every == 0


def _same(a: Any, b: Any) -> bool:
    """Lightning hands hooks a wrapped optimizer; compare what it wraps."""
    return getattr(a, "optimizer", a) is getattr(b, "optimizer", b)


def _mixture(trainer: Trainer) -> Any:
    mixture = getattr(getattr(trainer, "datamodule", None), "mixture", None)
    return mixture if mixture is not None and hasattr(mixture, "weights") else None


def _change_dict(change: Any) -> dict[str, Any]:
    return {key: getattr(change, key) for key in ("batch_index", "weights", "reason", "step",
                                                  "extra") if hasattr(change, key)}


def _replication(trainer: Trainer) -> int:
    """How many ranks see the same batch (a tensor-parallel group): world size over the
    data-parallel size the strategy gives its samplers."""
    try:
        replicas = trainer.strategy.distributed_sampler_kwargs["num_replicas"]
    except (AttributeError, KeyError, TypeError, AssertionError):
        return 1
    return max(1, trainer.world_size // max(1, int(replicas)))


def _grown(table: torch.Tensor | None, size: int, columns: int | None,
           device: torch.device) -> torch.Tensor:
    shape = (size,) if columns is None else (size, columns)
    if table is None:
        return torch.zeros(shape, dtype=torch.float64, device=device)
    if table.shape[0] >= size:
        return table
    grown = torch.zeros(shape, dtype=table.dtype, device=table.device)
    grown[: table.shape[0]] = table
    return grown


def _matching(snapshot: dict[str, torch.Tensor],
              params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The snapshot entries still shaped like their parameter's local shard (a resume on
    another world size changes the shards; those entries are dropped)."""
    return {name: snapshot[name] for name, p in params
            if name in snapshot and snapshot[name].shape == local_part(p).shape}


def _exp(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


__all__ = ["RUN_FILES_FORMAT", "HeldOutLoss", "SpikeDetector", "TrainingStateMonitor",
           "layer_of", "next_token_loss", "squares_on_device", "sum_of_squares", "throughput"]
