"""A plain Lightning project, written without the library: what the callbacks must work
with in anyone's code. Its modules meet the Step output contract (``loss`` and
``sample_loss``), its batches the Batch contract (``domain``), its mixture the Mixture
contract and nothing more."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from torch import nn

VOCAB = 64


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def quiet_trainer(tmp_path: Path, callbacks, **kwargs) -> Trainer:
    """A one-CPU trainer with no logger, checkpoints, progress bar, summary or sanity run
    unless asked for."""
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(accelerator="cpu", devices=1, default_root_dir=tmp_path, callbacks=callbacks,
                   enable_progress_bar=False, enable_model_summary=False,
                   num_sanity_val_steps=0, **kwargs)


class TinyLM(LightningModule):
    """Embedding -> two residual blocks -> head; the loss is the token mean (labels -100
    ignored). At batch ``spike_at`` loss and sample losses are ``spike_factor`` times larger,
    at ``nan_at`` NaN. ``optimizer="adamw"``: two named parameter groups (matrices,
    vectors); ``"sgd"``: one."""

    def __init__(self, lr: float = 0.05, optimizer: str = "sgd", spike_at: int | None = None,
                 nan_at: int | None = None, spike_factor: float = 10.0) -> None:
        super().__init__()
        self.lr, self.optimizer_name, self.spike_at, self.nan_at = lr, optimizer, spike_at, nan_at
        self.spike_factor = spike_factor
        self.embed = nn.Embedding(VOCAB, 16)
        self.blocks = nn.ModuleList([nn.Linear(16, 16) for _ in range(2)])
        self.head = nn.Linear(16, VOCAB)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)

    def training_step(self, batch, batch_idx):
        per_token = F.cross_entropy(self(batch["input_ids"]).flatten(0, 1),
                                    batch["labels"].flatten(), ignore_index=-100,
                                    reduction="none").view_as(batch["labels"])
        mask = batch["labels"] != -100
        sample = (per_token * mask).sum(1) / mask.sum(1)
        loss = (per_token * mask).sum() / mask.sum()
        if batch_idx == self.spike_at:
            loss, sample = loss * self.spike_factor, sample * self.spike_factor
        if batch_idx == self.nan_at:
            loss, sample = loss * float("nan"), sample * float("nan")
        return {"loss": loss, "sample_loss": sample.detach()}

    def validation_step(self, batch, batch_idx):
        pass  # returns nothing: the monitor measures held-out loss itself

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW([
                {"params": [p for p in self.parameters() if p.ndim >= 2], "name": "matrices"},
                {"params": [p for p in self.parameters() if p.ndim < 2], "name": "vectors"}],
                lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class BagOfTokensLM(LightningModule):
    """Embedding -> head, no context at all: the smallest module that meets the Step output
    contract (each sample's loss is its mean token loss); plain SGD."""

    def __init__(self, vocab: int = 16, width: int = 8, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.embed, self.head = nn.Embedding(vocab, width), nn.Linear(width, vocab)

    def forward(self, input_ids):
        return self.head(self.embed(input_ids))

    def training_step(self, batch, batch_idx):
        per_token = F.cross_entropy(self(batch["input_ids"]).flatten(0, 1),
                                    batch["labels"].flatten(), reduction="none")
        per_token = per_token.view_as(batch["labels"])
        return {"loss": per_token.mean(), "sample_loss": per_token.mean(1).detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class PlainMixture:
    """The Mixture contract and nothing more: domains, weights, set_weights. It records each
    call (``calls``: weights and reason)."""

    def __init__(self, domains, weights=None) -> None:
        self.domains = list(domains)
        self._weights = dict(weights or dict.fromkeys(self.domains, 1 / len(self.domains)))
        self.calls: list[tuple[dict[str, float], str]] = []

    @property
    def weights(self):
        return dict(self._weights)

    def set_weights(self, weights, reason=""):  # exactly what the contract names
        self._weights = dict(weights)
        self.calls.append((dict(weights), reason))
