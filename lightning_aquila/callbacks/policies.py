"""Mixture policies: how the Adaptive Training Engine turns a ``TrainingState`` into weights.

A policy is a small object behind one interface (:class:`MixturePolicy`): every
``update_every`` optimizer steps the engine calls ``propose(state, current)`` with the TSM's
rank-reduced state and the mixture's current weights, and the policy returns new weights or
``None`` (keep them). Policies never touch the data or the trainer, so they are tested on a
constructed ``TrainingState`` and the same decision is taken on every rank.

Every policy is deterministic given the states it has been shown (none draws random
numbers: the sampler does the sampling), keeps its internal state in ``state_dict`` (the
engine puts it into every checkpoint), and keeps each weight within ``[min_weight,
max_weight]`` by a Euclidean projection onto the bounded simplex. Constructor arguments are
plain types, so each policy is selectable from YAML as ``class_path``/``init_args``.

The update rules, with formulas, are in ``docs/engine.md``. The weight arithmetic every policy
shares (bounds, normalisation, the projection) is in ``weights.py``; AioliMixture, the one
policy with a schedule of its own, is in ``aioli.py``. The rest stay here because each is a
short class over the same interface.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.callbacks.weights import (
    Bound,
    as_number,
    check_bound,
    check_weight_spec,
    normalized,
    per_domain_bounds,
    project_to_bounds,
    resolve_weights,
)


# -- the interface -----------------------------------------------------------------------------
class MixturePolicy(ABC):
    """Decides the domain weights from the training state.

    Args:
        update_every: optimizer steps between two ``propose`` calls by the engine (it also
            asks once when training starts, so a policy's weights hold from the first batch).
        min_weight, max_weight: bounds on each domain's weight, one number for all domains
            or a mapping ``domain -> bound`` (unlisted domains: 0 and 1).
    """

    def __init__(self, update_every: int = 1, min_weight: Bound = 0.0,
                 max_weight: Bound = 1.0) -> None:
        if not isinstance(update_every, int) or isinstance(update_every, bool) or (
                update_every < 1):
            raise ValueError(f"{type(self).__name__}(update_every={update_every!r}) must be a "
                             "positive number of steps")
        for what, bound in (("min_weight", min_weight), ("max_weight", max_weight)):
            check_bound(bound, f"{type(self).__name__}({what})")
        self.update_every = update_every
        self.min_weight = dict(min_weight) if isinstance(min_weight, Mapping) else min_weight
        self.max_weight = dict(max_weight) if isinstance(max_weight, Mapping) else max_weight
        self.domains: list[str] | None = None
        self.natural: dict[str, float] | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    @property
    def stage(self) -> str | None:
        """The name of the data stage in force, for policies that have stages."""
        return None

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None) -> None:
        """Called by the engine when training starts: the mixture's domains and, when the
        datamodule knows them, each domain's training tokens in the corpus. Also checks the
        bounds can be met. Subclasses extend it to check their domain names."""
        self.domains = list(domains)
        self.natural = dict(natural) if natural else None
        try:
            project_to_bounds(dict.fromkeys(self.domains, 1.0 / len(self.domains)),
                              self.min_weight, self.max_weight)
        except ValueError as exc:
            raise ValueError(f"{self.name}(min_weight={self.min_weight!r}, max_weight="
                             f"{self.max_weight!r}) over domains {self.domains}: {exc}") from None
        self._warn_if_pinned()

    def _warn_if_pinned(self) -> None:
        """Bounds that sum to exactly 1 (two domains under ``max_weight=0.5``, say) leave
        one feasible mixture: the policy runs but can never move the weights."""
        lo = per_domain_bounds(self.min_weight, self.domains, 0.0, "min_weight")
        hi = per_domain_bounds(self.max_weight, self.domains, 1.0, "max_weight")
        pinned = hi if abs(hi.sum() - 1.0) <= 1e-9 else lo if abs(lo.sum() - 1.0) <= 1e-9 else None
        if pinned is None or len(self.domains) < 2:
            return
        bound = "max_weight" if pinned is hi else "min_weight"
        warnings.warn(
            f"{self.name}(min_weight={self.min_weight!r}, max_weight={self.max_weight!r}) over "
            f"{len(self.domains)} domains allows only one mixture, "
            f"{ {d: round(float(w), 6) for d, w in zip(self.domains, pinned)} }: the policy "
            f"cannot change the weights. {'Raise' if pinned is hi else 'Lower'} {bound} "
            f"({'above' if pinned is hi else 'below'} {1 / len(self.domains):.3g} for equal "
            "bounds) to give it room.", UserWarning, stacklevel=3)

    def due(self, step: int) -> bool:
        return step > 0 and step % self.update_every == 0

    def propose(self, state: TrainingState, current: Mapping[str, float]
                ) -> dict[str, float] | None:
        """New weights within the bounds (summing to 1), or ``None`` to keep ``current``."""
        if self.domains is None or set(self.domains) != set(current):
            self.setup(list(current), self.natural)
        weights = self._propose(state, {d: float(current[d]) for d in self.domains})
        return None if weights is None else self.bounded(weights)

    @abstractmethod
    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        """The policy's rule; its result is normalised and bounded by ``propose``."""

    def bounded(self, weights: Mapping[str, float]) -> dict[str, float]:
        return project_to_bounds(normalized(weights, self.name), self.min_weight,
                                 self.max_weight)

    def config(self) -> dict[str, Any]:
        """The constructor arguments: a resume compares them to tell a changed policy."""
        return {"update_every": self.update_every, "min_weight": self.min_weight,
                "max_weight": self.max_weight}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 (stateless)
        pass

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{self.name}({args})"


# -- the policies ------------------------------------------------------------------------------
class StaticMixture(MixturePolicy):
    """Fixed weights: the baseline.

    Args:
        weights: a mapping ``domain -> weight`` (rescaled to sum to 1, unlisted domains 0),
            ``"uniform"``, or ``"natural"``: proportional to each domain's training tokens in
            the corpus, which the engine reads from the datamodule (``natural_weights()``, as
            ``DomainDataModule`` offers from its store's metadata). Without those counts it
            falls back to ``state.tokens_per_domain``, the tokens seen so far (the natural
            proportions only when training started from them), and keeps the current weights
            until the monitor has counted some.
    """

    def __init__(self, weights: Mapping[str, float] | str = "natural", update_every: int = 1,
                 min_weight: Bound = 0.0, max_weight: Bound = 1.0) -> None:
        super().__init__(update_every, min_weight, max_weight)
        check_weight_spec(weights, "StaticMixture(weights)")
        self.weights = dict(weights) if isinstance(weights, Mapping) else weights

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None) -> None:
        super().setup(domains, natural)
        resolve_weights(self.weights, self.domains, None, "StaticMixture(weights)")

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        counts = self.natural or {d: float(n) for d, n in state.tokens_per_domain.items()
                                  if d in current}
        return resolve_weights(self.weights, self.domains, counts, "StaticMixture(weights)")

    def config(self) -> dict[str, Any]:
        return {"weights": self.weights, **super().config()}


