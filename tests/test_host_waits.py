"""A training step must not make the host wait for the GPU. Two kinds of call do, whatever
the device: making a device tensor from Python values (``torch.tensor(x, device=cuda)``
copies from pageable memory behind all queued work) and reading a device value back
(``.item()``, ``.tolist()``). Either drains the GPU's queue once per step (measured on an
H200: 7.2% of a 1B step idle against litgpt's 1.2%,
benchmarks/results/fit_path_h200x4_2026-11-27_notes.md). Where
they happen is the same on the CPU, so this runs a real fit with the TSM and ATE at their
default intervals and records both ops, with the code that called them, over steps that log
nothing. On the CPU
``.tolist()`` and ``.numpy()`` (after ``.cpu()``, a no-op there) reach no op, so the spy also
wraps those methods; on a GPU the twin test makes CUDA itself refuse any synchronising call."""

from __future__ import annotations

import json
import traceback
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_aquila import AquilaLM
from lightning_aquila.callbacks import (
    AdaptiveTrainingEngine,
    BanditMixture,
    TrainingStateMonitor,
)
from lightning_aquila.datamodules import DomainDataModule

PACKAGE = str(Path(__file__).resolve().parents[1] / "lightning_aquila")
HOST_OPS = {torch.ops.aten.lift_fresh.default: "tensor from Python values",
            torch.ops.aten._local_scalar_dense.default: "device value read"}
#: host-side by design: batches are built on the host, metrics for loggers are CPU tensors,
#: on the CPU the vocabulary check reads the ids (on CUDA it is an async assert), and the
#: monitor's ``HostRead.tolist`` reads a pinned host copy queued a step earlier (on CUDA it
#: waits for that copy's event only; on the CPU it is the tensor itself). Fused AdamW, the
#: CUDA default, is asked for: unfused AdamW reads its step counts on the CPU.
HOST_SIDE_FOLDERS = ("datamodules",)
HOST_SIDE_FUNCTIONS = ("_emit", "_log", "_check_vocabulary", "tolist")


class CallerSpy(TorchDispatchMode):
    """Counts each op of HOST_OPS, and each ``Tensor.tolist``/``Tensor.numpy`` call, by the
    innermost frame of this package (or of Lightning, where no package frame is on the
    stack) that made it."""

    READS = ("tolist", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[tuple[str, str, str, str]] = Counter()  # op, folder, file, function
        self._originals: dict[str, object] = {}

    def record(self, what: str, skip: int) -> None:
        frames = traceback.extract_stack()[:-skip]
        ours = [f for f in frames if f.filename.startswith(PACKAGE)]
        caller = (ours or [f for f in frames if "/lightning/" in f.filename] or frames)[-1]
        self.calls[(what, Path(caller.filename).parent.name, Path(caller.filename).name,
                    caller.name)] += 1

    def __enter__(self):
        for name in self.READS:
            original = self._originals[name] = getattr(torch.Tensor, name)

            def read(tensor, *args, _original=original, _name=name, **kwargs):
                self.record(f"device value read (.{_name}())", skip=2)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, read)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_OPS:
            self.record(HOST_OPS[func], skip=1)
        return func(*args, **(kwargs or {}))


class Window(Callback):
    """The spy on for optimizer steps [first, last): none of them a logging step."""

    def __init__(self, spy: CallerSpy, first: int, last: int) -> None:
        self.spy, self.first, self.last, self.on = spy, first, last, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            self.spy.__enter__()
            self.on = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.on and trainer.global_step == self.last:
            self.spy.__exit__(None, None, None)
            self.on = False


