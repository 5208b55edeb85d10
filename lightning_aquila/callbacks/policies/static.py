"""Fixed mixtures: :class:`StaticMixture` (one set of weights, the baseline) and
:class:`StagedMixture` (the Aquila2 report's data stages, each in force until a token count or
a step); and :class:`QualityCurriculum`, stages of the quality temperature on top of any
policy's weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning_aquila.callbacks.policies.base import MixturePolicy
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import Bound, check_weight_spec, resolve_weights
from lightning_aquila.quality_temperature import temperature_value, temperatures


def stage_temperature(tau: Any, where: str) -> Any:
    """A stage's ``quality_temperature``, checked; null becomes ``"inf"`` (no reweighting),
    which must not read as the base class's "no opinion"."""
    tau = dict(tau) if isinstance(tau, Mapping) else "inf" if tau is None else tau
    for name, value in (tau.items() if isinstance(tau, dict) else [(None, tau)]):
        temperature_value(value, f"{where}.quality_temperature"
                          + (f"[{name!r}]" if name is not None else ""))
    return tau


def checked_stages(owner: str, stages: Any, *, weights: bool,
                   ends: tuple[str, ...] = ("until_tokens", "until_step")
                   ) -> list[dict[str, Any]]:
    """A list of stages, each a mapping of ``name``, ``weights`` (when ``weights``), one of
    ``ends`` (only the last may leave it out) and an optional ``quality_temperature``; names
    distinct, ends increasing. Errors name ``owner`` and the stage."""
    if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence):
        raise ValueError(f"{owner}(stages) must be a list of stages, got {stages!r}")
    if not stages:
        raise ValueError(f"{owner}(stages) needs at least one stage")
    checked = [_checked_stage(f"{owner}(stages[{i}])", i, stage, i == len(stages) - 1,
                              weights, ends) for i, stage in enumerate(stages)]
    names = [s["name"] for s in checked]
    if len(set(names)) != len(names):
        raise ValueError(f"{owner}(stages): stage names repeat: {names}")
    for kind in ends:
        found = [s[kind] for s in checked if s.get(kind) is not None]
        if found != sorted(found) or len(set(found)) != len(found):
            raise ValueError(f"{owner}(stages): {kind} must increase from stage to stage, got "
                             f"{found}")
    return checked


def _checked_stage(where: str, index: int, stage: Any, last: bool, weights: bool,
                   ends: tuple[str, ...]) -> dict[str, Any]:
    keys = ["name", *(["weights"] if weights else []), *ends, "quality_temperature"]
    if not isinstance(stage, Mapping):
        raise ValueError(f"{where} must be a mapping with name, {'weights and ' if weights else ''}"
                         f"{' or '.join(ends)}, got {stage!r}")
    unknown = set(stage) - set(keys)
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; use {', '.join(keys)}")
    if weights and "weights" not in stage:
        raise ValueError(f"{where} has no weights")
    if weights:
        check_weight_spec(stage["weights"], f"{where}.weights")
    given = [k for k in ends if stage.get(k) is not None]
    if len(given) > 1:
        raise ValueError(f"{where} gives both {' and '.join(given)}; give one")
    if not given and not last:
        raise ValueError(f"{where} needs {' or '.join(ends)} (only the last stage may run to "
                         "the end)")
    for key in given:
        if not isinstance(stage[key], int) or isinstance(stage[key], bool) or stage[key] <= 0:
            raise ValueError(f"{where}.{key} must be a positive integer, got {stage[key]!r}")
    found: dict[str, Any] = {"name": str(stage.get("name", f"stage{index}")),
                             **{k: int(stage[k]) for k in given}}
    if weights:
        found["weights"] = (dict(stage["weights"]) if isinstance(stage["weights"], Mapping)
                            else stage["weights"])
    if "quality_temperature" in stage:
        found["quality_temperature"] = stage_temperature(stage["quality_temperature"], where)
    return found


def stage_reached(stages: Sequence[Mapping[str, Any]], index: int, state: TrainingState) -> int:
    """The index of the stage in force for ``state``, from stage ``index`` on (stages end at a
    token count or a step; the last never does)."""
    while index < len(stages) - 1 and _ended(stages[index], state):
        index += 1
    return index


