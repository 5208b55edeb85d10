"""``StepRecorder`` (what every optimizer step trained on and produced), ``CrashOnce`` (a
rank that dies at a given step, once) and ``KillServerAt`` (a server that dies at a given
step)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def batch_digest(batch: dict[str, torch.Tensor]) -> str:
    """sha256 over the batch's token ids, labels and domains."""
    digest = hashlib.sha256()
    for key in ("input_ids", "labels", "domain"):
        digest.update(batch[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def sample_windows(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """``[domain, *window]`` per sample: the inputs and the last label are the whole window."""
    windows = torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return torch.cat([batch["domain"][:, None], windows], dim=1).tolist()


class StepRecorder(Callback):
    """Appends one JSON line per optimizer step to ``<out>/rank<r>.jsonl``: the step, a hash
    of the batch, the loss as ``float.hex`` (bitwise), the mixture (weights, history length,
    consumed batches), and ``windows``: per sample, its domain index and its window's
    ``seq_len + 1`` tokens (what identifies a sample: ``crash_helpers.nodes.SampleIds``).
    List it after the monitor and the engine, so the weights are the ones the engine set at
    this step. A resumed run appends the steps it redoes again: readers keep the last record
    of each step.
    """

    def __init__(self, out: str) -> None:
        self.out = Path(out)
        self._file: Any = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / f"rank{trainer.global_rank}.jsonl", "a",  # noqa: SIM115
                          encoding="utf-8")

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        mixture = trainer.datamodule.mixture
        record = {"step": trainer.global_step, "batch": batch_digest(batch),
                  "loss": float(outputs["loss"]).hex(), "weights": mixture.weights,
                  "history": len(mixture.history), "consumed": mixture.consumed_batches,
                  "windows": sample_windows(batch)}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()


class CrashOnce(Callback):
    """Global rank ``rank`` exits hard (``os._exit``, no cleanup, like a segfault or the OOM
    killer) right after optimizer step ``step``, unless ``marker`` exists; it creates the
    marker first, so a restarted run goes through."""

    def __init__(self, step: int, marker: str, rank: int = 0, exit_code: int = 17) -> None:
        self.step, self.marker, self.rank, self.exit_code = step, Path(marker), rank, exit_code

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if (trainer.global_step == self.step and trainer.global_rank == self.rank
                and not self.marker.exists()):
            self.marker.write_text(f"crashed rank {self.rank} after step {self.step}\n")
            os._exit(self.exit_code)


class KillServerAt(Callback):
    """SIGKILLs process ``pid`` (a storage server the run reads from) right after optimizer
    step ``step``, on global rank 0, unless ``marker`` exists; it creates the marker first,
    so a resumed run that passes the step again leaves the server alone."""

    def __init__(self, step: int, pid: int, marker: str) -> None:
        self.step, self.pid, self.marker = step, pid, Path(marker)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if (trainer.global_step == self.step and trainer.global_rank == 0
                and not self.marker.exists()):
            self.marker.write_text(f"killed process {self.pid} after step {self.step}\n")
            os.kill(self.pid, signal.SIGKILL)
