"""The Adaptive Training Engine (ATE): changes the data mixture while the model trains.

It only decides. What it reads is the ``TrainingState`` that the Training State Monitor
publishes (reduced across ranks, so every rank takes the same decision without talking to
the others); what it changes goes through the Mixture contract
(``trainer.datamodule.mixture.set_weights``, ``lightning_aquila.mixture_protocol``: what the
mixture offers beyond it is found once, at setup); how it decides is a
:class:`~lightning_aquila.callbacks.policies.MixturePolicy`.

**Ordering rule.** The engine acts in ``on_train_batch_end``, once per optimizer step, on the
state the monitor updated in its own ``on_train_batch_end`` of the same step. Lightning runs
callbacks in list order, so the monitor must be listed before the engine; the engine checks
this when training starts and, at every step, that the state it reads is the current step's.
Either failure raises :class:`EngineOrderError` naming what to fix.

**Rollback.** On a loss spike or a non-finite loss that the monitor flags, the engine can
restore the model and optimizer from the newest checkpoint written before the anomaly and go
on. The data position, step counter, learning-rate schedule, loggers and checkpoint names
keep counting forward; see ``docs/engine.md`` for why. Finding that checkpoint and restoring
from it is ``rollback.py``; what the policies decide is ``policies/``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_aquila.callbacks.policies import MixturePolicy
from lightning_aquila.callbacks.rollback import (
    CheckpointFinder,
    RollbackError,
    checkpoint_dirs,
    restore_model_and_optimizer,
)
from lightning_aquila.callbacks.state import Anomaly, TrainingState
from lightning_aquila.domain_weights import project_to_bounds
from lightning_aquila.mixture_protocol import MixtureAccess
from lightning_aquila.quality_temperature import temperatures
from lightning_aquila.tracking.run_files import jsonable
from lightning_aquila.tracking.run_log import RunLog

#: Weights closer than this to the current ones are not a change.
WEIGHT_TOLERANCE = 1e-9
#: Anomaly kinds the engine knows how to roll back from.
ROLLBACK_KINDS = ("spike", "nonfinite_loss", "nonfinite_grad")


class EngineOrderError(RuntimeError):
    """The engine cannot read a current ``TrainingState``: no monitor, or it runs too late."""


class AdaptiveTrainingEngine(Callback):
    """Applies a mixture policy's weights, runs data stages, rolls back from loss spikes.

    Args:
        policy: the :class:`MixturePolicy` (``StaticMixture``, ``StagedMixture``,
            ``ExcessLossMixture``, ``BanditMixture``, or your own); ``None`` leaves the mixture
            to the datamodule (useful for rollback alone).
        monitor: the Training State Monitor to read; default: the first callback in
            ``trainer.callbacks`` that has a ``TrainingState`` as ``state``. The engine
            records its changes, stages and rollbacks in the monitor's ``run_log``.
        rollback: restore model and optimizer from the last good checkpoint when the monitor
            flags one of ``rollback_on`` at the current step.
        rollback_on: anomaly kinds that trigger a rollback (``"spike"``, ``"nonfinite_loss"``,
            ``"nonfinite_grad"``). Under fp16 the grad scaler already skips steps with
            non-finite gradients, hence the default leaves ``"nonfinite_grad"`` out.
        max_rollbacks: rollbacks allowed within ``rollback_window`` steps; one more anomaly in
            that window stops training with :class:`RollbackError`.
        rollback_window: the window, in optimizer steps, that ``max_rollbacks`` counts in.
        min_checkpoint_age: the checkpoint restored is the newest one at a step at most
            ``anomaly step - min_checkpoint_age``.
        skip_batches: batches after the spike to skip as well, through the mixture's
            ``skip_batches`` (recorded, so a resume skips them too). The batches between the
            checkpoint and the spike are never replayed in any case.
        downweight_factor: multiply the weight of the domains in the offending batches by this
            factor (cumulative over rollbacks, kept for the rest of the run and applied on top
            of every policy proposal, within the policy's bounds); ``None``: leave them.
    """

    def __init__(
        self,
        policy: MixturePolicy | None = None,
        monitor: Callback | None = None,
        rollback: bool = False,
        rollback_on: Sequence[str] = ("spike", "nonfinite_loss"),
        max_rollbacks: int = 3,
        rollback_window: int = 1000,
        min_checkpoint_age: int = 1,
        skip_batches: int = 0,
        downweight_factor: float | None = None,
    ) -> None:
        unknown = [k for k in rollback_on if k not in ROLLBACK_KINDS]
        if unknown:
            raise ValueError(f"AdaptiveTrainingEngine(rollback_on={list(rollback_on)!r}): "
                             f"unknown kind(s) {unknown}; use {list(ROLLBACK_KINDS)}")
        for name, value, low in (("max_rollbacks", max_rollbacks, 0),
                                 ("rollback_window", rollback_window, 1),
                                 ("min_checkpoint_age", min_checkpoint_age, 1),
                                 ("skip_batches", skip_batches, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"AdaptiveTrainingEngine({name}={value!r}) must be an integer "
                                 f">= {low}")
        if downweight_factor is not None and not 0.0 < downweight_factor <= 1.0:
            raise ValueError(f"AdaptiveTrainingEngine(downweight_factor={downweight_factor!r}) "
                             "must be in (0, 1]")
        self.policy = policy
        self.monitor = monitor
        self.rollback = rollback
        self.rollback_on = tuple(rollback_on)
        self.max_rollbacks = max_rollbacks
        self.rollback_window = rollback_window
        self.min_checkpoint_age = min_checkpoint_age
        self.skip_batches = skip_batches
        self.downweight_factor = downweight_factor

        #: Every change this engine made: {step, batch_index, weights or quality_temperature,
        #: reason, policy, stage}.
        self.changes: list[dict[str, Any]] = []
        #: Every rollback: {step, anomaly, loss, domains, checkpoint, restored_step, skipped...}.
        self.rollbacks: list[dict[str, Any]] = []
        #: Stages entered: {name, step, reason}.
        self.stages: list[dict[str, Any]] = []
        self.penalties: dict[str, float] = {}  # domain -> multiplier (downweight_factor ** n)
        self._last_step: int | None = None
        self._anomalies_through = -1  # the newest anomaly step already considered
        self._resume_reasons: list[str] = []  # why a resume starts a new stage
        self._saved_history_length: int | None = None
        self._checkpoints = CheckpointFinder()
        self._base: dict[str, float] | None = None  # the last weights before penalties
        self._trainer: Trainer | None = None
        self._run_log: RunLog | None = None  # the monitor's, found at setup
        self._data: MixtureAccess | None = None  # trainer.datamodule.mixture, found at setup

    # -- finding the parts -------------------------------------------------------------------
    def _find_monitor(self, trainer: Trainer) -> Callback:
        if self.monitor is not None:
            return self.monitor
        for callback in trainer.callbacks:
            if callback is not self and isinstance(getattr(callback, "state", None),
                                                   TrainingState):
                return callback
        raise EngineOrderError(
            "AdaptiveTrainingEngine needs a TrainingStateMonitor in trainer.callbacks, listed "
            "before the engine (it reads the TrainingState the monitor publishes); none found "
            f"among {[type(c).__name__ for c in trainer.callbacks]}"
        )

    @staticmethod
    def _find_mixture(trainer: Trainer) -> MixtureAccess:
        datamodule = getattr(trainer, "datamodule", None)
        found = MixtureAccess.of(datamodule, "AdaptiveTrainingEngine")
        if found is None:
            raise ValueError(
                "AdaptiveTrainingEngine changes the data through trainer.datamodule.mixture "
                "(domains, weights, set_weights); the datamodule "
                f"{type(datamodule).__name__} has none"
            )
        return found

    @property
    def _mixture(self) -> MixtureAccess:
        if self._data is None:
            raise EngineOrderError("AdaptiveTrainingEngine has no mixture yet (before fit)")
        return self._data

    def _state(self) -> TrainingState:
        if self.monitor is None:
            raise EngineOrderError("AdaptiveTrainingEngine has no monitor yet (before fit)")
        return self.monitor.state

    # -- start -------------------------------------------------------------------------------
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._trainer = trainer
        if stage != "fit":
            return
        self.monitor = self._find_monitor(trainer)
        self._data = self._find_mixture(trainer)
        self._run_log = getattr(self.monitor, "run_log", None)
        if self._run_log is None:  # a monitor of another kind: log to the loggers only
            self._run_log = RunLog()
            self._run_log.open(Path(trainer.default_root_dir), write=False)
        callbacks = list(trainer.callbacks)
        if self.monitor in callbacks and self in callbacks and (
                callbacks.index(self.monitor) > callbacks.index(self)):
            raise EngineOrderError(
                f"AdaptiveTrainingEngine is listed at position {callbacks.index(self)} of "
                f"trainer.callbacks but its {type(self.monitor).__name__} at position "
                f"{callbacks.index(self.monitor)}: list the monitor first, so that the state "
                "the engine reads in on_train_batch_end is the one of the same step"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Set the policy's weights before the first batch is drawn, and name the stage: the
        policy's first one on a fresh run, a new one on a resume whose policy or mixture
        configuration changed (see ``load_state_dict``)."""
        mixture = self._mixture
        step = trainer.global_step
        self._last_step = step
        self._anomalies_through = step  # earlier anomalies belong to an earlier session
        if self._saved_history_length is not None:  # resumed: did the datamodule's YAML move?
            history = mixture.history()
            self._resume_reasons += [str(c.reason) for c in history[self._saved_history_length:]
                                     if str(getattr(c, "reason", "")).startswith("resume:")]
        reason = "; ".join(self._resume_reasons) or (None if self.stages else "start")
        if self._resume_reasons:
            self._base = None  # penalties now apply to the new configuration
        self._resume_reasons = []
        if self.policy is not None:
            self.policy.setup(mixture.domains, mixture.natural_weights(),
                              unique_tokens=mixture.unique_tokens(),
                              budget_tokens=mixture.budget_tokens(trainer.max_steps))
            self._update(trainer, "start", stage_reason=reason)
        elif reason is not None:
            self._enter_stage(trainer, "initial" if reason == "start" else f"resume@{step}",
                              reason)

    # -- every optimizer step ----------------------------------------------------------------
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return  # accumulating gradients: no optimizer step yet
        self._last_step = step
        state = self._state()
        if state.step != step:
            raise EngineOrderError(
                f"AdaptiveTrainingEngine at step {step} reads a TrainingState of step "
                f"{state.step}: the {type(self.monitor).__name__} must run its "
                "on_train_batch_end before the engine (list it first in trainer.callbacks)"
            )
        if self.rollback:
            # New anomalies: of this step, or of the previous one when the monitor reads its
            # checks a step late (deferred_checks); steps only grow, rollbacks included.
            offending = [a for a in state.anomalies
                         if a.step > self._anomalies_through and a.kind in self.rollback_on]
            self._anomalies_through = max([self._anomalies_through,
                                           *(a.step for a in state.anomalies)])
            if offending:
                self._roll_back(trainer, pl_module, offending[0])
                # Steps up to now trained on the weights just thrown away (the monitor, told
                # by the rollback event, does not read this step's deferred check either).
                self._anomalies_through = step
                return
        if self.policy is not None and self.policy.due(step):
            self._update(trainer, "update")

    def _update(self, trainer: Trainer, why: str, stage_reason: str | None = None) -> None:
        """Ask the policy; record a stage when it enters one (or ``stage_reason`` says the run
        starts one), then apply its weights when they differ from the mixture's."""
        before = self.policy.stage
        proposal = self.policy.propose(self._state(), self._mixture.weights)
        stage = self.policy.stage
        policy = self.policy.name
        if stage_reason is not None:
            name = stage or (policy if stage_reason == "start"
                             else f"resume@{trainer.global_step}")
            if self.stages and self.stages[-1]["name"] == name:
                name = f"{name} (resumed@{trainer.global_step})"
            self._enter_stage(trainer, name, stage_reason)
        elif stage is not None and stage != before:
            self._enter_stage(trainer, stage, f"{policy}: stage {stage}")
        reason = f"{policy}: " + (f"stage {stage}" if stage else why)
        if proposal is not None:
            self._apply(trainer, proposal, reason)
        if self.policy.quality_temperature is not None:
            self._apply_temperature(trainer, self.policy.quality_temperature, reason)

    def _apply_temperature(self, trainer: Trainer, temperature: Any, reason: str) -> None:
        """Set the quality temperature the policy wants, unless it is the one in force; log
        and record it like a weight change (the mixture stamps it with a batch index)."""
        mixture = self._mixture
        policy = self._policy_name()
        current = mixture.quality_temperature()
        if current is None:
            raise ValueError(f"AdaptiveTrainingEngine: {policy} sets a quality "
                             f"temperature ({temperature!r}) but the data is not sampled by "
                             "score; give the datamodule quality: {score: ...}")
        wanted = temperatures(temperature, mixture.domains, f"{policy} quality temperature",
                              current=current)
        if wanted == current:
            return
        step = trainer.global_step
        change = mixture.set_quality_temperature(wanted, reason, step=step, policy=policy,
                                                 stage=self._stage_name())
        self._record(trainer, step, change, "quality_temperature", dict(wanted), reason,
                     {f"ate/quality_temperature/{d}": float(t)  # none: no reweighting
                      for d, t in wanted.items() if t is not None}, "quality_temperature",
                     policy)

    def _apply(self, trainer: Trainer, weights: Mapping[str, float], reason: str,
               **extra: Any) -> dict[str, Any] | None:
        """Set ``weights`` (times the rollback penalties, within the policy's bounds) on the
        mixture, unless they are the current ones; log and record the change."""
        mixture = self._mixture
        self._base = dict(weights)
        if self.penalties:
            weights = {d: w * self.penalties.get(d, 1.0) for d, w in weights.items()}
            total = sum(weights.values())
            weights = {d: w / total for d, w in weights.items()}
            if self.policy is not None:
                weights = project_to_bounds(weights, self.policy.min_weight,
                                            self.policy.max_weight)
        current = mixture.weights
        if all(abs(weights.get(d, 0.0) - current.get(d, 0.0)) <= WEIGHT_TOLERANCE
               for d in set(weights) | set(current)):
            return None
        step = trainer.global_step
        policy = self._policy_name()
        total = sum(weights.values())
        if math.isfinite(total) and total > 0:  # else the mixture raises, naming the values
            weights = {d: w / total for d, w in weights.items()}
        change = mixture.set_weights(dict(weights), reason, step=step, policy=policy,
                                     stage=self._stage_name(), **extra)
        applied = dict(getattr(change, "weights", weights))
        # an observable mixture's change is recorded by the monitor, which listens to it
        return self._record(trainer, step, change, "weights", applied, reason,
                            {f"ate/weight/{d}": float(w) for d, w in applied.items()},
                            None if mixture.observable else "mixture", policy, **extra)

    def _record(self, trainer: Trainer, step: int, change: Any, field: str, value: Any,
                reason: str, metrics: dict[str, float], event: str | None,
                policy: str | None, **extra: Any) -> dict[str, Any]:
        """Keep a change the mixture made (``field``: what changed, to ``value``, asked by
        ``policy``: the name the caller already gave the mixture) in ``changes``, log
        ``metrics`` with the change count and, with ``event``, write it to the run's event
        log."""
        record = {"step": step, "batch_index": getattr(change, "batch_index", None),
                  field: value, "reason": reason, "policy": policy,
                  "stage": self._stage_name(), **extra}
        self.changes.append(record)
        self._log(trainer, metrics | {"ate/changes": float(len(self.changes))}, step)
        if event is not None:
            self._event(event, step, **{k: v for k, v in record.items() if k != "step"})
        return record

    def _enter_stage(self, trainer: Trainer, name: str, reason: str) -> None:
        step = trainer.global_step
        self.stages.append({"name": name, "step": step, "reason": reason})
        self._event("stage", step, name=name, reason=reason, policy=self._policy_name())
        self._log(trainer, {"ate/stage": float(len(self.stages) - 1)}, step)
        rank_zero_info(f"AdaptiveTrainingEngine: stage {name!r} from step {step} ({reason})")

    def _policy_name(self) -> str | None:
        """The policy's name as changes and events record it (``None`` without a policy)."""
        return self.policy.name if self.policy is not None else None

    def _stage_name(self) -> str | None:
        return self.stages[-1]["name"] if self.stages else None

    # -- rollback ----------------------------------------------------------------------------
    def _roll_back(self, trainer: Trainer, pl_module: LightningModule, anomaly: Anomaly) -> None:
        recent = [r for r in self.rollbacks if r["step"] > anomaly.step - self.rollback_window]
        what = (f"{anomaly.kind} at step {anomaly.step} (loss {anomaly.value:.6g}, domains "
                f"{anomaly.domains})")
        if len(recent) >= self.max_rollbacks:
            last = recent[-1] if recent else None
            raise RollbackError(
                f"{what} after {len(recent)} rollback(s) within the last {self.rollback_window} "
                f"steps (max_rollbacks={self.max_rollbacks})"
                + (f"; the last one restored {last['checkpoint']} (step {last['restored_step']})"
                   if last else "")
                + ". Stopping: lower the learning rate, inspect the data of those domains, or "
                "raise max_rollbacks"
            )
        found = self._checkpoints.newest(trainer, anomaly.step - self.min_checkpoint_age)
        if found is None:
            message = (f"{what}: no checkpoint at step <= {anomaly.step - self.min_checkpoint_age}"
                       f" to roll back to in {checkpoint_dirs(trainer)}")
            if anomaly.kind != "spike":
                raise RollbackError(message + "; save checkpoints more often "
                                    "(ModelCheckpoint(every_n_train_steps=...))")
            rank_zero_warn(f"AdaptiveTrainingEngine: {message}; training goes on")
            return
        path, restored_step = found
        position = self._data_position(self._state())
        checkpoint = restore_model_and_optimizer(trainer, pl_module, path)
        saved = checkpoint.get("callbacks", {}).get(self.state_key, {})
        # Trained on by the abandoned steps, never by the restored model: [start, stop).
        replaced = {"start": saved.get("data_position"), "stop": position}
        record: dict[str, Any] = {
            "step": anomaly.step, "anomaly": anomaly.kind, "loss": anomaly.value,
            "zscore": anomaly.zscore, "domains": list(anomaly.domains),
            "checkpoint": path, "restored_step": restored_step,
            "undone_steps": {"start": restored_step + 1, "stop": anomaly.step + 1},
            "skipped_batches": replaced, "skipped_ahead": None,
        }
        mixture = self._mixture
        skip = (mixture.skip_batches(self.skip_batches, f"rollback: {anomaly.kind}",
                                     anomaly.step) if self.skip_batches else None)
        if skip is not None:
            record["skipped_ahead"] = {"start": skip[0], "stop": skip[1]}
        elif self.skip_batches:
            rank_zero_warn("AdaptiveTrainingEngine(skip_batches=...): the mixture has no "
                           "skip_batches(); only the batches since the checkpoint are skipped")
        self.rollbacks.append(record)
        self._event("rollback", anomaly.step,
                    **{k: v for k, v in record.items() if k != "step"})
        self._log(trainer, {"ate/rollbacks": float(len(self.rollbacks))}, anomaly.step)
        rank_zero_warn(
            f"AdaptiveTrainingEngine: {what}: restored model and optimizer from {path} (step "
            f"{restored_step}); batches [{replaced['start']}, {replaced['stop']}) are not replayed"
            + (f", [{record['skipped_ahead']['start']}, {record['skipped_ahead']['stop']}) "
               "skipped" if record["skipped_ahead"] else "")
        )
        if self.downweight_factor is not None and self.downweight_factor < 1.0 and (
                anomaly.domains):
            for domain in anomaly.domains:
                self.penalties[domain] = self.penalties.get(domain, 1.0) * self.downweight_factor
            self._apply(trainer, self._base or mixture.weights,
                        f"rollback: down-weight {anomaly.domains}", rollback=len(self.rollbacks))

    # -- logging: through the monitor's run log ----------------------------------------------
    def _event(self, kind: str, step: int, **fields: Any) -> None:
        self._run_log.event(kind, step, **fields)

    def _log(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        self._run_log.log_metrics(trainer, step, metrics)

    def _data_position(self, state: TrainingState) -> int:
        """Batches consumed so far: the mixture's own count when it has one (``DomainMixture``:
        the sampler's global batch index, skips included), else the monitor's per-rank count."""
        consumed = self._data.consumed_batches() if self._data is not None else None
        return int(consumed) if consumed is not None else int(state.batch_index)

    # -- checkpoint state --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        policy = None
        if self.policy is not None:
            policy = {"class": _qualname(self.policy), "config": jsonable(self.policy.config()),
                      "state": self.policy.state_dict()}
        return {
            "policy": policy,
            "changes": [dict(c) for c in self.changes],
            "rollbacks": [dict(r) for r in self.rollbacks],
            "stages": [dict(s) for s in self.stages],
            "penalties": dict(self.penalties),
            "base_weights": None if self._base is None else dict(self._base),
            "data_position": (self._data_position(self.monitor.state)
                              if trainer is not None and self.monitor is not None else None),
            "mixture_history_length": len(self._data.history()) if self._data else 0,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume. The same policy (class and arguments) continues from its saved state; a
        different one starts fresh, and the run enters a new stage when training starts."""
        self.changes = [dict(c) for c in state_dict.get("changes", [])]
        self.rollbacks = [dict(r) for r in state_dict.get("rollbacks", [])]
        self.stages = [dict(s) for s in state_dict.get("stages", [])]
        self.penalties = dict(state_dict.get("penalties", {}))
        self._base = state_dict.get("base_weights")
        self._saved_history_length = state_dict.get("mixture_history_length")
        saved = state_dict.get("policy")
        if self.policy is None:
            if saved is not None:
                self._resume_reasons.append(f"policy removed (was {saved['class']})")
            return
        mine = {"class": _qualname(self.policy), "config": jsonable(self.policy.config())}
        if saved is not None and saved["class"] == mine["class"] and (
                _canonical(saved["config"]) == _canonical(mine["config"])):
            self.policy.load_state_dict(saved["state"])
        elif saved is None:
            self._resume_reasons.append(f"policy {self.policy!r} added")
        else:
            self._resume_reasons.append(
                f"policy changed from {saved['class'].rsplit('.', 1)[-1]}"
                f"({_brief(saved['config'])}) to {self.policy!r}")


# -- helpers -----------------------------------------------------------------------------------
def _qualname(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _canonical(config: Any) -> str:
    return json.dumps(jsonable(config), sort_keys=True)


def _brief(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in config.items())


__all__ = ["AdaptiveTrainingEngine", "EngineOrderError", "RollbackError"]