def fit_with_window(corpus_store: str, tmp_path: Path, window: Callback,
                    accelerator: str = "cpu", quality: dict | None = None) -> None:
    """A short fit with the TSM and ATE at their default intervals, logging every 10 steps;
    with ``quality`` batches carry scores, so the monitor's loss by score is on too."""
    trainer = Trainer(
        accelerator=accelerator, devices=1, max_steps=19, gradient_clip_val=1.0,
        log_every_n_steps=10, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[TrainingStateMonitor(run_dir=str(tmp_path / "run")),
                   AdaptiveTrainingEngine(policy=BanditMixture(update_every=10)), window],
    )
    module = AquilaLM(preset="aquila2-tiny", learning_rate=3e-4, warmup_steps=2,
                      fused_optimizer=True)
    data = DomainDataModule(corpus_store, seq_len=64, batch_size=2, num_workers=0,
                            val_windows_per_domain=0, quality=quality)
    trainer.fit(module, data)


def test_steps_between_logging_steps_neither_copy_python_values_to_the_device_nor_read_it(
        corpus_store, tmp_path):
    spy = CallerSpy()
    fit_with_window(corpus_store, tmp_path, Window(spy, first=12, last=18))

    assert sum(spy.calls.values()) > 0  # the spy saw the steps (the batches, at least)
    device_side = {call: n for call, n in spy.calls.items()
                   if call[1] not in HOST_SIDE_FOLDERS and call[3] not in HOST_SIDE_FUNCTIONS}
    assert device_side == {}


def test_loss_by_score_adds_no_host_wait_between_logging_steps(corpus_store, tmp_path):
    import shutil

    from lightning_aquila.datamodules.scores import attach_score
    from lightning_aquila.datamodules.store import ShardStore

    store = str(tmp_path / "scored.zarr")
    shutil.copytree(corpus_store, store)
    rng = np.random.default_rng(0)
    for domain, info in ShardStore(store).domains.items():
        attach_score(store, domain, "hq", {split: rng.random(sum(
            s.documents for s in info.segments.get(split, ()))).astype(np.float32)
            for split in ("train", "heldout")})
    spy = CallerSpy()
    fit_with_window(store, tmp_path, Window(spy, first=12, last=18),
                    quality={"score": "hq", "temperature": 1.0})
    rows = (tmp_path / "run" / "tsm" / "metrics.jsonl").read_text().splitlines()
    assert any(key.startswith("tsm/train_loss_by_score/") for r in rows for key in json.loads(r))
    device_side = {call: n for call, n in spy.calls.items()
                   if call[1] not in HOST_SIDE_FOLDERS and call[3] not in HOST_SIDE_FUNCTIONS}
    assert device_side == {}


def test_the_spy_sees_a_tolist_and_a_numpy_read_in_a_training_step(corpus_store, tmp_path,
                                                                    monkeypatch):
    """The spy itself: a ``.tolist()`` and a ``.cpu().numpy()`` added to ``training_step``
    are each counted against it (the reads that the test above must catch)."""
    original = AquilaLM.training_step

    def reading_step(self, batch, batch_idx):
        out = original(self, batch, batch_idx)
        loss = out["loss"] if isinstance(out, dict) else out
        loss.detach().tolist()
        loss.detach().cpu().numpy()
        return out

    monkeypatch.setattr(AquilaLM, "training_step", reading_step)
    spy = CallerSpy()
    fit_with_window(corpus_store, tmp_path, Window(spy, first=12, last=18))
    device_side = {call[0] for call in spy.calls
                   if call[1] not in HOST_SIDE_FOLDERS and call[3] not in HOST_SIDE_FUNCTIONS}
    assert device_side == {"device value read (.tolist())", "device value read (.numpy())"}


class SyncErrors(Callback):
    """CUDA's own check on for optimizer steps [first, last): any call that waits for the
    GPU raises."""

    def __init__(self, first: int, last: int) -> None:
        self.first, self.last = first, last

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first:
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.last:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_steps_between_logging_steps_never_synchronise(corpus_store, tmp_path):
    try:
        fit_with_window(corpus_store, tmp_path, SyncErrors(first=12, last=18), "gpu")
    finally:
        torch.cuda.set_sync_debug_mode("default")
