"""Kill it anywhere, lose nothing.

``lightning-aquila fit`` (aquila2-tiny, the monitor, the engine with an EXP3 bandit policy,
checkpoints every 3 steps with ``save_last``) runs as a subprocess and is SIGKILLed at a
seeded random point: during start-up, after some step, or in the middle of a checkpoint
write. Every checkpoint file left must load; relaunching the same command
(``--ckpt_path last``) must then finish with, step for step and on every rank, the batch, the
bitwise loss and the mixture of an uninterrupted run, and end with the same model,
optimizer, sampler position, mixture history and monitor/engine state. Under torchrun with
``--max-restarts``, a rank that dies is restarted together with the others, and they resume
from the last checkpoint by themselves.

CI runs three kill points (two on one process, one on two processes); ``-m slow`` runs
twenty more (``KILL_SEED`` picks other ones). Each prints what its kill hit (``-s``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from crash_helpers import harness
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO

from lightning_aquila import AquilaLM
from lightning_aquila.atomic import atomic_file, partial_files, replace_directory
from lightning_aquila.callbacks import TrainingStateMonitor
from lightning_aquila.checkpoint import AtomicCheckpointIO
from lightning_aquila.cli.run_folder import checkpoint_step
from lightning_aquila.cli.same_resume import resume_point
from lightning_aquila.cli.trainer import with_atomic_checkpoint_io
from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.strategies import AquilaParallelStrategy

KILL_SEED = int(os.environ.get("KILL_SEED", "2029"))


@pytest.fixture(scope="session")
def crash_store(corpus_store: str) -> str:
    return corpus_store


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, crash_store: str):
    """``uninterrupted(devices)``: the run directory of a run never killed (once each per
    session; ``test_several_nodes.py`` shares it)."""
    return lambda devices: harness.reference_run(tmp_path_factory, crash_store, devices)


def kill_points(count: int, seed: int, modes: list[str] | None = None) -> list:
    """``count`` kill points drawn by a seeded RNG (``modes``: of these modes, in order)."""
    rng = random.Random(seed)
    modes = modes or [None] * count
    points = [harness.KillPoint.draw(rng, mode) for mode in modes]
    return [pytest.param(p, id=f"{p.mode}-step{p.step}-delay{p.delay}") for p in points]


def kill_resume_compare(point: harness.KillPoint, devices: int, run: Path, store: str,
                        reference: Path) -> None:
    config = harness.fit_config(run, store, devices)
    harness.run_and_kill(run, config, point)
    print(f"\nkill point ({devices} process(es)): {json.dumps(point.summary())}")
    assert not point.finished_before_kill, f"the run ended before {point} was reached"
    harness.fit(run, config)  # the same command again: resumes from last.ckpt
    harness.assert_same_run(reference, run, devices)


# -- kill anywhere ---------------------------------------------------------------------------
@pytest.mark.parametrize("point", kill_points(2, KILL_SEED, ["write", "step"]))
def test_a_killed_run_resumes_exactly_on_one_process(point, crash_store, uninterrupted,
                                                     tmp_path):
    kill_resume_compare(point, 1, tmp_path, crash_store, uninterrupted(1))


@pytest.mark.parametrize("point", kill_points(1, KILL_SEED + 1, ["write"]))
def test_a_killed_run_resumes_exactly_on_two_processes(point, crash_store, uninterrupted,
                                                       tmp_path):
    kill_resume_compare(point, 2, tmp_path, crash_store, uninterrupted(2))


@pytest.mark.slow
@pytest.mark.parametrize("point", kill_points(10, KILL_SEED + 100))
def test_ten_random_kills_resume_exactly_on_one_process(point, crash_store, uninterrupted,
                                                        tmp_path):
    kill_resume_compare(point, 1, tmp_path, crash_store, uninterrupted(1))


@pytest.mark.slow
@pytest.mark.parametrize("point", kill_points(10, KILL_SEED + 200))
def test_ten_random_kills_resume_exactly_on_two_processes(point, crash_store, uninterrupted,
                                                          tmp_path):
    kill_resume_compare(point, 2, tmp_path, crash_store, uninterrupted(2))


# -- torchrun --max-restarts ---------------------------------------------------------------
def test_torchrun_restarts_a_dead_rank_and_the_job_resumes_from_the_last_checkpoint(
        crash_store, uninterrupted, tmp_path):
    """Rank 1 exits hard after step 11 (checkpoints at 9 and 12): torchrun stops rank 0,
    starts both again, and the unchanged command resumes from step 9 to an end identical to
    a run never interrupted."""
    crash = {"class_path": "crash_helpers.CrashOnce",
             "init_args": {"step": 11, "rank": 1, "marker": str(tmp_path / "crashed")}}
    config = harness.fit_config(tmp_path, crash_store, 2, extra_callbacks=[crash])
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
               "--no-python", *harness.fit_command(config)]
    # torch's c10d rendezvous shares one TCPStore across restarts, and a restarted gloo group
    # then reads the dead group's addresses (pytorch/pytorch#135712); docs/crash-safety.md
    env = harness.environment(TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    harness.finish(tmp_path, harness.start(tmp_path, command, env))
    assert (tmp_path / "crashed").exists()
    log = (tmp_path / "launches.log").read_text(errors="replace")
    assert "exitcode: 17" in log  # the crash happened, and torchrun saw it
    assert f"Restored all states from the checkpoint at {tmp_path / 'checkpoints'}" in log
    harness.assert_same_run(uninterrupted(2), tmp_path, 2)


# -- atomic checkpoint files -----------------------------------------------------------------
def test_atomic_checkpoint_io_writes_the_whole_file_and_leaves_no_temporary(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    for value in (1, 2):
        io.save_checkpoint({"global_step": value, "weights": torch.full((1000,), value)}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 2
    assert sorted(os.listdir(path.parent)) == [".last.ckpt.crc32c.json", "last.ckpt"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("serialisation failed half-way")


def test_a_failed_write_leaves_the_previous_checkpoint_as_it_was(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="half-way"):
        io.save_checkpoint({"global_step": 2, "weights": torch.ones(10**5),
                            "broken": _FailsToPickle()}, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [".last.ckpt.crc32c.json", "last.ckpt"]


_SLOW_WRITER = """
import sys, torch
from lightning_aquila.checkpoint import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"global_step": 1}, sys.argv[1])
print("first", flush=True)
while True:  # large writes until killed
    io.save_checkpoint({"global_step": 2, "padding": torch.ones(2**24)}, sys.argv[1])