class StagedMixture(MixturePolicy):
    """The Aquila2 report's data stages (K6 → K61 → … → K65): a list of mixtures, each in
    force until a token count or a step.

    Args:
        stages: ``[{name, weights, until_tokens | until_step}, ...]`` in order. ``weights`` as
            for :class:`StaticMixture`. A stage ends once ``state.tokens >= until_tokens``
            (training tokens over all ranks, as the TSM counts them every
            ``train_loss_every_n_steps``) or ``state.step >= until_step``; the last stage may
            leave both out and runs to the end. Stages only move forward.
    """

    def __init__(self, stages: Sequence[Mapping[str, Any]], update_every: int = 1,
                 min_weight: Bound = 0.0, max_weight: Bound = 1.0) -> None:
        super().__init__(update_every, min_weight, max_weight)
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
            raise ValueError(f"StagedMixture(stages) must be a list of stages, got {stages!r}")
        if not stages:
            raise ValueError("StagedMixture(stages) needs at least one stage")
        self.stages = [self._checked(i, stage, last=i == len(stages) - 1)
                       for i, stage in enumerate(stages)]
        names = [s["name"] for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"StagedMixture(stages): stage names repeat: {names}")
        for kind in ("until_tokens", "until_step"):
            ends = [s[kind] for s in self.stages if s.get(kind) is not None]
            if ends != sorted(ends) or len(set(ends)) != len(ends):
                raise ValueError(f"StagedMixture(stages): {kind} must increase from stage to "
                                 f"stage, got {ends}")
        self.index = 0
        self.switches: list[dict[str, Any]] = []  # {stage, step, tokens}, one per stage entered

    @staticmethod
    def _checked(index: int, stage: Mapping[str, Any], last: bool) -> dict[str, Any]:
        where = f"StagedMixture(stages[{index}])"
        if not isinstance(stage, Mapping):
            raise ValueError(f"{where} must be a mapping with name, weights and until_tokens "
                             f"or until_step, got {stage!r}")
        unknown = set(stage) - {"name", "weights", "until_tokens", "until_step"}
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; use name, "
                             "weights, until_tokens, until_step")
        if "weights" not in stage:
            raise ValueError(f"{where} has no weights")
        check_weight_spec(stage["weights"], f"{where}.weights")
        ends = [k for k in ("until_tokens", "until_step") if stage.get(k) is not None]
        if len(ends) > 1:
            raise ValueError(f"{where} gives both until_tokens and until_step; give one")
        if not ends and not last:
            raise ValueError(f"{where} needs until_tokens or until_step (only the last stage "
                             "may run to the end)")
        for key in ends:
            if not isinstance(stage[key], int) or isinstance(stage[key], bool) or stage[key] <= 0:
                raise ValueError(f"{where}.{key} must be a positive integer, got "
                                 f"{stage[key]!r}")
        weights = stage["weights"]
        return {"name": str(stage.get("name", f"stage{index}")),
                "weights": dict(weights) if isinstance(weights, Mapping) else weights,
                **{k: int(stage[k]) for k in ends}}

    @property
    def stage(self) -> str:
        return self.stages[self.index]["name"]

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None) -> None:
        super().setup(domains, natural)
        for i, stage in enumerate(self.stages):
            resolve_weights(stage["weights"], self.domains, None,
                            f"StagedMixture(stages[{i}].weights)")

    def stage_at(self, state: TrainingState) -> int:
        """The index of the stage in force for ``state`` (never before the current one)."""
        index = self.index
        while index < len(self.stages) - 1 and self._ended(self.stages[index], state):
            index += 1
        return index

    @staticmethod
    def _ended(stage: Mapping[str, Any], state: TrainingState) -> bool:
        if stage.get("until_tokens") is not None:
            return state.tokens >= stage["until_tokens"]
        if stage.get("until_step") is not None:
            return state.step >= stage["until_step"]
        return False

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        index = self.stage_at(state)
        if index != self.index or not self.switches:
            self.index = index
            self.switches.append({"stage": self.stage, "step": state.step,
                                  "tokens": state.tokens})
        counts = self.natural or {d: float(n) for d, n in state.tokens_per_domain.items()
                                  if d in current}
        return resolve_weights(self.stages[self.index]["weights"], self.domains, counts,
                               f"StagedMixture(stages[{self.index}].weights)")

    def config(self) -> dict[str, Any]:
        return {"stages": self.stages, **super().config()}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "switches": [dict(s) for s in self.switches]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])
        self.switches = [dict(s) for s in state["switches"]]


