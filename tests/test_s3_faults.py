"""Object-store faults while training streams from ``s3://``: a real moto server process that
is stopped and started again, and a real proxy process in front of one that throttles
(``503 SlowDown``, slow answers), read by the DomainDataModule's loader with real workers.

What must hold: the batches are those of a fault-free run, in the same order (no window
lost or repeated); each waiting process says so in one line; an outage past
``storage_retry.max_wait_s`` stops the run with one line naming the store and the bound,
and a resume from the last checkpoint is exact.

The client's own retries are cut to one attempt (``CLIENT``), so that a fault of a few
seconds outlasts them as a fault of minutes outlasts their defaults; what carries the loader
through is then ``storage_retry`` alone (with ``max_wait_s: 0`` these tests fail).

``-m slow`` runs the figures of docs/crash-safety.md ("Object-store faults") and the same
through the ``lightning-aquila fit`` command line.
"""

from __future__ import annotations

import random
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from helpers.s3_faults import FaultProxy, MotoServer

from lightning_aquila.cli.errors import is_user_error, one_line
from lightning_aquila.datamodules import DomainDataModule
from lightning_aquila.datamodules.shard_format import DataError
from lightning_aquila.datamodules.storage_retry import StorageUnavailable

BUCKET, KEY = "faults", "s.zarr"
URL = f"s3://{BUCKET}/{KEY}"
#: Small chunks and one shuffled block: the loader reads new chunks at nearly every batch,
#: so a fault meets reads, not a warm cache.
DOMAINS = {"a": 24_000, "b": 16_000}
CHUNK_TOKENS = 256
LOADER = {"seq_len": 16, "batch_size": 4, "seed": 3, "shuffle_blocks": 1,
          "val_windows_per_domain": 0, "test_windows_per_domain": 0}
CLIENT = {"config_kwargs": {"retries": {"max_attempts": 1}}}
RETRY = {"max_wait_s": 60, "first_delay_s": 0.25, "max_delay_s": 1}
BOUND = {"max_wait_s": 3, "first_delay_s": 0.5, "max_delay_s": 1}
WAITING = re.compile(rf"^waiting for {re.escape(URL)} \(retry \d+, \d+ s of at most "
                     r"[\d.]+ s, loader worker (\d+)\): \S", re.M)


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fault-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fault-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def store(dmu_make_store) -> str:
    """A local store; every server of these tests serves a copy of it at ``URL``."""
    return dmu_make_store(DOMAINS, chunk_tokens=CHUNK_TOKENS)


@dataclass
class Outcome:
    """A faulted run against the fault-free one: window identities are the first token of
    each sample (``dmu_make_store`` writes each token's own position)."""

    equal: bool
    lost: int
    repeated: int
    waiting_workers: list[int]
    recovery_s: float
    injected: int


def read_batches(url: str, options: dict, count: int, *, workers: int, retry: dict,
                 at: dict[int, Callable[[], None]] | None = None
                 ) -> tuple[list[np.ndarray], list[float]]:
    """``count`` training batches (input ids and domain side by side) and when each came;
    ``at[k]()`` runs before batch ``k`` is asked for."""
    dm = DomainDataModule(url, num_workers=workers, storage_options=options,
                          storage_retry=retry, **LOADER)
    dm.setup("fit")
    iterator = iter(dm.train_dataloader())
    batches, times = [], []
    for k in range(count):
        if at and k in at:
            at[k]()
        batch = next(iterator)
        batches.append(np.column_stack([batch["input_ids"].numpy(), batch["domain"].numpy()]))
        times.append(time.monotonic())
    del iterator  # shuts the workers down
    return batches, times


def compare(expected: list[np.ndarray], got: list[np.ndarray], stderr: str,
            recovered_at: float, times: list[float], injected: int) -> Outcome:
    first = [Counter(int(row[0]) for batch in b for row in batch) for b in (expected, got)]
    after = [t for t in times if t >= recovered_at]
    return Outcome(
        equal=len(got) == len(expected) and all(
            np.array_equal(a, b) for a, b in zip(expected, got)),
        lost=sum((first[0] - first[1]).values()), repeated=sum((first[1] - first[0]).values()),
        waiting_workers=sorted(int(w) for w in WAITING.findall(stderr)),
        recovery_s=(after[0] - recovered_at) if after else float("nan"), injected=injected)


