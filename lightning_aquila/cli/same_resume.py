"""Every rank of a fit resumes from the same checkpoint, or none does.

``--ckpt_path last`` is resolved by each process on its own, before the process group exists
(``checkpoint_check.checked_resume_path``). On several nodes that see different checkpoint
folders (a node-local disk, a copy that lagged), one node resumes from step N and another
from another step or from scratch; DDP then trains on what each rank loaded, without a word,
until the ranks' collectives stop matching and the job hangs (seen on two nodes: rank 0 at
step 4, rank 1 at step 1, then a hang). ``SameResumeOnEveryRank`` compares, once the process
group is up and before anything is restored, what every rank is about to load, and stops
all of them with one line when they differ.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_aquila.checkpoint_check import PREFIX


def resume_point(ckpt_path: str | os.PathLike[str] | None) -> tuple[Any, ...] | None:
    """What a rank resumes from, comparable across nodes that mount the same folder under
    different paths: ``None`` (a fresh start), ``(global step, bytes)`` of a local file,
    ``("shards", files, bytes)`` of a sharded directory, or the text of anything else (a
    remote URL, Lightning's ``"hpc"``)."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path)
    if path.is_file():
        from lightning_aquila.cli.run_folder import checkpoint_step

        return checkpoint_step(path), path.stat().st_size
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return "shards", len(files), sum(p.stat().st_size for p in files)
    return (str(ckpt_path),)


def describe(ckpt_path: str | os.PathLike[str] | None, point: tuple[Any, ...] | None) -> str:
    if point is None:
        return "a fresh start"
    if len(point) == 2:
        return f"step {point[0]} ({ckpt_path})"
    return str(ckpt_path)


class SameResumeOnEveryRank(Callback):
    """Stops a fit before any state is restored when its ranks would resume from different
    checkpoints (``SystemExit`` with one line, on every rank). ``ckpt_path``: what this rank
    resolved; nothing to check on one process."""

    def __init__(self, ckpt_path: str | os.PathLike[str] | None) -> None:
        self.ckpt_path = None if ckpt_path is None else str(ckpt_path)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.world_size < 2 or not dist.is_initialized():
            return
        mine = resume_point(self.ckpt_path)
        found: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(found, (mine, self.ckpt_path))
        if len({point for point, _ in found}) == 1:
            return
        groups: dict[str, list[int]] = {}
        for rank, (point, path) in enumerate(found):
            groups.setdefault(describe(path, point), []).append(rank)
        listed = "; ".join(f"rank(s) {', '.join(map(str, ranks))}: {what}"
                           for what, ranks in groups.items())
        raise SystemExit(f"{PREFIX}: the ranks would resume from different checkpoints "
                         f"({listed}); the checkpoint folder must be one that every node sees "
                         "(shared storage), not a disk of each node's own. Stopping before "
                         "training")