def _ended(stage: Mapping[str, Any], state: TrainingState) -> bool:
    if stage.get("until_tokens") is not None:
        return state.tokens >= stage["until_tokens"]
    if stage.get("until_step") is not None:
        return state.step >= stage["until_step"]
    return False


class StaticMixture(MixturePolicy):
    """Fixed weights: the baseline.

    Args:
        weights: a mapping ``domain -> weight`` (rescaled to sum to 1, unlisted domains 0),
            ``"uniform"``, ``"natural"`` (proportional to each domain's training tokens in the
            corpus), ``"temperature:T"`` (``p_i ∝ n_i^(1/T)``) or ``"unimax:N"`` (uniform, no
            domain past ``N`` epochs of the run's budget, UniMax). The engine reads the token
            counts from the mixture (``unique_tokens``) and the budget from
            ``trainer.max_steps`` times its ``tokens_per_step``. Without counts
            it falls back to ``state.tokens_per_domain``, the tokens seen so far (the natural
            proportions only when training started from them), and keeps the current weights
            until the monitor has counted some (``unimax:N`` also until the budget is known).
    """

    def __init__(self, weights: Mapping[str, float] | str = "natural", update_every: int = 1,
                 min_weight: Bound = 0.0, max_weight: Bound = 1.0) -> None:
        super().__init__(update_every, min_weight, max_weight)
        check_weight_spec(weights, "StaticMixture(weights)")
        self.weights = dict(weights) if isinstance(weights, Mapping) else weights

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None,
              **context: Any) -> None:
        super().setup(domains, natural, **context)
        resolve_weights(self.weights, self.domains, None, "StaticMixture(weights)")

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        return resolve_weights(self.weights, self.domains, self.counts(state, current),
                               "StaticMixture(weights)", budget=self.budget_tokens_hint)

    def config(self) -> dict[str, Any]:
        return {"weights": self.weights, **super().config()}


class _StageInForce:
    """The stage in force of a policy that walks ``stages`` with ``index``: its name, and the
    quality temperature the engine hands the mixture (``None``: keep the one in force)."""

    stages: list[dict[str, Any]]
    index: int

    @property
    def stage(self) -> str:
        return self.stages[self.index]["name"]

    @property
    def quality_temperature(self) -> float | Mapping[str, float | None] | None:
        return self.stages[self.index].get("quality_temperature")


class StagedMixture(_StageInForce, MixturePolicy):
    """The Aquila2 report's data stages (K6 → K61 → … → K65): a list of mixtures, each in
    force until a token count or a step.

    Args:
        stages: ``[{name, weights, until_tokens | until_step, quality_temperature}, ...]`` in
            order. ``weights`` as for :class:`StaticMixture`. A stage ends once
            ``state.tokens >= until_tokens`` (training tokens over all ranks, as the TSM
            counts them every ``train_loss_every_n_steps``) or ``state.step >= until_step``;
            the last stage may leave both out and runs to the end. Stages only move forward.
            ``quality_temperature`` (optional; one value or ``{domain: τ}``, ``"inf"`` for no
            reweighting) sets the datamodule's quality temperature when the stage starts
            (the data must be sampled by score); a stage without it keeps the one in force.
    """

    def __init__(self, stages: Sequence[Mapping[str, Any]], update_every: int = 1,
                 min_weight: Bound = 0.0, max_weight: Bound = 1.0) -> None:
        super().__init__(update_every, min_weight, max_weight)
        self.stages = checked_stages("StagedMixture", stages, weights=True)
        self.index = 0
        self.switches: list[dict[str, Any]] = []  # {stage, step, tokens}, one per stage entered

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None,
              **context: Any) -> None:
        super().setup(domains, natural, **context)
        for i, stage in enumerate(self.stages):
            resolve_weights(stage["weights"], self.domains, None,
                            f"StagedMixture(stages[{i}].weights)")
            if isinstance(stage.get("quality_temperature"), Mapping):
                temperatures(stage["quality_temperature"], self.domains,
                             f"StagedMixture(stages[{i}].quality_temperature)")

    def stage_at(self, state: TrainingState) -> int:
        """The index of the stage in force for ``state`` (never before the current one)."""
        return stage_reached(self.stages, self.index, state)

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        index = self.stage_at(state)
        if index != self.index or not self.switches:
            self.index = index
            self.switches.append({"stage": self.stage, "step": state.step,
                                  "tokens": state.tokens})
        return resolve_weights(self.stages[self.index]["weights"], self.domains,
                               self.counts(state, current),
                               f"StagedMixture(stages[{self.index}].weights)",
                               budget=self.budget_tokens_hint)

    def config(self) -> dict[str, Any]:
        return {"stages": self.stages, **super().config()}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "switches": [dict(s) for s in self.switches]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])
        self.switches = [dict(s) for s in state["switches"]]


