"""Weight statistics per layer: the norm, the update-to-weight ratio since the previous check
and the change since the current data stage began (the report's "convergence evidence from
the weights"). Computed from each rank's local shards and reduced over the mesh, never
gathered; the two reference copies of the weights (previous check, stage start) are kept on
``snapshot_device`` and, for unsharded weights, in checkpoints."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch.distributed.tensor import DTensor

from lightning_aquila.callbacks.monitor.norms import local_part, shard_spec, sum_of_squares

#: Wrapper modules that insert themselves into parameter names; stripped so that a layer has
#: the same name with or without compile / activation checkpointing.
_WRAPPER_NAMES = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module",
                            "_forward_module"})


def layer_of(parameter_name: str) -> str:
    """The layer a parameter belongs to: its path up to the first numeric index
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else its module path
    (``model.embed_tokens.weight`` -> ``model.embed_tokens``)."""
    parts = clean_name(parameter_name).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]


def clean_name(parameter_name: str) -> str:
    return ".".join(p for p in parameter_name.split(".") if p not in _WRAPPER_NAMES)


class WeightStatistics:
    """The weights' snapshots and the statistics measured against them.

    ``previous``: the weights at the last check; ``stage_reference``: the weights when the
    current stage began (taken at the next check while ``stage_reference_pending``).
    """

    def __init__(self, snapshot_device: str | torch.device = "cpu") -> None:
        self.snapshot_device = torch.device(snapshot_device)
        self.previous: dict[str, torch.Tensor] = {}
        self.stage_reference: dict[str, torch.Tensor] = {}
        self.stage_reference_pending = True  # take the reference at the next weight check

    def snapshot(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        return {clean_name(name): local_part(p).detach().to(self.snapshot_device, copy=True)
                for name, p in pl_module.named_parameters()}

    def begin_stage(self, pl_module: LightningModule | None) -> None:
        """A data stage begins: its reference is the weights now, or (before training, or
        with the statistics off: ``pl_module`` is ``None``) those of the next check."""
        self.stage_reference = {}
        self.stage_reference_pending = True
        if pl_module is not None:
            self.stage_reference = self.snapshot(pl_module)
            self.stage_reference_pending = False

    def measure(self, pl_module: LightningModule) -> dict[str, dict[str, float]]:
        """Per layer: ``norm`` = ‖W‖, ``update_ratio`` = ‖W − W_prev‖ / ‖W_prev‖ (W_prev: the
        weights at the previous check) and ``stage_change`` = ‖W − W_stage‖ / ‖W_stage‖
        (W_stage: the weights when the current stage began, or at the run's first check).
        Then the weights now become the previous check's."""
        params = [(clean_name(n), p) for n, p in pl_module.named_parameters()]
        previous = _matching(self.previous, params)
        reference = _matching(self.stage_reference, params)
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
        self.previous = self.snapshot(pl_module)
        if self.stage_reference_pending:
            self.stage_reference = self.previous
            self.stage_reference_pending = False
        return stats

    # -- checkpoint state: the monitor's "snapshots" and "stage_reference_pending" ------------
    def checkpointed(self, pl_module: LightningModule | None) -> dict[str, Any] | None:
        """The snapshots for a checkpoint, or ``None`` when the weights are sharded (a sharded
        run's snapshots are per rank, and Lightning saves callback state from rank 0 only)."""
        if pl_module is None or any(isinstance(p, DTensor) for p in pl_module.parameters()):
            return None
        return {"previous": self.previous, "stage": self.stage_reference}

    def restore(self, snapshots: Mapping[str, Any] | None, pending: bool,
                stage_named: bool) -> None:
        if snapshots is not None:
            self.previous = dict(snapshots["previous"])
            self.stage_reference = dict(snapshots["stage"])
            self.stage_reference_pending = pending
        else:
            # Sharded weights: snapshots are not checkpointed. Update ratios restart at the
            # next check; so does the stage reference when no stage was named, while a named
            # stage's stage_change waits for the next stage boundary.
            self.previous, self.stage_reference = {}, {}
            self.stage_reference_pending = not stage_named


def _matching(snapshot: dict[str, torch.Tensor],
              params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The snapshot entries still shaped like their parameter's local shard (a resume on
    another world size changes the shards; those entries are dropped)."""
    return {name: snapshot[name] for name, p in params
            if name in snapshot and snapshot[name].shape == local_part(p).shape}


__all__ = ["WeightStatistics", "clean_name", "layer_of"]