def load_reference_losses(reference: Mapping[str, float] | str,
                          signal: Literal["train", "val"] = "train",
                          command: str | None = None) -> dict[str, float]:
    """Per-domain reference losses from a mapping, or from a file:

    * ``*.json`` / ``*.yaml`` / ``*.yml``: a mapping ``domain -> loss``;
    * ``*.jsonl``: a TSM ``metrics.jsonl`` of a reference run; the last finite
      ``tsm/val_loss/<domain>`` (``signal="val"``) or ``tsm/train_loss/<domain>``
      (``signal="train"``) of each domain.

    A missing file is a ``ValueError`` naming it and ``command``, the command that writes it
    (or, without one, what writes such a file).
    """
    if isinstance(reference, Mapping):
        source, raw = "ExcessLossMixture(reference)", dict(reference)
    elif not isinstance(reference, (str, os.PathLike)):
        raise ValueError(f"ExcessLossMixture(reference={reference!r}) must be a mapping "
                         "domain -> loss or the path of a .json/.yaml/.jsonl file")
    else:
        path = Path(reference)
        source = str(path)
        if not path.is_file():
            how = (f"create it with: {' '.join(command.split())}" if command else
                   "train the reference run first (its TrainingStateMonitor writes "
                   "<trainer.default_root_dir>/tsm/metrics.jsonl) or give a .json/.yaml "
                   "mapping domain -> loss")
            raise ValueError(f"ExcessLossMixture: the reference file {source} does not "
                             f"exist; {how}")
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            prefix = "tsm/val_loss/" if signal == "val" else "tsm/train_loss/"
            raw = {}
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line of a killed run
                if not isinstance(row, dict):
                    raise ValueError(f"{source}:{number}: expected a JSON object per line")
                for key, value in row.items():
                    name = key[len(prefix):]
                    if (key.startswith(prefix) and "/" not in name
                            and isinstance(value, (int, float)) and math.isfinite(value)):
                        raw[name] = float(value)
            if not raw:
                raise ValueError(f"{source} holds no {prefix}<domain> values")
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{source} must hold a mapping domain -> loss, got "
                             f"{type(raw).__name__}")
    losses: dict[str, float] = {}
    for domain, value in raw.items():
        try:
            loss = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: reference loss of {domain!r} is not a number: "
                             f"{value!r}") from None
        if not math.isfinite(loss):
            raise ValueError(f"{source}: reference loss of {domain!r} is not finite: {loss}")
        losses[str(domain)] = loss
    return losses