def restart_run(store: str, capfd, *, count: int = 40, at_batch: int = 12,
                down_s: float = 2.0, workers: int = 2, retry: dict = RETRY) -> Outcome:
    """Reads ``count`` batches from a moto server that is killed before batch ``at_batch``
    and started again ``down_s`` later (plus its start-up), against the same batches read
    from the local copy without any fault."""
    expected, _ = read_batches(store, {}, count, workers=0, retry=retry)
    server = MotoServer(store, BUCKET, KEY)
    server.start()
    back: list[float] = []

    def restart() -> None:
        time.sleep(down_s)
        server.start()
        back.append(time.monotonic())

    restarter = threading.Thread(target=restart, daemon=True)

    def stop() -> None:
        server.stop()
        restarter.start()

    try:
        capfd.readouterr()
        got, times = read_batches(URL, {"endpoint_url": server.url, **CLIENT}, count,
                                  workers=workers, retry=retry, at={at_batch: stop})
    finally:
        if restarter.is_alive():
            restarter.join(timeout=60)
        server.stop()
    return compare(expected, got, capfd.readouterr().err, back[0], times, injected=1)


def throttle_run(store: str, capfd, tmp_path: Path, *, count: int = 40, at_batch: int = 12,
                 error_s: float = 4.5, slow_s: float = 1.5, workers: int = 2,
                 retry: dict = RETRY) -> Outcome:
    """Reads ``count`` batches through the fault proxy: from batch ``at_batch`` on, every
    request is answered ``503 SlowDown`` after 0.1 s for ``error_s`` (longer than s3fs's own
    retries of a ``SlowDown``, about 2.5 s), then every third one and every answer 0.3 s
    late for ``slow_s``."""
    expected, _ = read_batches(store, {}, count, workers=0, retry=retry)
    server = MotoServer(store, BUCKET, KEY)
    server.start()
    proxy = FaultProxy(server.url, tmp_path)
    ends: list[float] = []

    def throttle() -> None:
        proxy.inject(error_s, error_every=1, delay_s=0.1)
        time.sleep(error_s)
        proxy.inject(slow_s, error_every=3, delay_s=0.3)
        time.sleep(slow_s)
        ends.append(time.monotonic())

    thread = threading.Thread(target=throttle, daemon=True)
    try:
        capfd.readouterr()
        got, times = read_batches(URL, {"endpoint_url": proxy.url, **CLIENT}, count,
                                  workers=workers, retry=retry, at={at_batch: thread.start})
        thread.join(timeout=60)
        injected = proxy.injected()
    finally:
        proxy.stop()
        server.stop()
    assert injected["delay"] > 0
    return compare(expected, got, capfd.readouterr().err, ends[0], times,
                   injected=injected["error"])


def test_a_server_restart_mid_run_delays_the_batches_and_changes_none(store, capfd):
    """Killed after 12 batches, back 2 s later (plus its start-up): the 40 batches are the
    fault-free ones, in order; each of the two workers that waited said so once."""
    outcome = restart_run(store, capfd)
    assert outcome.waiting_workers, "the outage met no read: the test proves nothing"
    assert len(set(outcome.waiting_workers)) == len(outcome.waiting_workers)
    assert (outcome.equal, outcome.lost, outcome.repeated) == (True, 0, 0)
    # the store is noticed back within one pause (max_delay_s), plus a read
    assert outcome.recovery_s < RETRY["max_delay_s"] + 2.0


def test_throttling_errors_and_slow_answers_delay_the_batches_and_change_none(
        store, capfd, tmp_path):
    """4.5 s of ``503 SlowDown`` on every request, then 1.5 s of slow answers and a 503 on
    every third: the 40 batches are the fault-free ones, in order."""
    outcome = throttle_run(store, capfd, tmp_path)
    assert outcome.injected > 0 and outcome.waiting_workers
    assert (outcome.equal, outcome.lost, outcome.repeated) == (True, 0, 0)


