"""Several "nodes" on one host, and the global sample sequence of a run.

A node is one torchrun agent (``--nnodes N --node-rank R --rdzv-backend c10d
--rdzv-endpoint 127.0.0.1:PORT``) in its own process group, running ``lightning-aquila fit
--config ... --ckpt_path last`` as its workers, as a job script would on every node of a
cluster. A fault kills one worker (``kill_worker``) or the whole job (``stop``).

A sample is identified by its domain and the index of its window in that domain's training
stream. Runs record each sample's tokens (``StepRecorder``'s ``windows``); ``SampleIds``
turns them back into window indices by reading the store, and ``replay`` draws the sequence
that DESIGN.md's determinism contract says a run must have trained on: the pure function of
(seed, mixture history), computed by a fresh single-process sampler from the final
checkpoint's mixture history.
"""

from __future__ import annotations

import contextlib
import glob
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from helpers.ports import free_port

from crash_helpers import harness

TORCHRUN = Path(sys.executable).with_name("torchrun")
#: torch's c10d rendezvous shares one TCPStore across restarts, and a restarted gloo group
#: then reads the dead group's addresses (pytorch/pytorch#135712; docs/crash-safety.md)
RESTART_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


@dataclass
class Job:
    """A torchrun job of ``nnodes`` nodes of ``nproc`` processes running ``config``; node 0
    hosts the rendezvous store (``is_host``), as a cluster's head node would."""

    run_dir: Path
    config: Path
    nnodes: int
    nproc: int = 1
    max_restarts: int = 0
    port: int = field(default_factory=free_port)
    rdzv_id: str = field(default_factory=lambda: f"aquila-{uuid.uuid4().hex[:8]}")
    agents: list[subprocess.Popen] = field(default_factory=list)
    #: another configuration for some nodes (node -> config), e.g. another checkpoint folder
    node_configs: dict[int, Path] = field(default_factory=dict)

    def command(self, node: int) -> list[str]:
        return [str(TORCHRUN), "--nnodes", str(self.nnodes), "--node-rank", str(node),
                "--nproc-per-node", str(self.nproc), "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{self.port}", "--rdzv-id", self.rdzv_id,
                "--rdzv-conf", f"is_host={int(node == 0)}",
                "--max-restarts", str(self.max_restarts), "--no-python",
                *harness.fit_command(self.node_configs.get(node, self.config))]

    def start_node(self, node: int) -> subprocess.Popen:
        """Starts (or replaces) node ``node``'s agent, appending its output to
        ``run_dir/node<node>.log``."""
        command = self.command(node)
        log = open(self.run_dir / f"node{node}.log", "ab")  # noqa: SIM115 (closed in stop)
        log.write(f"\n===== {' '.join(command)}\n".encode())
        log.flush()
        agent = subprocess.Popen(command, cwd=harness.REPO,
                                 env=harness.environment(**RESTART_ENV), stdout=log,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        agent.log = log  # type: ignore[attr-defined]
        agent.node = node  # type: ignore[attr-defined]
        self.agents.append(agent)
        return agent

    def start(self) -> Job:
        for node in range(self.nnodes):
            self.start_node(node)
        return self

    def live(self) -> list[subprocess.Popen]:
        return [agent for agent in self.agents if agent.poll() is None]

    def running(self) -> list[subprocess.Popen]:
        """The agents not stopped by ``stop``, whether or not they have exited."""
        return [agent for agent in self.agents if not getattr(agent, "stopped", False)]

    def logs(self) -> str:
        return logs(self.run_dir)

    def finish(self, timeout: float = harness.TIMEOUT) -> None:
        """Waits for every node to succeed; on a failure or a timeout stops them all."""
        deadline = time.monotonic() + timeout
        try:
            for agent in self.running():
                code = agent.wait(max(1.0, deadline - time.monotonic()))
                assert code == 0, (f"node {agent.node} exited with {code}:\n"  # type: ignore
                                   f"{self.logs()[-8000:]}")
        except subprocess.TimeoutExpired:
            raise AssertionError(f"nodes of {self.run_dir} timed out:\n"
                                 f"{self.logs()[-8000:]}") from None
        finally:
            self.stop()

    def stop(self, agents: list[subprocess.Popen] | None = None) -> None:
        """SIGKILL every process of the given nodes (all: the job's allocation ends).
        torchrun starts each worker in a session of its own, so the agent is stopped first
        (it can start no other), then its descendants are killed, then its own group."""
        for agent in self.running() if agents is None else agents:
            with contextlib.suppress(ProcessLookupError):
                os.kill(agent.pid, signal.SIGSTOP)
            for pid in descendants(agent.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            harness.kill_group(agent)
            agent.log.close()  # type: ignore[attr-defined]
            agent.stopped = True  # type: ignore[attr-defined]

    def workers(self) -> dict[int, int]:
        """The live workers of every live node: global rank -> pid."""
        return {rank: pid for agent in self.live() for rank, pid in workers(agent).items()}

    def kill_worker(self, rank: int) -> int:
        """SIGKILLs the worker of global rank ``rank`` (whichever node the rendezvous gave
        it: c10d ignores ``--node-rank``); returns the pid."""
        pid = self.workers().get(rank)
        assert pid is not None, f"no live worker of rank {rank}"
        os.kill(pid, signal.SIGKILL)
        return pid

    def _check_alive(self, waiting_for: str) -> None:
        if any(agent.poll() is not None for agent in self.running()):
            raise AssertionError(f"a node ended before {waiting_for}:\n{self.logs()[-8000:]}")

    def wait_for_step(self, step: int, rank: int = 0) -> float:
        """Waits until ``rank`` recorded ``step`` or a later one; returns the time it
        happened (``time.monotonic``)."""
        deadline = time.monotonic() + harness.TIMEOUT
        while time.monotonic() < deadline:
            if harness.recorded_steps(self.run_dir, rank) >= step:
                return time.monotonic()
            self._check_alive(f"rank {rank} recorded step {step}")
            time.sleep(0.005)
        raise AssertionError(f"rank {rank} did not record step {step}:\n{self.logs()[-8000:]}")

    def wait_for_restart(self, dead: set[int]) -> tuple[float, int]:
        """After a fault (or a launch: ``dead`` empty): waits until every node runs new
        workers (none of the ``dead`` pids; old workers are all gone by then) and rank 0
        records a step; returns the time of that record and the step the job resumed from
        (that step - 1)."""
        deadline = time.monotonic() + harness.TIMEOUT
        while time.monotonic() < deadline:
            found = self.workers()
            if len(found) == self.nnodes * self.nproc and not set(found.values()) & dead:
                break
            self._check_alive("the restart")
            time.sleep(0.005)
        else:
            raise AssertionError(f"no restart in {harness.TIMEOUT}s:\n{self.logs()[-8000:]}")
        seen = record_count(self.run_dir)
        while time.monotonic() < deadline:
            if record_count(self.run_dir) > seen:
                return time.monotonic(), first_step_after(self.run_dir, seen) - 1
            self._check_alive("a step after the restart")
            time.sleep(0.005)
        raise AssertionError(f"no step after the restart:\n{self.logs()[-8000:]}")


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("node*.log")))