"""


def test_a_write_killed_midway_leaves_the_old_file_and_a_hidden_partial_that_the_next_write_removes(
        tmp_path):
    path = tmp_path / "last.ckpt"
    for _ in range(5):  # the kill may land between two writes: then try again
        process = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(path)],
                                   stdout=subprocess.PIPE, env=harness.environment())
        assert process.stdout.readline().strip() == b"first"
        deadline = time.monotonic() + 120
        while not partial_files(path) and time.monotonic() < deadline:
            time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
        if partial_files(path):
            break
    left = partial_files(path)
    assert len(left) == 1 and left[0].name.startswith(".last.ckpt.")
    assert not left[0].name.endswith(".ckpt")
    assert torch.load(path, weights_only=True)["global_step"] in (1, 2)  # whole, old or new
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert partial_files(path) == []
    assert sorted(os.listdir(tmp_path)) == [".last.ckpt.crc32c.json", "last.ckpt"]


def test_atomic_file_text_mode_and_failure(tmp_path):
    path = tmp_path / "report.html"
    with atomic_file(path, "w", encoding="utf-8") as handle:
        handle.write("<p>one</p>")
    with pytest.raises(ValueError, match="stop"), atomic_file(path, "w") as handle:
        handle.write("<p>two</p>")
        raise ValueError("stop")
    assert path.read_text() == "<p>one</p>" and os.listdir(tmp_path) == ["report.html"]


def test_a_checkpoint_directory_is_replaced_whole(tmp_path):
    """Sharded checkpoints are directories: the new one takes the old one's place at once
    (renameat2 exchange where the filesystem has it), and the old one is deleted."""
    old, new = tmp_path / "last.ckpt", tmp_path / ".last.ckpt.partial"
    old.mkdir()
    (old / "shard0").write_text("old")
    new.mkdir()
    (new / "shard0").write_text("new")
    (new / "shard1").write_text("new")
    replace_directory(new, old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert sorted(p.name for p in old.iterdir()) == ["shard0", "shard1"]
    assert (old / "shard0").read_text() == "new"


def test_the_cli_writes_checkpoints_atomically_unless_configured_otherwise():
    [added] = with_atomic_checkpoint_io(None, "ddp")
    assert isinstance(added, AtomicCheckpointIO)
    assert with_atomic_checkpoint_io([TorchCheckpointIO()], "auto") is None
    strategy = pl.strategies.DDPStrategy(checkpoint_io=TorchCheckpointIO())
    assert with_atomic_checkpoint_io(None, strategy) is None
    wrapper = AsyncCheckpointIO()
    assert with_atomic_checkpoint_io([wrapper], "auto") is None
    assert isinstance(wrapper.checkpoint_io, AtomicCheckpointIO)


def test_the_cli_trainer_gets_atomic_checkpoint_io(crash_store, monkeypatch):
    from lightning.pytorch import LightningDataModule

    from lightning_aquila.cli.trainer import AquilaCLI

    monkeypatch.setattr(sys, "argv", ["lightning-aquila"])
    cli = AquilaCLI(AquilaLM, LightningDataModule, subclass_mode_data=True, run=False,
                    args=["--data", "lightning_aquila.datamodules.DomainDataModule",
                          "--data.store", crash_store, "--trainer.logger", "false"])
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)


#: One entry per unpickling of a ``Loaded`` (a read of a checkpoint that holds one).
LOADS: list[int] = []


def _loaded() -> Loaded:
    LOADS.append(1)
    return Loaded()


class Loaded:
    """Counts the reads of a checkpoint it is saved in: each unpickling calls ``_loaded``."""

    def __reduce__(self):
        return _loaded, ()


def test_the_checks_of_a_resume_read_its_checkpoint_once(tmp_path):
    """The finished-run check and ``SameResumeOnEveryRank`` both need the step of the
    checkpoint a fit resumes from: it is read once (Lightning's load in ``fit`` is the only
    other read), and again only once the file is replaced."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 12, "counted": Loaded()}, path)
    LOADS.clear()
    assert checkpoint_step(path) == 12
    assert resume_point(path) == (12, path.stat().st_size)
    assert len(LOADS) == 1
    AtomicCheckpointIO().save_checkpoint({"global_step": 13, "counted": Loaded()}, path)
    assert resume_point(path) == (13, path.stat().st_size) and len(LOADS) == 2