class Recorder(pl.LightningModule):
    """A one-weight model with optimizer state; records the batch of every step."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)  # every run starts from the same weights
        self.layer = torch.nn.Linear(1, 1)
        self.steps: dict[int, torch.Tensor] = {}

    def training_step(self, batch, batch_idx):
        self.steps[self.global_step] = batch["input_ids"].clone()
        features = (batch["input_ids"].float().mean(1, keepdim=True) % 97) / 97
        return self.layer(features).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


class StopServer(pl.Callback):
    def __init__(self, server: MotoServer, step: int) -> None:
        self.server, self.step, self.at = server, step, float("nan")

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            self.server.stop()
            self.at = time.monotonic()


def fit(url: str, options: dict, root: Path, *, steps: int = 16, workers: int = 1,
        callbacks: tuple = (), ckpt_path: str | None = None,
        module: Recorder | None = None) -> Recorder:
    dm = DomainDataModule(url, num_workers=workers, storage_options=options,
                          storage_retry=BOUND, **LOADER)
    module = module or Recorder()
    pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False,
               enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
               limit_val_batches=0, deterministic=True, default_root_dir=root,
               callbacks=[ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=4,
                                          save_last=True, save_top_k=-1), *callbacks],
               ).fit(module, dm, ckpt_path=ckpt_path)
    return module


def outage_past_the_bound(store: str, capfd, root: Path, *, stop_step: int = 5,
                          steps: int = 16) -> dict:
    """Fits ``steps`` steps from a server killed after ``stop_step`` that stays down; checks
    the stop; starts the server again and resumes from ``last.ckpt``; checks every step's
    batch and the final weights against an uninterrupted run. Returns what it measured."""
    whole = fit(store, {}, root / "whole", steps=steps, workers=0)
    server = MotoServer(store, BUCKET, KEY)
    server.start()
    options = {"endpoint_url": server.url, **CLIENT}
    try:
        capfd.readouterr()
        first, stopper = Recorder(), StopServer(server, stop_step)
        with pytest.raises(StorageUnavailable) as stopped:
            fit(URL, options, root / "run", steps=steps, callbacks=(stopper,), module=first)
        stop_s = time.monotonic() - stopper.at
        err = capfd.readouterr().err
        message = one_line(stopped.value)  # the worker's message, from its traceback
        assert is_user_error(stopped.value)  # the CLI prints it as its one line, exit 1
        assert message.startswith(f"{URL} stayed unreachable for ")
        assert "past storage_retry max_wait_s=3 " in message
        assert len(WAITING.findall(err)) == 1, err
        assert BOUND["max_wait_s"] <= stop_s < 60
        last = root / "run" / "ckpt" / "last.ckpt"
        resumed_from = torch.load(last, weights_only=False)["global_step"]
        assert stop_step - 4 < resumed_from <= max(first.steps) + 1 < steps
        server.start()
        resumed = fit(URL, options, root / "run", steps=steps, ckpt_path=str(last))
    finally:
        server.stop()
    assert sorted(resumed.steps) == list(range(resumed_from, steps))
    for step in range(steps):
        seen = (first if step < resumed_from else resumed).steps.get(step)
        assert seen is not None and torch.equal(seen, whole.steps[step]), step
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    return {"stop_s": stop_s, "resumed_from": resumed_from}


def test_an_outage_past_the_bound_stops_in_one_line_and_the_resume_is_exact(
        store, capfd, tmp_path):
    """The server dies after step 5 of 16 and stays down: the worker waits ``max_wait_s``
    (3 s), says so in one line, and the fit stops with one line naming the store and the
    bound. With the server back, the resume from ``last.ckpt`` trains the uninterrupted
    run's batches and ends at its weights, bitwise."""
    outage_past_the_bound(store, capfd, tmp_path)


def test_a_damaged_chunk_is_not_waited_for(store, tmp_path):
    """Retrying is for an unreachable store: a chunk that fails its checksum stops at once
    with the corruption message, whatever ``max_wait_s``."""
    chunk = next(Path(store).glob("a/train/*/tokens/c/3"))
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    dm = DomainDataModule(store, storage_retry={"max_wait_s": 600}, verify="none", **LOADER)
    dm.setup("fit")
    started = time.monotonic()
    with pytest.raises(DataError, match="chunk c/3 of 'tokens' could not be read"):
        dm.store.stream("a").read(3 * CHUNK_TOKENS, 3 * CHUNK_TOKENS + 1)
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(("retry", "wrong"), [
    ({"max_wait": 5}, "storage_retry: unknown key 'max_wait' (known: max_wait_s, "
                      "first_delay_s, max_delay_s)"),
    ({"max_wait_s": -1}, "storage_retry.max_wait_s must be a number of seconds >= 0, got -1"),
    ({"first_delay_s": "1s"}, "storage_retry.first_delay_s must be a number of seconds"),
    ({"max_wait_s": float("nan")}, "storage_retry.max_wait_s must be a number of seconds"),
    ({"first_delay_s": 0}, "storage_retry.first_delay_s must be > 0 when max_wait_s > 0"),
    ({"first_delay_s": 5, "max_delay_s": 2}, "storage_retry.max_delay_s (2) must be at least "
                                             "first_delay_s (5)"),
    (60, "storage_retry must be a mapping such as"),
])
def test_a_bad_storage_retry_is_one_line_naming_it(tmp_path, retry, wrong):
    with pytest.raises(DataError) as error:  # refused before the store is opened
        DomainDataModule(str(tmp_path / "none.zarr"), storage_retry=retry, **LOADER)
    assert wrong in str(error.value) and "\n" not in str(error.value)