def children(pid: int) -> list[int]:
    found = []
    for path in glob.glob(f"/proc/{pid}/task/*/children"):
        with contextlib.suppress(OSError):
            found += map(int, Path(path).read_text().split())
    return found


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        found.append(todo.pop())
        todo += children(found[-1])
    return found


def workers(agent: subprocess.Popen) -> dict[int, int]:
    """An agent's live workers: global rank -> pid."""
    found = {}
    for pid in children(agent.pid):
        with contextlib.suppress(OSError):
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            rank = [v for v in env if v.startswith(b"RANK=")]
            if rank:
                found[int(rank[0][5:])] = pid
    return found


def record_count(run_dir: Path, rank: int = 0) -> int:
    path = run_dir / "records" / f"rank{rank}.jsonl"
    return len(harness.read_jsonl(path)) if path.exists() else 0


def first_step_after(run_dir: Path, count: int, rank: int = 0) -> int:
    """The step of a rank's record number ``count`` (0-based): the first step a launch or
    restart trained, when ``count`` records were there before it."""
    return harness.read_jsonl(run_dir / "records" / f"rank{rank}.jsonl")[count]["step"]


def with_layout(config: Path, devices: int, num_nodes: int, name: str) -> Path:
    """A copy of the run's configuration for another node layout (same run directory)."""
    data = yaml.safe_load(config.read_text())
    data["trainer"].update(devices=devices, num_nodes=num_nodes,
                           strategy="ddp" if devices * num_nodes > 1 else "auto")
    path = config.with_name(name)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# -- samples ---------------------------------------------------------------------------------
