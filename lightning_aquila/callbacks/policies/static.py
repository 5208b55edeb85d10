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


class StagedMixture(MixturePolicy):
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
        unknown = set(stage) - {"name", "weights", "until_tokens", "until_step",
                                "quality_temperature"}
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {sorted(unknown)}; use name, "
                             "weights, until_tokens, until_step, quality_temperature")
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
        found = {"name": str(stage.get("name", f"stage{index}")),
                 "weights": dict(weights) if isinstance(weights, Mapping) else weights,
                 **{k: int(stage[k]) for k in ends}}
        if "quality_temperature" in stage:
            found["quality_temperature"] = stage_temperature(stage["quality_temperature"],
                                                             where)
        return found

    @property
    def stage(self) -> str:
        return self.stages[self.index]["name"]

    @property
    def quality_temperature(self) -> float | Mapping[str, float | None] | None:
        return self.stages[self.index].get("quality_temperature")

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


class QualityCurriculum(MixturePolicy):
    """A quality curriculum (QuRating) on top of another policy: ``policy`` decides the domain
    weights exactly as it would alone, and the quality temperature changes at given steps.
    What :class:`StagedMixture` does with fixed weights, for an adaptive mixture.

    Args:
        policy: the policy whose weights are applied; its ``update_every`` and bounds are this
            one's. It is asked when training starts and whenever it is due, as alone.
        stages: ``[{name, until_step, quality_temperature}, ...]`` in order, each in force
            until ``state.step >= until_step`` (the last may leave it out and runs to the
            end); ``quality_temperature`` as in :class:`StagedMixture` (null: no
            reweighting). The switch is applied at the first optimizer step at or past the
            stage's end.
    """

    def __init__(self, policy: MixturePolicy, stages: Sequence[Mapping[str, Any]]) -> None:
        if not isinstance(policy, MixturePolicy):
            raise ValueError(f"QualityCurriculum(policy) must be a MixturePolicy, got "
                             f"{policy!r}")
        super().__init__(policy.update_every, policy.min_weight, policy.max_weight)
        if isinstance(stages, (str, bytes, Mapping)) or not isinstance(stages, Sequence) or (
                not stages):
            raise ValueError(f"QualityCurriculum(stages) must be a non-empty list of stages, "
                             f"got {stages!r}")
        self.policy = policy
        self.stages = []
        for i, stage in enumerate(stages):
            where = f"QualityCurriculum(stages[{i}])"
            if not isinstance(stage, Mapping) or set(stage) - {"name", "until_step",
                                                               "quality_temperature"}:
                raise ValueError(f"{where} must be a mapping of name, until_step and "
                                 f"quality_temperature, got {stage!r}")
            end = stage.get("until_step")
            bad_end = end is not None and (not isinstance(end, int) or isinstance(end, bool)
                                           or end <= 0)
            if bad_end or (end is None and i < len(stages) - 1):
                raise ValueError(f"{where}.until_step must be a positive integer (only the "
                                 f"last stage may leave it out), got {end!r}")
            self.stages.append({"name": str(stage.get("name", f"stage{i}")), "until_step": end,
                                "quality_temperature": stage_temperature(
                                    stage.get("quality_temperature"), where)})
        ends = [s["until_step"] for s in self.stages if s["until_step"] is not None]
        if ends != sorted(set(ends)):
            raise ValueError(f"QualityCurriculum(stages): until_step must increase from stage "
                             f"to stage, got {ends}")
        self.index = 0
        self.switches: list[dict[str, Any]] = []  # {stage, step}, one per stage entered
        self._started = False

    @property
    def name(self) -> str:
        return f"QualityCurriculum({self.policy.name})"

    @property
    def stage(self) -> str:
        return self.stages[self.index]["name"]

    @property
    def quality_temperature(self) -> float | Mapping[str, float | None] | None:
        return self.stages[self.index]["quality_temperature"]

    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None,
              **context: Any) -> None:
        super().setup(domains, natural, **context)
        self.policy.setup(domains, natural, **context)
        for i, stage in enumerate(self.stages):
            if isinstance(stage["quality_temperature"], Mapping):
                temperatures(stage["quality_temperature"], self.domains,
                             f"QualityCurriculum(stages[{i}].quality_temperature)")
        self._started = False  # the engine asks once when training starts

    def due(self, step: int) -> bool:
        return self.policy.due(step) or any(
            s["until_step"] == step for s in self.stages[self.index:])

    def propose(self, state: TrainingState, current: Mapping[str, float]
                ) -> dict[str, float] | None:
        index = self.index
        while index < len(self.stages) - 1 and state.step >= self.stages[index]["until_step"]:
            index += 1
        if index != self.index or not self.switches:
            self.index = index
            self.switches.append({"stage": self.stage, "step": state.step})
        ask = not self._started or self.policy.due(state.step)
        self._started = True
        return self.policy.propose(state, current) if ask else None

    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
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


__all__ = ["QualityCurriculum", "StagedMixture", "StaticMixture"]