# -- slow: the figures (docs/crash-safety.md) and the command line ------------------------
@pytest.mark.slow
def test_figures_of_object_store_faults(store, capfd, tmp_path):
    """``pytest -m slow -s tests/test_s3_faults.py -k figures``: 5 restarts and 5 throttling
    windows at seeded random batches and lengths, and 3 outages past the bound at random
    steps, each against a fault-free run; prints one table row per fault kind."""
    rng = random.Random(30)
    rows: dict[str, list[Outcome]] = {"restart": [], "throttle": []}
    for kind, outcomes in rows.items():
        for i in range(5):
            at, length = rng.randrange(5, 35), rng.uniform(2.0, 6.0)
            if kind == "restart":
                outcome = restart_run(store, capfd, count=60, at_batch=at, down_s=length)
            else:
                folder = tmp_path / f"{kind}{i}"
                folder.mkdir()
                outcome = throttle_run(store, capfd, folder, count=40, at_batch=at,
                                       error_s=length)
            with capfd.disabled():
                print(kind, at, f"{length:.1f} s", outcome)
            outcomes.append(outcome)
    bound = []
    for i in range(3):
        bound.append(outage_past_the_bound(store, capfd, tmp_path / f"bound{i}",
                                           stop_step=rng.randrange(2, 12)))
    with capfd.disabled():
        for kind, outcomes in rows.items():
            print(f"| {kind} | {len(outcomes)} ({sum(o.injected for o in outcomes)} errors) | "
                  f"{sum(o.equal for o in outcomes)} of {len(outcomes)} | "
                  f"{sum(o.lost for o in outcomes)} / {sum(o.repeated for o in outcomes)} | "
                  f"{min(o.recovery_s for o in outcomes):.1f}-"
                  f"{max(o.recovery_s for o in outcomes):.1f} s |")
        print(f"| past the bound | {len(bound)} | {len(bound)} of {len(bound)} | 0 / 0 | "
              f"stopped {min(b['stop_s'] for b in bound):.1f}-"
              f"{max(b['stop_s'] for b in bound):.1f} s after the kill; resumed from steps "
              f"{[b['resumed_from'] for b in bound]} |")
    assert all(o.equal and not o.lost and not o.repeated
               for outcomes in rows.values() for o in outcomes)


def edit_data(config: Path, **init_args) -> None:
    import yaml

    spec = yaml.safe_load(config.read_text())
    spec["data"]["init_args"].update(init_args)
    config.write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.mark.slow
def test_the_command_line_stops_in_one_line_and_resumes_exactly_with_ckpt_path_last(tmp_path):
    """``pytest -m slow tests/test_s3_faults.py -k command_line``: ``lightning-aquila fit``
    (the crash tests' run: aquila2-tiny, monitor, bandit engine, checkpoints every 3 steps)
    streams two domains of the bundled corpus (in chunks of 256 tokens, 8 windows, so that
    reads go on all run long)
    from ``s3://`` through a loader worker; the server is killed
    after step 10 and stays down past ``max_wait_s`` (3 s). The command exits 1 with one
    ``waiting for`` line and one error line, no traceback. With the server back, the same
    command (``--ckpt_path last``) ends as an uninterrupted run, bitwise."""
    from crash_helpers import harness
    from helpers.corpus import CORPUS, prepare_bundled_corpus

    files = {domain: sorted((CORPUS / domain).glob("*.jsonl"))[0].stem
             for domain in ("en_legal", "en_prose")}
    corpus_store = prepare_bundled_corpus(tmp_path, files, chunk_tokens=CHUNK_TOKENS)
    reference = tmp_path / "reference"
    config = harness.fit_config(reference, corpus_store)
    # a worker, as in the faulted run: with an adaptive policy the batch a weight change
    # applies from depends on how many batches are in flight
    edit_data(config, shuffle_blocks=1, num_workers=1)
    harness.fit(reference, config)
    server = MotoServer(corpus_store, BUCKET, KEY)
    server.start()
    run = tmp_path / "run"
    try:
        config = harness.fit_config(run, URL, extra_callbacks=[{
            "class_path": "crash_helpers.KillServerAt",
            "init_args": {"step": 10, "pid": server.process.pid,
                          "marker": str(tmp_path / "killed")}}])
        edit_data(config, shuffle_blocks=1, num_workers=1, storage_retry=BOUND,
                  storage_options={"endpoint_url": server.url, **CLIENT})
        process = harness.start(run, harness.fit_command(config))
        code = process.wait(harness.TIMEOUT)
        process.log.close()
        log = harness.log_tail(run, 1 << 20)
        assert code == 1, log[-6000:]
        errors = [line for line in log.splitlines() if "stayed unreachable" in line]
        assert len(errors) == 1 and errors[0].startswith(
            f"lightning-aquila fit: {URL} stayed unreachable for "), log[-6000:]
        assert "past storage_retry max_wait_s=3 " in errors[0]
        assert len(WAITING.findall(log)) == 1 and "Traceback" not in log, log[-6000:]
        server.stop()
        server.start()
        harness.fit(run, config)
    finally:
        server.stop()
    harness.assert_same_run(reference, run, 1)
