"""Aioli: online mixing by a linear mixing law learned from held-out losses while training.

Chen, Hu, Lourie, Cho and Ré, *Aioli: A unified optimization framework for language model
data mixing* (arXiv 2411.05735); reference code: github.com/HazyResearch/aioli
(``trainer/aioli_trainer.py``).

Why this policy: every method the paper unifies sets the mixture to minimise the total loss
under a *mixing law* ``L_i(t+1) = L_i(t) - sum_j A_ij p_j``, and they differ in how they set
``A``; the paper shows that those guesses are often wrong (which is why DoReMi- and
ODM-style methods can lose to stratified sampling) and that measuring ``A`` directly, on the
held-out losses, fixes it. Measuring on *held-out* data matters here: a small domain that is
being repeated keeps lowering its training loss while its held-out loss rises, and only a
held-out signal sees that.

One round of the policy, ``V`` = ``update_every`` steps per interval (set it to the trainer's
``val_check_interval`` so that every interval ends in a held-out evaluation):

1. *LearnParams* (``lp_rounds`` sweeps over the ``K`` domains, in a seeded random order each
   sweep): for one interval the mixture puts ``one_hot_factor`` on domain ``j`` and the rest
   evenly on the others. The drop of every domain's held-out loss over that interval is
   column ``j`` of a ``K x K`` matrix ``D`` (averaged over sweeps).
2. ``A`` solves ``D_i = W A_i`` for every domain ``i``, ``W`` being the probe mixtures (one
   per row), then is normalised (shifted to be non-negative, divided by its sum) and
   smoothed, ``A_ema <- (1 - ema) A + ema A_ema``.
3. *Exploit*: ``p_j ∝ prior_j exp(eta * sum_i A_ema[i, j])`` for ``exploit_updates``
   intervals, then the next round starts.

Differences from the reference code, on purpose:

* The held-out losses come from the monitor's own periodic evaluation (``state.val_loss``),
  not from extra evaluations inside the policy, so a probe costs no extra forward passes. A
  held-out loss measured at the end of an interval is read at the next update, one interval
  late, so the first exploit interval of a round keeps the previous round's weights (the
  initial mixture in round one). A loss difference is used only when the interval between
  its two evaluations ran entirely on one probe mixture; any other is dropped.
* ``prior`` defaults to ``"uniform"`` as in the paper's runs (``--aioli_prior 1 1 ...``);
  ``"natural"`` or a mapping are offered because with domains of very different sizes the
  stratified prior repeats small domains many times.
* The probe order comes from ``numpy.random.default_rng((seed, round))``, so the policy stays
  deterministic and resumable (its whole state is in the checkpoint).
* The weights are projected onto ``[min_weight, max_weight]`` like every policy's here; the
  probes too, so a tight ``max_weight`` weakens the probes (``setup`` warns).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from lightning_aquila.callbacks.policies.base import MixturePolicy
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import (
    Bound,
    as_number,
    check_weight_spec,
    resolve_weights,
)


class AioliMixture(MixturePolicy):
    """Aioli (Chen et al. 2024): probe each domain, fit the linear mixing law on the held-out
    losses, exploit it; repeat. See the module docstring for the rule and the differences
    from the paper's code.

    Args:
        eta: the exponentiated-gradient step on the column sums of the normalised ``A``
            (the paper's ``--eta``, 1 in its SlimPajama runs).
        one_hot_factor: the weight of the probed domain during its probe interval (the
            paper's 0.75; the other domains share the rest evenly).
        lp_rounds: sweeps over all domains per round (the paper: 2 at 10 steps per probe;
            here a probe is an evaluation interval, which is longer, so 1 by default).
        exploit_updates: intervals of exploitation per round, the first one included.
        ema: weight of the previous smoothed ``A`` (the paper's ``--ema 0.1``); 0 keeps only
            the newest ``A``.
        prior: ``"uniform"``, ``"natural"``, ``"initial"`` (the mixture's weights when the
            policy starts) or a mapping ``domain -> weight``: the ``prior`` in ``p``.
        warmup_steps: keep the initial mixture until this step (no probes before it; the
            first probe starts at the first update after step 0 in any case, since a probe's
            loss drop is measured from an evaluation at the step it starts).
        seed: seeds the probe order of every sweep.
        update_every: steps per interval; set it to the trainer's ``val_check_interval``.
    """

    def __init__(self, eta: float = 1.0, one_hot_factor: float = 0.75, lp_rounds: int = 1,
                 exploit_updates: int = 8, ema: float = 0.1,
                 prior: Mapping[str, float] | str = "uniform", warmup_steps: int = 0,
                 seed: int = 0, update_every: int = 50, min_weight: Bound = 0.0,
                 max_weight: Bound = 1.0) -> None:
        super().__init__(update_every, min_weight, max_weight)
        if not as_number(eta, "AioliMixture(eta)") > 0:
            raise ValueError(f"AioliMixture(eta={eta!r}) must be positive")
        if not 0.0 < as_number(one_hot_factor, "AioliMixture(one_hot_factor)") <= 1.0:
            raise ValueError(f"AioliMixture(one_hot_factor={one_hot_factor!r}) must be in "
                             "(0, 1]")
        if not 0.0 <= as_number(ema, "AioliMixture(ema)") < 1.0:
            raise ValueError(f"AioliMixture(ema={ema!r}) must be in [0, 1)")
        for name, value, low in (("lp_rounds", lp_rounds, 1),
                                 ("exploit_updates", exploit_updates, 2),
                                 ("warmup_steps", warmup_steps, 0), ("seed", seed, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AioliMixture({name}={value!r}) must be an integer >= {low}"
                                 + (" (the first exploit interval still waits for the last "
                                    "probe's loss)" if name == "exploit_updates" else ""))
        if prior != "initial":
            check_weight_spec(prior, "AioliMixture(prior)")
        self.eta, self.one_hot_factor, self.ema = float(eta), float(one_hot_factor), float(ema)
        self.lp_rounds, self.exploit_updates = lp_rounds, exploit_updates
        self.warmup_steps, self.seed = warmup_steps, seed
        self.prior = dict(prior) if isinstance(prior, Mapping) else prior
        self._reset()

    def _reset(self) -> None:
        self.round = 0
        self.position = 0  # intervals into the current round
        self.prior_weights: dict[str, float] | None = None
        self.exploit: dict[str, float] | None = None  # the weights exploited now
        self.intervals: list[dict[str, Any]] = []  # this round's {from_step, probe}
        self.drops: dict[str, list[float]] = {}  # probed domain -> summed drops (K values)
        self.counts: dict[str, int] = {}
        self.last_val: tuple[int, dict[str, float]] | None = None
        self.a_ema: list[list[float]] | None = None
        self.matrices = 0  # A matrices estimated so far

    # -- set-up ------------------------------------------------------------------------------
    def setup(self, domains: Sequence[str], natural: Mapping[str, float] | None = None,
              **context: Any) -> None:
        changed = self.domains is not None and list(domains) != self.domains
        super().setup(domains, natural, **context)
        if changed:  # another domain list on resume: what was learnt no longer applies
            self._reset()
        if isinstance(self.prior, (Mapping, str)) and self.prior != "initial":
            resolve_weights(self.prior, self.domains, None, "AioliMixture(prior)")
        k = len(self.domains)
        if k < 2:
            raise ValueError(f"AioliMixture needs at least two domains, got {self.domains}")
        probe = self.probe_weights(self.domains[0])
        if abs(self.bounded(probe)[self.domains[0]] - probe[self.domains[0]]) > 1e-9:
            warnings.warn(
                f"AioliMixture: max_weight={self.max_weight!r} (or min_weight) caps a probe's "
                f"one_hot_factor={self.one_hot_factor}; the probes then move the mixture less "
                "and the mixing law is estimated from a smaller signal. Raise max_weight to "
                f">= {self.one_hot_factor} to probe as the paper does.", stacklevel=2)

    def probe_weights(self, domain: str) -> dict[str, float]:
        rest = (1.0 - self.one_hot_factor) / (len(self.domains) - 1)
        return {d: self.one_hot_factor if d == domain else rest for d in self.domains}

    def probe_order(self, round_index: int) -> list[str]:
        """The domains probed in ``round_index``: ``lp_rounds`` seeded permutations."""
        rng = np.random.default_rng([self.seed, round_index])
        return [self.domains[int(i)] for _ in range(self.lp_rounds)
                for i in rng.permutation(len(self.domains))]

    # -- the rule ----------------------------------------------------------------------------
    def _propose(self, state: TrainingState, current: dict[str, float]
                 ) -> dict[str, float] | None:
        if self.prior_weights is None:
            self.prior_weights = (dict(current) if self.prior == "initial" else
                                  resolve_weights(self.prior, self.domains, self.natural,
                                                  "AioliMixture(prior)") or dict(current))
        if state.step < max(self.warmup_steps, 1):  # no evaluation at step 0 to probe from
            return None
        self._ingest(state)
        probes = self.probe_order(self.round)
        if self.position < len(probes):  # LearnParams: the next probe
            domain = probes[self.position]
            self.intervals.append({"from_step": state.step, "probe": domain})
            self.position += 1
            return self.probe_weights(domain)
        if self.position == len(probes) + 1:  # the last probe's loss is in: fit, exploit
            fitted = self._fit()
            if fitted is not None:
                self.exploit = fitted
        # one interval after the probes the last probe's loss is not in yet: keep exploiting
        # the previous law (round one: the prior)
        weights = self.exploit or dict(self.prior_weights)
        self.intervals.append({"from_step": state.step, "probe": None})
        self.position += 1
        if self.position >= len(probes) + self.exploit_updates:
            self._next_round()
        return dict(weights)

    def _ingest(self, state: TrainingState) -> None:
        """Pair the newest held-out evaluation with the previous one and credit the loss drop
        to the probe that ran for the whole interval between them, if one did."""
        if state.val_step is None or not state.val_loss:
            return
        losses = {d: float(state.val_loss[d]) for d in self.domains
                  if d in state.val_loss and math.isfinite(state.val_loss[d])}
        if len(losses) != len(self.domains):
            return  # a domain's held-out loss is missing or not finite: skip this evaluation
        previous, self.last_val = self.last_val, (int(state.val_step), losses)
        if previous is None or previous[0] >= state.val_step:
            return
        start, end = previous[0], int(state.val_step)
        for i, interval in enumerate(self.intervals):
            stop = (self.intervals[i + 1]["from_step"] if i + 1 < len(self.intervals)
                    else state.step)
            if interval["from_step"] == start and stop == end and interval["probe"]:
                domain = interval["probe"]
                total = self.drops.setdefault(domain, [0.0] * len(self.domains))
                for k, d in enumerate(self.domains):
                    total[k] += previous[1][d] - losses[d]
                self.counts[domain] = self.counts.get(domain, 0) + 1
                return

    def _fit(self) -> dict[str, float] | None:
        """``A`` from this round's probes, normalised and smoothed; the exploit weights."""
        missing = [d for d in self.domains if not self.counts.get(d)]
        if missing:
            warnings.warn(
                f"AioliMixture: round {self.round} has no held-out loss drop for probe(s) "
                f"{missing}; keeping the previous weights. Set update_every equal to the "
                "trainer's val_check_interval so that every probe interval ends in an "
                "evaluation.", stacklevel=2)
            return None
        k = len(self.domains)
        # drops[i, j]: held-out loss drop of domain i while probing domain j
        drops = np.array([[self.drops[j][i] / self.counts[j] for j in self.domains]
                          for i in range(k)], dtype=np.float64)
        probes = np.array([[self.probe_weights(j)[m] for m in self.domains]
                           for j in self.domains], dtype=np.float64)
        a = np.linalg.solve(probes, drops.T).T  # row i: drops[i] = probes @ a[i]
        if a.min() < 0:
            a = a - a.min()
        a = a / a.sum() if a.sum() > 0 else np.full((k, k), 1.0 / (k * k))
        if self.a_ema is not None:
            a = (1.0 - self.ema) * a + self.ema * np.array(self.a_ema)
        self.a_ema = a.tolist()
        self.matrices += 1
        scores = self.eta * a.sum(axis=0)
        scores -= scores.max()
        prior = self.prior_weights or dict.fromkeys(self.domains, 1.0 / k)
        raw = {d: max(prior[d], 1e-12) * math.exp(s) for d, s in zip(self.domains, scores)}
        total = sum(raw.values())
        return {d: v / total for d, v in raw.items()}

    def _next_round(self) -> None:
        self.round += 1
        self.position = 0
        self.intervals = self.intervals[-1:]  # the exploit interval still running
        self.drops, self.counts = {}, {}

    # -- configuration and state -------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        return {"eta": self.eta, "one_hot_factor": self.one_hot_factor,
                "lp_rounds": self.lp_rounds, "exploit_updates": self.exploit_updates,
                "ema": self.ema, "prior": self.prior, "warmup_steps": self.warmup_steps,
                "seed": self.seed, **super().config()}

    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "position": self.position,
                "prior_weights": self.prior_weights, "exploit": self.exploit,
                "intervals": [dict(i) for i in self.intervals],
                "drops": {d: list(v) for d, v in self.drops.items()},
                "counts": dict(self.counts),
                "last_val": None if self.last_val is None else [self.last_val[0],
                                                                dict(self.last_val[1])],
                "a_ema": self.a_ema, "matrices": self.matrices}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.round, self.position = int(state["round"]), int(state["position"])
        self.prior_weights = state["prior_weights"]
        self.exploit = state["exploit"]
        self.intervals = [dict(i) for i in state["intervals"]]
        self.drops = {d: [float(x) for x in v] for d, v in state["drops"].items()}
        self.counts = {d: int(n) for d, n in state["counts"].items()}
        last = state["last_val"]
        self.last_val = None if last is None else (int(last[0]), dict(last[1]))
        self.a_ema = state["a_ema"]
        self.matrices = int(state["matrices"])


__all__ = ["AioliMixture"]