class ExcessLossMixture(MixturePolicy):
    r"""DoReMi-style online reweighting (Xie et al. 2023) by excess loss over a reference.

    At each update with a fresh loss signal, per domain ``i``:
    ``delta_i = max(loss_i - reference_i, 0)``, ``a_i <- a_i * exp(step_size * delta_i)``,
    normalise, then ``a <- (1 - smoothing) * a + smoothing / K``. The weights are ``a``,
    projected onto the bounds (``min_weight`` is the per-domain floor). ``a`` starts from the
    mixture's weights at the first update and lives in the checkpoint.

    Args:
        reference: per-domain reference losses: a mapping (loss targets), or a file
            (see :func:`load_reference_losses`): JSON/YAML mapping or a reference run's TSM
            ``metrics.jsonl``. It must cover every domain of the mixture.
        signal: ``"train"``: the TSM's per-domain training-loss EMA (``state.train_loss``,
            fresh when ``state.train_step`` moves); ``"val"``: the held-out loss
            (``state.val_loss``, fresh when ``state.val_step`` moves).
        step_size: the exponentiated-gradient step ``eta`` per nat of excess loss.
        smoothing: the mass ``c`` mixed in from the uniform distribution at every update.
        reference_command: the command that writes the ``reference`` file, quoted in the
            error if the file does not exist (e.g. the quickstart's reference run).
    """

    def __init__(self, reference: Mapping[str, float] | str,
                 signal: Literal["train", "val"] = "train", step_size: float = 1.0,
                 smoothing: float = 1e-3, update_every: int = 10, min_weight: Bound = 0.0,
                 max_weight: Bound = 1.0, reference_command: str | None = None) -> None:
        super().__init__(update_every, min_weight, max_weight)
        if signal not in ("train", "val"):
            raise ValueError(f"ExcessLossMixture(signal={signal!r}) must be 'train' or 'val'")
        if not as_number(step_size, "ExcessLossMixture(step_size)") > 0:
            raise ValueError(f"ExcessLossMixture(step_size={step_size!r}) must be positive")
        if not 0.0 <= as_number(smoothing, "ExcessLossMixture(smoothing)") <= 1.0:
            raise ValueError(f"ExcessLossMixture(smoothing={smoothing!r}) must be in [0, 1]")
        self.reference = dict(reference) if isinstance(reference, Mapping) else reference
        self.signal, self.step_size, self.smoothing = signal, float(step_size), float(smoothing)
        self.reference_command = reference_command
        self.reference_losses = load_reference_losses(reference, signal, reference_command)
        self.alpha: dict[str, float] | None = None
        self.last_signal_step: int | None = None
        self.updates = 0

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None) -> None:
        super().setup(domains, natural)
        missing = [d for d in self.domains if d not in self.reference_losses]
        if missing:
            raise ValueError(f"ExcessLossMixture: the reference ({self.reference!r}) has no "
                             f"loss for domain(s) {missing}: train the reference on this run's "
                             "domains")
        if self.alpha is not None:  # a resume with other domains: keep the ones that stayed
            kept = {d: self.alpha[d] for d in self.domains if d in self.alpha}
            fresh = 1.0 / len(self.domains)
            self.alpha = normalized({d: kept.get(d, fresh) for d in self.domains}, self.name)

    def excess(self, losses: Mapping[str, float]) -> dict[str, float]:
        """``max(loss - reference, 0)`` per domain; 0 where the loss is unknown or not
        finite (a spike's NaN must not steer the mixture)."""
        out = {}
        for d in self.domains:
            loss = losses.get(d)
            ok = loss is not None and math.isfinite(loss)
            out[d] = max(loss - self.reference_losses[d], 0.0) if ok else 0.0
        return out

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        signal_step = state.train_step if self.signal == "train" else state.val_step
        losses = state.train_loss if self.signal == "train" else state.val_loss
        if signal_step is None or signal_step == self.last_signal_step or not losses:
            return None
        self.last_signal_step = signal_step
        alpha = self.alpha or normalized(current, self.name)
        delta = self.excess(losses)
        # log-space update: exp of a large excess must not overflow
        logits = {d: math.log(max(alpha[d], 1e-300)) + self.step_size * delta[d]
                  for d in self.domains}
        top = max(logits.values())
        raw = {d: math.exp(v - top) for d, v in logits.items()}
        total = sum(raw.values())
        k = len(self.domains)
        self.alpha = {d: (1 - self.smoothing) * raw[d] / total + self.smoothing / k
                      for d in self.domains}
        self.updates += 1
        return dict(self.alpha)

    def config(self) -> dict[str, Any]:
        return {"reference": self.reference, "signal": self.signal,
                "step_size": self.step_size, "smoothing": self.smoothing, **super().config()}

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": None if self.alpha is None else dict(self.alpha),
                "last_signal_step": self.last_signal_step, "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.alpha = None if state["alpha"] is None else dict(state["alpha"])
        self.last_signal_step = state["last_signal_step"]
        self.updates = int(state["updates"])


