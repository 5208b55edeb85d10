"""Batches a model learns within a few steps, for the tests that hold a training option
(float8, activation checkpointing) to the plain model's losses."""

from __future__ import annotations

import torch


def arithmetic_batch(step: int, b: int, t: int = 32) -> dict[str, torch.Tensor]:
    """Windows of arithmetic sequences mod 97 (a different offset per step and per row), as a
    Batch-contract dict over two domains: the loss falls by over a nat in a few AdamW steps,
    so a comparison of losses means something."""
    start = (torch.arange(b) * 7 + step * 3) % 97
    ids = (start[:, None] + torch.arange(t + 1)) % 97 * (1 + torch.arange(b)[:, None] % 3)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(), "domain": torch.arange(b) % 2}
