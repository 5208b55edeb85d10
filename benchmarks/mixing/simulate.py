"""A development aid, not evidence: random synthetic "worlds" of per-domain power laws with
repetition penalties, in which ``EffectiveDataMixture`` variants and the fixed mixtures are
run on the same budgets as the GPU settings. It is how ``effective-data-r3``'s ``R* = 3`` was
chosen before the second GPU sitting (docs/benchmarks.md, "Mixing"); the GPU runs decide.

A world's domain ``i`` has ``U_i`` unique tokens (sizes ``ratio`` apart) and a dev loss
``E_i + C_i (T D)_i^(-a_i) + rho_i max(0, epochs_i - e0_i)^2``, where ``D`` are the domains'
effective tokens (Muennighoff et al.'s model with the domain's own ``R_i``), ``T`` a transfer
matrix (domains in a group help each other), and the last term overfitting past ``e0_i``
passes. The ranges of ``R_i`` (2-40) and ``e0_i`` (4-15 passes) were recalibrated to the first
GPU runs (2026-12-06): small domains that kept improving after 17+ passes (corpus A's
``en_legal``) and others whose dev loss turned after 7-10 (corpus B's ``es``, ``fr``,
``code_octave`` under uniform). The first calibration (``R_i`` 0.5-6, ``e0_i`` 2-6) chose
``R* = 0.75``, which the GPU runs then showed to be too pessimistic.

    python benchmarks/mixing/simulate.py            # ~2 min on 2 cores
"""

from __future__ import annotations

import math

import numpy as np

from lightning_aquila.callbacks.policies.effective_data import (
    EffectiveDataMixture,
    effective_tokens,
)
from lightning_aquila.callbacks.state import TrainingState
from lightning_aquila.domain_weights import temperature_weights, unimax_weights


class World:
    def __init__(self, rng: np.random.Generator, k: int, ratio: float, total: float = 20e6):
        sizes = np.exp(rng.uniform(0, math.log(ratio), k))
        sizes[0], sizes[1] = 1, ratio
        self.unique = sizes / sizes.sum() * total
        self.floor, self.scale = rng.uniform(0.8, 3.0, k), rng.uniform(0.8, 2.5, k)
        self.exponent = rng.uniform(0.2, 0.45, k)
        self.repetition = np.exp(rng.uniform(math.log(2), math.log(40), k))
        self.overfit = np.exp(rng.uniform(math.log(3e-3), math.log(3e-2), k))
        self.onset = rng.uniform(4, 15, k)
        groups = rng.integers(0, max(1, k // 3), k)
        self.transfer = np.where(groups[:, None] == groups[None, :],
                                 rng.uniform(0.1, 0.4, (k, k)), 0.02)
        np.fill_diagonal(self.transfer, 1.0)
        self.names = [f"d{i}" for i in range(k)]

    def loss(self, tokens: np.ndarray) -> np.ndarray:
        effective = np.array([effective_tokens(n, u, r) for n, u, r in zip(
            tokens, self.unique, self.repetition)])
        seen = np.maximum(self.transfer @ effective, 1.0) / 1e6
        epochs = tokens / self.unique
        return (self.floor + self.scale * seen ** -self.exponent
                + self.overfit * np.maximum(0.0, epochs - self.onset) ** 2)

    def fixed(self, budget: float) -> dict[str, dict[str, float]]:
        counts = dict(zip(self.names, self.unique))
        return {"natural": {d: c / sum(counts.values()) for d, c in counts.items()},
                "uniform": dict.fromkeys(self.names, 1 / len(self.names)),
                "temperature:2": temperature_weights(counts, 2),
                "unimax:4": unimax_weights(counts, budget, 4)}


def simulate(world: World, budget: float, policy: dict[str, float] | EffectiveDataMixture,
             rng: np.random.Generator, evaluations: int = 60, noise: float = 0.01
             ) -> np.ndarray:
    """Final dev losses of a run of ``budget`` tokens; a policy re-plans at every one of the
    ``evaluations`` (noisy dev losses), as the engine does once per evaluation."""
    tokens, per = np.zeros(len(world.names)), budget / evaluations
    if isinstance(policy, dict):
        return world.loss(np.array([policy[d] for d in world.names]) * budget)
    policy.setup(world.names, None, unique_tokens=dict(zip(world.names, world.unique)),
                 budget_tokens=int(budget))
    state, current = TrainingState(), dict.fromkeys(world.names, 1 / len(world.names))
    current = policy.propose(state, current) or current
    for t in range(evaluations):
        tokens += np.array([current[d] for d in world.names]) * per
        state.step = state.val_step = (t + 1) * 25
        state.tokens_per_domain = {d: int(n) for d, n in zip(world.names, tokens)}
        state.tokens = int(tokens.sum())
        state.val_loss = dict(zip(world.names, world.loss(tokens) + rng.normal(
            0, noise, len(tokens))))
        current = policy.propose(state, current) or current
    return world.loss(tokens)


def main() -> None:
    variants = {f"R*={r}": r for r in (0.75, 3, 15)}
    print("gap to the best fixed mixture per world: mean / max / share of worlds <= 0")
    for k, ratio in ((8, 15), (12, 60)):  # corpus A's and corpus B's shapes
        for epochs in (3, 0.5):
            gaps: dict[str, list[float]] = {}
            for index in range(8):
                rng = np.random.default_rng([3, index])
                world = World(rng, k, ratio)
                budget = epochs * world.unique.sum()
                result = {n: simulate(world, budget, w, rng).mean()
                          for n, w in world.fixed(budget).items()}
                best = min(result.values())
                for name, r in variants.items():
                    result[name] = simulate(world, budget, EffectiveDataMixture(
                        repetition_epochs=r), np.random.default_rng([3, index, 7])).mean()
                for name, value in result.items():
                    gaps.setdefault(name, []).append(value - best)
            cells = ", ".join(f"{n} {np.mean(g):+.3f}/{np.max(g):+.3f}/"
                              f"{np.mean(np.array(g) <= 1e-9):.2f}" for n, g in gaps.items())
            print(f"{k} domains {ratio}x apart, {epochs} epochs: {cells}", flush=True)


if __name__ == "__main__":
    main()
