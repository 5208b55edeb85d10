"""Runs ``train.py`` in a subprocess (Lightning's launcher starts the other ranks) and reads
back what each rank recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN = Path(__file__).with_name("train.py")


def run_training(out: Path, *args: str, devices: int = 1, timeout: float = 300) -> list[dict]:
    """``train.py --out OUT --devices N ARGS``; the per-rank records, rank 0 first."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    command = [sys.executable, str(TRAIN), "--out", str(out), "--devices", str(devices), *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode:
        raise AssertionError(f"{' '.join(command)} exited with {result.returncode}:\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]


def cached_run(factory: pytest.TempPathFactory, name: str, *args: str,
               devices: int = 1) -> list[dict]:
    """``run_training`` once per test session for a given ``name`` (the single-process
    reference is shared by several test files)."""
    out = factory.getbasetemp() / "strategy_runs" / name
    if all((out / f"rank{r}.json").exists() for r in range(devices)):
        return [json.loads((out / f"rank{r}.json").read_text()) for r in range(devices)]
    return run_training(out, *args, devices=devices)


def tiny_init(factory: pytest.TempPathFactory) -> str:
    """A seeded aquila2-tiny as a Hugging Face directory: every run starts from its weights,
    whatever the strategy builds the model with."""
    from lightning_aquila import AquilaConfig, AquilaModel, export_hf

    path = factory.getbasetemp() / "aquila2_tiny_init"
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        export_hf(AquilaModel(AquilaConfig.from_name("aquila2-tiny")), path, overwrite=True)
    return str(path)


def losses(record: dict[str, Any]) -> list[float]:
    return [record["losses"][k] for k in sorted(record["losses"], key=int)]