def test_aquila_parallel_strategy_defaults_to_atomic_checkpoint_io():
    assert isinstance(AquilaParallelStrategy().checkpoint_io, AtomicCheckpointIO)
    given = TorchCheckpointIO()
    strategy = AquilaParallelStrategy()
    strategy.checkpoint_io = given
    assert strategy.checkpoint_io is given


# -- a resume bug the kill tests found -------------------------------------------------------
def _monitor_run(store: str, out: Path, max_steps: int, resume: str | None = None
                 ) -> TrainingStateMonitor:
    monitor = TrainingStateMonitor(train_loss_every_n_steps=5, val_loss=False,
                                   weight_stats_every_n_steps=None, run_files=False)
    trainer = pl.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        default_root_dir=out, callbacks=[monitor, ModelCheckpoint(
            dirpath=out / "ckpt", every_n_train_steps=3, save_top_k=-1)])
    pl.seed_everything(0, verbose=False)
    trainer.fit(AquilaLM(preset="aquila2-tiny", warmup_steps=2, decay_steps=100),
                DomainDataModule(store, seq_len=32, batch_size=4, val_windows_per_domain=0),
                ckpt_path=resume)
    return monitor


def test_a_checkpoint_inside_a_loss_interval_resumes_the_interval_bitwise(crash_store,
                                                                          tmp_path):
    """The per-domain loss of steps 6..10 is reported at step 10; a resume from the
    checkpoint at step 9 must still count steps 6..9 (found by the kill tests: the monitor
    used to drop them, and the bandit policy then drifted from the uninterrupted run)."""
    whole = _monitor_run(crash_store, tmp_path / "whole", 10)
    resumed = _monitor_run(crash_store, tmp_path / "resumed", 10,
                           str(tmp_path / "whole" / "ckpt" / "epoch=0-step=9.ckpt"))
    assert resumed.state.train_step == whole.state.train_step == 10
    assert resumed.state.train_loss_last == whole.state.train_loss_last
    assert resumed.state.train_loss == whole.state.train_loss
    assert resumed.state.tokens_per_domain == whole.state.tokens_per_domain


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
