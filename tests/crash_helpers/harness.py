"""Kill ``lightning-aquila fit`` anywhere, resume it, and compare with an uninterrupted run.

A run is the console script on a generated YAML: aquila2-tiny on the bundled corpus, the
Training State Monitor and the Adaptive Training Engine with an EXP3 bandit policy,
``ModelCheckpoint`` every few steps with ``save_last``, ``deterministic: true``, and the
``StepRecorder``. Every launch passes ``--ckpt_path last``: the first one finds no checkpoint
and starts fresh, a relaunch resumes, exactly as a job script that is simply run again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_aquila.atomic import PARTIAL_SUFFIX

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("lightning-aquila")
MAX_STEPS = 30
CHECKPOINT_EVERY = 3
#: The monitor's loss interval and the policy's update interval: deliberately not a multiple
#: of CHECKPOINT_EVERY, so that checkpoints fall inside the monitor's accumulation intervals.
POLICY_EVERY = 5
EPOCH_BATCHES = 7  # short Lightning epochs: the runs also cross epoch boundaries
TIMEOUT = 300.0


def fit_config(run_dir: Path, store: str, devices: int = 1,
               extra_callbacks: list[dict[str, Any]] | None = None, num_nodes: int = 1,
               name: str = "fit.yaml") -> Path:
    """Writes ``run_dir/<name>`` and returns its path (``devices`` processes on each of
    ``num_nodes`` nodes)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "seed_everything": 1234,
        "trainer": {
            "accelerator": "cpu", "devices": devices, "num_nodes": num_nodes,
            "strategy": "ddp" if devices * num_nodes > 1 else "auto",
            "precision": "32-true", "deterministic": True, "max_steps": MAX_STEPS,
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "num_sanity_val_steps": 0, "limit_val_batches": 0,
            "default_root_dir": str(run_dir),
            "callbacks": [
                {"class_path": "lightning_aquila.callbacks.TrainingStateMonitor",
                 "init_args": {"train_loss_every_n_steps": POLICY_EVERY,
                               "grad_norm_every_n_steps": POLICY_EVERY,
                               "lr_every_n_steps": POLICY_EVERY,
                               "mixture_every_n_steps": POLICY_EVERY,
                               "throughput_every_n_steps": POLICY_EVERY,
                               "weight_stats_every_n_steps": POLICY_EVERY,
                               "probes_every_n_steps": None, "val_loss": False,
                               "run_dir": str(run_dir)}},
                {"class_path": "lightning_aquila.callbacks.AdaptiveTrainingEngine",
                 "init_args": {"policy": {
                     "class_path": "lightning_aquila.callbacks.policies.BanditMixture",
                     "init_args": {"update_every": POLICY_EVERY, "smoothing": 0.5,
                                   "min_weight": 0.05, "max_weight": 0.6}}}},
                {"class_path": "crash_helpers.StepRecorder",
                 "init_args": {"out": str(run_dir / "records")}},
                *(extra_callbacks or []),
                {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                 "init_args": {"dirpath": str(run_dir / "checkpoints"),
                               "every_n_train_steps": CHECKPOINT_EVERY, "save_last": True,
                               "filename": "{step}"}},
            ],
        },
        "model": {"preset": "aquila2-tiny", "config": {"max_seq_len": 32},
                  "learning_rate": 3.0e-3, "warmup_steps": 3},
        "data": {"class_path": "lightning_aquila.datamodules.DomainDataModule",
                 "init_args": {"store": store, "seq_len": 32, "batch_size": 4,
                               "weights": "natural", "num_workers": 0, "seed": 7,
                               "val_windows_per_domain": 0, "epoch_batches": EPOCH_BATCHES}},
    }
    path = run_dir / name
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def reference_run(factory: Any, store: str, devices: int) -> Path:
    """The run directory of a run on ``devices`` processes never killed, made once per test
    session (``factory``: pytest's ``tmp_path_factory``) whichever test file asks first."""
    run = factory.getbasetemp() / f"uninterrupted_{devices}proc"
    if not (run / "finished").exists():
        if run.exists():  # an earlier attempt in this session failed half-way
            shutil.rmtree(run)
        fit(run, fit_config(run, store, devices))
        (run / "finished").touch()
    return run


def environment(**extra: str) -> dict[str, str]:
    """The subprocess environment: ``crash_helpers`` importable, one thread per process (the
    same arithmetic in every run, and fair to a small machine)."""
    paths = [str(REPO / "tests"), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}


def fit_command(config: Path) -> list[str]:
    return [str(CLI), "fit", "--config", str(config), "--ckpt_path", "last"]