Sample = tuple[int, int]  # (domain index, window index)


class SampleIds:
    """Window index of a sample from its tokens. A window whose tokens occur more than once
    in its domain (a few dozen of the bundled corpus's 36,641 at seq_len 32) is named by the
    first of them, on both sides of every comparison (``canonical``)."""

    def __init__(self, store: str, seq_len: int) -> None:
        from lightning_aquila.datamodules import DomainDataModule

        module = DomainDataModule(store, seq_len=seq_len, verify="none")
        shards, domains = module.store, module.domains  # the batch's domain indices
        self.lookup: dict[tuple[int, bytes], int] = {}
        self.first: list[np.ndarray] = []
        for d, name in enumerate(domains):
            stream = shards.stream(name)
            tokens = stream.read(0, stream.n_tokens)
            count = stream.windows(seq_len)
            first = np.empty(count, dtype=np.int64)
            for w in range(count):
                key = (d, tokens[w * seq_len:w * seq_len + seq_len + 1].tobytes())
                first[w] = self.lookup.setdefault(key, w)
            self.first.append(first)

    def of(self, row: Sequence[int]) -> Sample:
        """``row``: a domain index, then the window's tokens (``StepRecorder``'s ``windows``)."""
        key = (int(row[0]), np.asarray(row[1:], dtype=np.uint32).tobytes())
        if key not in self.lookup:
            raise AssertionError(f"a trained window of domain {row[0]} is in no training window "
                                 "of the store")
        return key[0], self.lookup[key]

    def canonical(self, sample: Sample) -> Sample:
        return sample[0], int(self.first[sample[0]][sample[1]])


def trained(run_dir: Path, world: int, ids: SampleIds) -> dict[int, list[Sample]]:
    """Step -> the samples of that global batch, rank 0's micro-batch first (the order of the
    global batch: rank r takes its r-th slice), from the last record of each step."""
    per_rank = [harness.step_records(run_dir, rank) for rank in range(world)]
    steps = sorted(per_rank[0])
    assert all(sorted(records) == steps for records in per_rank), "ranks recorded other steps"
    return {step: [ids.of(row) for records in per_rank for row in records[step]["windows"]]
            for step in steps}


def replay(run_dir: Path, config: Path, steps: int, ids: SampleIds) -> dict[int, list[Sample]]:
    """The first ``steps`` global batches that (seed, the final checkpoint's mixture history)
    define, drawn by one fresh sampler of the whole global batch on one process."""
    from lightning_aquila.datamodules import DomainDataModule

    data = yaml.safe_load(config.read_text())
    world = data["trainer"]["devices"] * data["trainer"].get("num_nodes", 1)
    args = {**data["data"]["init_args"], "verify": "none"}
    args["batch_size"] *= world * data["trainer"].get("accumulate_grad_batches", 1)
    module = DomainDataModule(**args)
    module.setup("fit")
    history = harness.final_checkpoint(run_dir)["DomainDataModule"]["mixture"]
    module.mixture.load_state_dict(history)
    sampler = module.sampler
    sampler.consume_on_yield = True
    batches: list[np.ndarray] = []
    while len(batches) < steps:  # each iterator stops at a nominal epoch's end
        for spec in sampler:
            batches.append(spec)
            if len(batches) == steps:
                break
    return {step + 1: [ids.canonical((int(d), int(w))) for d, w in spec[:, :2]]
            for step, spec in enumerate(batches)}


def lost_and_repeated(got: dict[int, list[Sample]], want: dict[int, list[Sample]]
                      ) -> tuple[int, int]:
    """Samples of ``want`` that ``got`` never trained on, and samples ``got`` trained on
    more often than ``want`` did (counted over the whole run)."""
    have = Counter(s for batch in got.values() for s in batch)
    need = Counter(s for batch in want.values() for s in batch)
    return sum((need - have).values()), sum((have - need).values())


def summary(found: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in found.items())
