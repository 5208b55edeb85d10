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
plain types, so each policy is selectable from YAML as ``class_path``/``init_args``, under
this package's name (``lightning_aquila.callbacks.policies.BanditMixture``) or
``lightning_aquila.callbacks``'s.

One file per policy family; the update rules, with formulas, are in ``docs/engine.md``:

* ``base.py``: the interface and what every policy shares (bounds, set-up, proposal checks);
* ``static.py``: fixed weights and the report's data stages (``StaticMixture``,
  ``StagedMixture``), and stages of the quality temperature on top of any policy
  (``QualityCurriculum``);
* ``excess_loss.py``: DoReMi-style excess loss over a reference (``ExcessLossMixture``);
* ``bandit.py``: Online Data Mixing, an EXP3 bandit (``BanditMixture``);
* ``aioli.py``: a mixing law learned from held-out losses (``AioliMixture``);
* ``effective_data.py``: the remaining budget planned by each domain's dev-loss drop per
  effective (repetition-discounted) token, no reference (``EffectiveDataMixture``).

The weight arithmetic they share with the data side (checks, normalisation, the projection
onto the bounds) is ``lightning_aquila.domain_weights``.
"""

from lightning_aquila.callbacks.policies.aioli import AioliMixture
from lightning_aquila.callbacks.policies.bandit import BanditMixture
from lightning_aquila.callbacks.policies.base import MixturePolicy
from lightning_aquila.callbacks.policies.effective_data import EffectiveDataMixture
from lightning_aquila.callbacks.policies.excess_loss import (
    ExcessLossMixture,
    load_reference_losses,
)
from lightning_aquila.callbacks.policies.static import (
    QualityCurriculum,
    StagedMixture,
    StaticMixture,
)
from lightning_aquila.domain_weights import project_to_bounds, resolve_weights

__all__ = ["AioliMixture", "BanditMixture", "EffectiveDataMixture", "ExcessLossMixture",
           "MixturePolicy", "QualityCurriculum",
           "StagedMixture", "StaticMixture", "load_reference_losses", "project_to_bounds",
           "resolve_weights"]