def start(run_dir: Path, command: list[str], env: dict[str, str] | None = None
          ) -> subprocess.Popen:
    """Starts ``command`` in its own process group (Lightning's launcher starts the other
    ranks inside it), appending its output to ``run_dir/launches.log``."""
    log = open(run_dir / "launches.log", "ab")  # noqa: SIM115 (closed with the process)
    log.write(f"\n===== {' '.join(command)}\n".encode())
    log.flush()
    process = subprocess.Popen(command, cwd=REPO, env=env or environment(), stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log  # type: ignore[attr-defined]
    return process


def finish(run_dir: Path, process: subprocess.Popen, timeout: float = TIMEOUT) -> None:
    """Waits for a run that should succeed; on failure the message holds its output."""
    try:
        code = process.wait(timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise AssertionError(f"run in {run_dir} timed out after {timeout}s:\n"
                             f"{log_tail(run_dir)}") from None
    except BaseException:  # an interrupted test session must not leave the ranks running
        kill_group(process)
        raise
    finally:
        process.log.close()  # type: ignore[attr-defined]
    assert code == 0, f"run in {run_dir} exited with {code}:\n{log_tail(run_dir)}"


def fit(run_dir: Path, config: Path, timeout: float = TIMEOUT) -> None:
    finish(run_dir, start(run_dir, fit_command(config)), timeout)


def log_tail(run_dir: Path, chars: int = 6000) -> str:
    path = run_dir / "launches.log"
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no output)"


def kill_group(process: subprocess.Popen) -> None:
    """SIGKILL every process of the run (all ranks), then reap the launcher."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    for _ in range(500):  # the other ranks are reaped by init; wait until they are gone
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


# -- killing -------------------------------------------------------------------------------------
@dataclass
class KillPoint:
    """Where a run is killed: ``mode="time"``: ``delay`` seconds after launch (import, setup);
    ``"step"``: ``delay`` seconds after step ``step`` was recorded; ``"write"``: at the first
    checkpoint write seen in progress after step ``step``."""

    mode: str
    step: int = 0
    delay: float = 0.0
    # what happened
    killed_after_step: int | None = None
    in_write: bool = False  # a checkpoint write was in progress (a partial file was left)
    partial_files: list[str] = field(default_factory=list)
    resumed_from: int | None = None  # the step of last.ckpt after the kill (None: fresh)
    finished_before_kill: bool = False

    @classmethod
    def draw(cls, rng: random.Random, mode: str | None = None) -> KillPoint:
        """A random kill point (of the given ``mode``, else any: 1/5 during start-up, 2/5
        after a step, 2/5 inside a checkpoint write)."""
        mode = mode or rng.choice(["time", "step", "step", "write", "write"])
        if mode == "time":
            return cls(mode, delay=round(rng.uniform(0.5, 8.0), 3))
        if mode == "step":
            return cls(mode, step=rng.randint(1, MAX_STEPS - 1),
                       delay=round(rng.uniform(0.0, 0.3), 3))
        return cls(mode, step=rng.randint(0, MAX_STEPS - 1))

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def recorded_steps(run_dir: Path, rank: int = 0) -> int:
    """The highest step in a rank's records so far (0 when none)."""
    path = run_dir / "records" / f"rank{rank}.jsonl"
    if not path.exists():
        return 0
    steps = [record["step"] for record in read_jsonl(path)]
    return max(steps, default=0)


def run_and_kill(run_dir: Path, config: Path, point: KillPoint,
                 env: dict[str, str] | None = None) -> KillPoint:
    """Launches the run (in a fresh run directory), kills its whole process group at
    ``point``, checks every checkpoint file left loads, and records what the kill hit."""
    checkpoints = run_dir / "checkpoints"
    process = start(run_dir, fit_command(config), env)
    started = time.monotonic()
    try:
        while process.poll() is None:
            if time.monotonic() - started > TIMEOUT:
                raise AssertionError(f"{point} not reached in {TIMEOUT}s:\n{log_tail(run_dir)}")
            if point.mode == "time":
                if time.monotonic() - started >= point.delay:
                    break
                time.sleep(0.01)
                continue
            if recorded_steps(run_dir) < point.step:
                time.sleep(0.002)
                continue
            if point.mode == "step":
                time.sleep(point.delay)
                break
            if _partials(checkpoints):  # "write": a checkpoint write is in progress
                break
            time.sleep(0.0005)
        if process.poll() is not None:
            point.finished_before_kill = True
    finally:
        kill_group(process)
        process.log.close()  # type: ignore[attr-defined]
    point.killed_after_step = recorded_steps(run_dir)
    point.partial_files = [p.name for p in _partials(checkpoints)]
    point.in_write = bool(point.partial_files)
    assert_checkpoints_readable(checkpoints)
    last = checkpoints / "last.ckpt"
    point.resumed_from = int(torch.load(last, map_location="cpu", weights_only=False)
                             ["global_step"]) if last.exists() else None
    return point


def _partials(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.name.endswith(PARTIAL_SUFFIX))
    except FileNotFoundError:
        return []


def assert_checkpoints_readable(directory: Path) -> None:
    """Every ``*.ckpt`` in ``directory`` loads completely (no truncated file under a real
    name; partial writes may only exist under their temporary names)."""
    if not directory.exists():
        return
    for path in sorted(directory.glob("*.ckpt")):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:
            raise AssertionError(f"checkpoint {path} is unreadable after a kill: {error!r}"
                                 ) from None
        assert "state_dict" in checkpoint and "global_step" in checkpoint, path


# -- comparing -----------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The whole lines of a JSONL file (a kill may have torn the last one)."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def step_records(run_dir: Path, rank: int) -> dict[int, dict[str, Any]]:
    """The last record of every step (a resumed run records the steps it redid again)."""
    return {record["step"]: record
            for record in read_jsonl(run_dir / "records" / f"rank{rank}.jsonl")}


def final_checkpoint(run_dir: Path) -> dict[str, Any]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=False)