class QualityCurriculum(_StageInForce, MixturePolicy):
    """A quality curriculum (QuRating) on top of another policy: ``policy`` decides the domain
    weights exactly as it would alone, and the quality temperature changes at given steps.
    What :class:`StagedMixture` does with fixed weights, for an adaptive mixture.

    Args:
        policy: the policy whose weights are applied; its ``update_every`` and bounds are this
            one's. It is asked when training starts and whenever it is due, as alone.
        stages: ``[{name, until_step, quality_temperature}, ...]`` in order, each in force
            until ``state.step >= until_step`` (the last may leave it out and runs to the
            end); ``quality_temperature`` as in :class:`StagedMixture` (null: no
            reweighting; left out: the one in force stays). The stages are checked as
            :class:`StagedMixture`'s are. The switch is applied at the first optimizer step at
            or past the stage's end.
    """

    def __init__(self, policy: MixturePolicy, stages: Sequence[Mapping[str, Any]]) -> None:
        if not isinstance(policy, MixturePolicy):
            raise ValueError(f"QualityCurriculum(policy) must be a MixturePolicy, got "
                             f"{policy!r}")
        super().__init__(policy.update_every, policy.min_weight, policy.max_weight)
        self.policy = policy
        self.stages = checked_stages("QualityCurriculum", stages, weights=False,
                                     ends=("until_step",))
        self.index = 0
        self.switches: list[dict[str, Any]] = []  # {stage, step}, one per stage entered
        self._started = False

    @property
    def name(self) -> str:
        return f"QualityCurriculum({self.policy.name})"

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None,
              **context: Any) -> None:
        # The bounds are the wrapped policy's: its setup checks them (and warns when they are
        # pinned); checking them here too would say the same thing twice.
        self.policy.setup(domains, natural, **context)
        self._keep_context(domains, natural, **context)
        for i, stage in enumerate(self.stages):
            if isinstance(stage.get("quality_temperature"), Mapping):
                temperatures(stage["quality_temperature"], self.domains,
                             f"QualityCurriculum(stages[{i}].quality_temperature)")
        self._started = False  # the engine asks once when training starts

    def due(self, step: int) -> bool:
        return self.policy.due(step) or any(
            s.get("until_step") == step for s in self.stages[self.index:])

    def propose(self, state: TrainingState, current: Mapping[str, float]
                ) -> dict[str, float] | None:
        index = stage_reached(self.stages, self.index, state)
        if index != self.index or not self.switches:
            self.index = index
            self.switches.append({"stage": self.stage, "step": state.step})
        ask = not self._started or self.policy.due(state.step)
        self._started = True
        return self.policy.propose(state, current) if ask else None

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:  # unused: propose asks the wrapped policy
        return self.policy.propose(state, current)

    def config(self) -> dict[str, Any]:
        return {"policy": {"class": type(self.policy).__name__, **self.policy.config()},
                "stages": self.stages}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index, "switches": [dict(s) for s in self.switches],
                "policy": self.policy.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])
        self.switches = [dict(s) for s in state["switches"]]
        self.policy.load_state_dict(state["policy"])


__all__ = ["QualityCurriculum", "StagedMixture", "StaticMixture", "checked_stages",
           "stage_reached"]
