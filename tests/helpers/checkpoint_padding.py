"""``PaddedCheckpoint``: makes the checkpoints of one step large, so that their upload to an
object store lasts long enough (many parts) for a test to see it under way and kill it there.

The subprocess runs import it as ``helpers.checkpoint_padding.PaddedCheckpoint`` (the tests put
``tests/`` on its ``PYTHONPATH``). The padding is an extra top-level entry of the checkpoint,
which nothing restores; once ``marker`` exists (the test creates it after its kill), no more
padding, so the resumed run writes what an unpadded run writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class PaddedCheckpoint(Callback):
    def __init__(self, step: int, megabytes: int, marker: str) -> None:
        self.step, self.megabytes, self.marker = step, megabytes, Path(marker)

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.global_step == self.step and not self.marker.exists():
            checkpoint["padding"] = torch.zeros(self.megabytes << 18)  # float32: 4 bytes each