class BanditMixture(MixturePolicy):
    r"""Online Data Mixing (Albalak et al. 2023): the domains are the arms of an EXP3 bandit
    whose reward is the per-domain training loss (a domain with more left to learn pays more).

    At an update at step ``t`` with a fresh loss signal, every domain ``i`` sampled since the
    last update (its token count moved) with mean loss ``l_i`` over that interval updates its
    smoothed reward ``R_i <- smoothing * R_i + (1 - smoothing) * l_i / p_i``, ``p_i`` being its
    weight while the losses were gathered (``importance_weighted=False`` drops ``/ p_i``).
    Then ``eps_t = min(1/K, sqrt(ln K / (K t)))`` and
    ``p_i = (1 - K eps_t) * softmax(eps_prev * R)_i + eps_t``, ``eps_prev`` being the
    previous update's ``eps`` (``1/K`` at the first), projected onto the bounds.

    As in ODM, ``t`` counts training steps, so exploration decays with training whatever
    ``update_every`` is. No randomness is needed: the sampler draws the domains from ``p``.

    Checked against the paper and its code (``megatron/data/data_sampling_utils.py``,
    ``Exp3WeightUpdater`` of github.com/alon-albalak/online-data-mixing); deliberate
    differences:

    * **Mixed batches, so no importance weighting by default.** In ODM each minibatch comes
      from one arm, so only that arm's loss is seen and ``loss / p_i`` is the unbiased
      estimate of the full reward vector (EXP3's bandit feedback). Here a batch mixes domains
      and every arm with a non-zero weight is observed in every update interval: that is full
      information, where dividing by ``p_i`` is a bias toward rare domains, not a correction.
      Measured (issue 11): starting from natural weights, the first update put the maximum
      weight on the smallest domain (1.5% of the tokens) and the run lost to uniform in every
      seed. ``importance_weighted=True`` keeps ODM's estimator for one-domain batches.
    * The reward is an exponential moving average of the observed losses (the paper's
      smoothed reward, ``smoothing`` = its ``alpha``); the code's variant sums ``loss / 10``.
    * ``warmup_steps`` as in the code's ``UpdateScheduler``: no update before that step.

    Args:
        smoothing: the moving-average weight ``alpha`` of the reward (ODM: 0.9).
        importance_weighted: divide each observed loss by the domain's probability (ODM's
            estimator, right only when a batch holds one domain).
        warmup_steps: keep the current weights until this step.
    """

    def __init__(self, smoothing: float = 0.9, importance_weighted: bool = False,
                 warmup_steps: int = 0, update_every: int = 10, min_weight: Bound = 0.0,
                 max_weight: Bound = 1.0) -> None:
        super().__init__(update_every, min_weight, max_weight)
        if not 0.0 <= as_number(smoothing, "BanditMixture(smoothing)") < 1.0:
            raise ValueError(f"BanditMixture(smoothing={smoothing!r}) must be in [0, 1)")
        if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or (
                warmup_steps < 0):
            raise ValueError(f"BanditMixture(warmup_steps={warmup_steps!r}) must be >= 0")
        self.smoothing, self.importance_weighted = float(smoothing), bool(importance_weighted)
        self.warmup_steps = warmup_steps
        self.rewards: dict[str, float] = {}
        self.tokens_seen: dict[str, int] = {}  # state.tokens_per_domain at the last update
        self.updates = 0
        self.epsilon: float | None = None  # the last update's eps: the next one's temperature

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None) -> None:
        super().setup(domains, natural)
        self.rewards = {d: self.rewards.get(d, 0.0) for d in self.domains}

    def exploration(self, t: int) -> float:
        k = len(self.domains)
        if t <= 0 or k == 1:
            return 1.0 / k
        return min(1.0 / k, math.sqrt(math.log(k) / (k * t)))

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        if state.step < self.warmup_steps:
            return None
        observed = [d for d in self.domains
                    if state.tokens_per_domain.get(d, 0) > self.tokens_seen.get(d, 0)
                    and d in state.train_loss_last and math.isfinite(state.train_loss_last[d])
                    and current[d] > 0]
        self.tokens_seen = {d: int(state.tokens_per_domain.get(d, 0)) for d in self.domains}
        if not observed:
            return None
        for d in observed:
            reward = state.train_loss_last[d]
            if self.importance_weighted:
                reward /= current[d]
            self.rewards[d] = self.smoothing * self.rewards[d] + (1 - self.smoothing) * reward
        k = len(self.domains)
        temperature = self.exploration(0) if self.epsilon is None else self.epsilon
        self.updates += 1
        self.epsilon = self.exploration(state.step)
        scores = {d: temperature * self.rewards[d] for d in self.domains}
        top = max(scores.values())
        raw = {d: math.exp(s - top) for d, s in scores.items()}
        total = sum(raw.values())
        return {d: (1 - k * self.epsilon) * raw[d] / total + self.epsilon for d in self.domains}

    def config(self) -> dict[str, Any]:
        return {"smoothing": self.smoothing, "importance_weighted": self.importance_weighted,
                "warmup_steps": self.warmup_steps, **super().config()}

    def state_dict(self) -> dict[str, Any]:
        return {"rewards": dict(self.rewards), "tokens_seen": dict(self.tokens_seen),
                "updates": self.updates, "epsilon": self.epsilon}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rewards = {d: float(r) for d, r in state["rewards"].items()}
        self.tokens_seen = {d: int(n) for d, n in state["tokens_seen"].items()}
        self.updates = int(state["updates"])
        self.epsilon = state["epsilon"]


__all__ = ["BanditMixture", "ExcessLossMixture", "MixturePolicy", "StagedMixture",
           "StaticMixture", "load_reference_losses", "project_to_bounds", "resolve_weights"]
