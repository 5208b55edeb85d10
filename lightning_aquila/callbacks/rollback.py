"""The checkpoint half of the engine's spike rollback: which checkpoint to go back to, and
restoring model and optimizer from it without moving anything else.

The engine (``engine.py``) decides when to roll back and records what it did; this module
only finds the newest checkpoint at or before a step among what the run's ``ModelCheckpoint``
callbacks wrote or remember (rank 0 chooses, the others follow), and restores the model and
optimizer state from it the way Lightning's checkpoint connector would, but nothing else:
the data position, step counter, learning-rate schedule, loggers and checkpoint names keep
counting forward (``docs/engine.md`` says why).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import _load as pl_load
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer


class RollbackError(RuntimeError):
    """A rollback was needed but is impossible or has been tried too often."""


class CheckpointFinder:
    """The newest checkpoint at a step <= ``max_step``; each file's step is read once (cached
    by path and modification time)."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, float], int | None] = {}

    def newest(self, trainer: Trainer, max_step: int) -> tuple[str, int] | None:
        """``(path, step)`` of the newest checkpoint at a step <= ``max_step``: among the files
        (or sharded checkpoint folders) in every ``ModelCheckpoint``'s ``dirpath``, the paths
        those callbacks remember, and the checkpoint this fit resumed from. Rank 0 chooses;
        the others follow (they may not see the same listing on a non-shared filesystem)."""
        best: tuple[int, str] | None = None
        if trainer.is_global_zero:
            for path in checkpoint_candidates(trainer):
                step = self.step_of(path)
                if step is not None and step <= max_step and (best is None or step > best[0]):
                    best = (step, path)
        best = trainer.strategy.broadcast(best, src=0)
        return None if best is None else (best[1], best[0])

    def step_of(self, path: str) -> int | None:
        """The ``global_step`` a checkpoint was saved at."""
        fs = get_filesystem(path)
        if not fs.exists(path):
            return None
        info = fs.info(path)
        key = (path, float(info.get("mtime", info.get("created", 0)) or 0))
        if key not in self._steps:
            self._steps[key] = read_step(path, fs.isdir(path))
        return self._steps[key]


def checkpoint_dirs(trainer: Trainer) -> list[str]:
    return [str(cb.dirpath) for cb in trainer.checkpoint_callbacks
            if getattr(cb, "dirpath", None)]


def checkpoint_candidates(trainer: Trainer) -> list[str]:
    paths: list[str] = []
    for callback in trainer.checkpoint_callbacks:
        extension = getattr(callback, "FILE_EXTENSION", ".ckpt")
        dirpath = getattr(callback, "dirpath", None)
        if dirpath:
            fs = get_filesystem(dirpath)
            if fs.isdir(dirpath):
                remote = "://" in str(dirpath)
                paths += [fs.unstrip_protocol(p) if remote else p
                          for p in sorted(fs.ls(dirpath, detail=False))
                          if str(p).endswith(extension)]
        for attr in ("last_model_path", "best_model_path"):
            if getattr(callback, attr, ""):
                paths.append(getattr(callback, attr))
        paths += list(getattr(callback, "best_k_models", {}) or {})
    if trainer.ckpt_path:
        paths.append(str(trainer.ckpt_path))
    return list(dict.fromkeys(str(p) for p in paths))


def read_step(path: str, is_dir: bool) -> int | None:
    try:
        if is_dir:
            meta = Path(path) / "meta.pt"  # Lightning's sharded (distributed) checkpoints
            if meta.is_file():
                return int(torch.load(meta, map_location="cpu", weights_only=False)
                           ["global_step"])
        elif "://" not in path:
            # mmap: only the pickled structure is read, not the tensors
            return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)
                       ["global_step"])
        else:
            return int(pl_load(path, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # unreadable here: fall back to the step in its name
        pass
    found = re.search(r"step=(\d+)", Path(path).name)
    return int(found.group(1)) if found else None


def restore_model_and_optimizer(trainer: Trainer, pl_module: LightningModule, path: str
                                ) -> dict[str, Any]:
    """Model, optimizer (and precision-plugin) state from ``path``, the way Lightning's
    checkpoint connector restores them, but nothing else: the optimizer's hyper-parameters
    (the learning rate the schedule set for this step) stay as they are, as do the scheduler,
    loops, datamodule and callbacks. Returns the checkpoint."""
    hyper = [[{k: v for k, v in group.items() if k != "params"}
              for group in optimizer.param_groups] for optimizer in trainer.optimizers]
    # The run's own checkpoint (hyper-parameters included), so a full unpickle, as a resume
    # of the same run would need.
    checkpoint = trainer.strategy.load_checkpoint(path, weights_only=False)
    pl_module.on_load_checkpoint(checkpoint)
    trainer.strategy.load_model_state_dict(checkpoint, strict=pl_module.strict_loading)
    if trainer.strategy.lightning_restore_optimizer:
        if "optimizer_states" not in checkpoint:
            raise RollbackError(f"checkpoint {path} holds no optimizer state "
                                "(ModelCheckpoint(save_weights_only=True)?); cannot roll back")
        trainer.strategy.load_optimizer_state_dict(checkpoint)
    for optimizer, groups in zip(trainer.optimizers, hyper):
        for group, values in zip(optimizer.param_groups, groups):
            group.update(values)
    precision = trainer.precision_plugin
    if type(precision).__qualname__ in checkpoint:
        precision.load_state_dict(checkpoint[type(precision).__qualname__])
    return checkpoint


__all__ = ["CheckpointFinder", "RollbackError", "checkpoint_candidates", "checkpoint_dirs",
           "read_step", "restore_model_and_optimizer"]