#: TrainingState fields measured with a clock: they differ between any two runs.
TIMING_FIELDS = ("tokens_per_sec", "mfu")


def comparable_state(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What must be equal between a resumed and an uninterrupted run's final checkpoint:
    everything but file paths (ModelCheckpoint's state) and clock readings."""
    callbacks = {}
    for key, value in checkpoint["callbacks"].items():
        if key.startswith("ModelCheckpoint"):
            continue
        if key.startswith("TrainingStateMonitor"):
            value = {**value, "state": {k: v for k, v in value["state"].items()
                                        if k not in TIMING_FIELDS}}
        callbacks[key] = value
    return {"global_step": checkpoint["global_step"], "epoch": checkpoint["epoch"],
            "datamodule": checkpoint["DomainDataModule"], "callbacks": callbacks,
            "lr_schedulers": checkpoint["lr_schedulers"]}


def assert_same_run(reference: Path, run: Path, devices: int) -> None:
    """Step for step, on every rank: the same batch and bitwise the same loss and mixture;
    at the end: the same model, optimizer, scheduler, sampler position, mixture history and
    monitor/engine state."""
    for rank in range(devices):
        expected, got = step_records(reference, rank), step_records(run, rank)
        assert sorted(expected) == list(range(1, MAX_STEPS + 1)), sorted(expected)
        assert sorted(got) == sorted(expected), (
            f"rank {rank}: steps {sorted(set(expected) ^ set(got))} differ in presence")
        for step in sorted(expected):
            assert got[step] == expected[step], (
                f"rank {rank}, step {step}: resumed run recorded {brief(got[step])}, "
                f"uninterrupted run {brief(expected[step])}")
    want, have = final_checkpoint(reference), final_checkpoint(run)
    assert want["global_step"] == MAX_STEPS
    assert_equal_tree(comparable_state(have), comparable_state(want), "checkpoint")
    assert_equal_tree(have["state_dict"], want["state_dict"], "state_dict")
    assert_equal_tree(have["optimizer_states"], want["optimizer_states"], "optimizer_states")
    leftovers = _partials(run / "checkpoints")
    assert not leftovers, f"temporary files left after the resumed run finished: {leftovers}"


def brief(record: dict[str, Any]) -> dict[str, Any]:
    """A step record for a message: the samples' tokens as a hash."""
    windows = json.dumps(record.get("windows")).encode()
    return {**record, "windows": hashlib.sha256(windows).hexdigest()[:16]}


def assert_equal_tree(got: Any, expected: Any, where: str) -> None:
    """Exact equality of nested containers; tensors bitwise (``torch.equal``, same dtype)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(
            got, expected), f"{where}: tensors differ"
    elif isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected), (
            f"{where}: keys differ: {sorted(map(str, set(got) ^ set(expected)))}")
        for key in expected:
            assert_equal_tree(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(got, (list, tuple)) and len(got) == len(expected), (
            f"{where}: lengths differ ({got!r} vs {expected!r})")
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_equal_tree(a, b, f"{where}[{i}]")
    else:
        assert got == expected, f"{where}: {got!r} != {expected!r}"
