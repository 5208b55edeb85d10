"""Several nodes: two torchrun agents on one host, each a "node" of one process, meeting
through a c10d rendezvous (``crash_helpers.nodes``), train ``lightning-aquila fit``
(aquila2-tiny, gloo on CPU, the run of ``test_crash_resume.py``: monitor, EXP3 bandit engine,
checkpoints every 3 steps, ``--ckpt_path last``, 30 steps).

What must hold:

* two nodes of one process train bitwise as one node of two processes;
* a node whose worker is SIGKILLed is restarted by torchrun (``--max-restarts``) together
  with the other node, the job resumes from the last checkpoint by itself, and it ends at
  the weights of a run never interrupted;
* the same run, stopped on two nodes, continues on one node of two processes.

Besides the bitwise comparison with an uninterrupted run, every run's global sample sequence
(which window of which domain each global batch trained on) is checked against the one the
determinism contract defines (``nodes.replay``) and for windows drawn twice, so that a
sampler bug the uninterrupted run shares is caught as well.

CI runs the first case and the kill-restart-move story (about 70 s on two cores, the
uninterrupted run shared with ``test_crash_resume.py``); ``-m slow`` kills a worker at
seeded random points (``KILL_SEED`` picks others) and replaces a lost node. Each prints
what it measured (``-s``).
"""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from crash_helpers import harness, nodes
from helpers.ports import free_port

from lightning_aquila.atomic import PARTIAL_SUFFIX
from lightning_aquila.cli.same_resume import SameResumeOnEveryRank

KILL_SEED = int(os.environ.get("KILL_SEED", "3030"))
SEQ_LEN = 32


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, corpus_store: str) -> Path:
    """The uninterrupted run on one node of two processes."""
    return harness.reference_run(tmp_path_factory, corpus_store, 2)


@pytest.fixture(scope="module")
def sample_ids(corpus_store: str) -> nodes.SampleIds:
    return nodes.SampleIds(corpus_store, SEQ_LEN)


def assert_exact_sample_sequence(run: Path, config: Path, reference: Path,
                                 ids: nodes.SampleIds) -> tuple[int, int]:
    """The run's global sample sequence is the uninterrupted run's and the one (seed, mixture
    history) defines, and no window is drawn twice (240 draws, every domain has over 1,300
    windows, so none may be); returns (lost, repeated) against the uninterrupted run."""
    got, want = nodes.trained(run, 2, ids), nodes.trained(reference, 2, ids)
    lost, repeated = nodes.lost_and_repeated(got, want)
    assert (lost, repeated) == (0, 0), f"{lost} samples lost, {repeated} repeated"
    assert got == want
    assert got == nodes.replay(run, config, harness.MAX_STEPS, ids)
    drawn = [sample for batch in got.values() for sample in batch]
    assert len(drawn) == harness.MAX_STEPS * 8 and len(set(drawn)) == len(drawn), (
        f"{len(drawn) - len(set(drawn))} windows drawn twice")
    return lost, repeated


def newest_checkpoint(step: int) -> set[int]:
    """The step of the newest whole checkpoint once rank 0 had recorded ``step`` and no later
    one: the checkpoint of ``step`` itself may not be written yet (it is saved after the
    record). A run that resumed from any other, or from scratch, lost or redid work."""
    every = harness.CHECKPOINT_EVERY
    return {step // every * every} | ({step - every} if step % every == 0 else set())


def test_two_nodes_of_one_process_train_bitwise_as_one_node_of_two(
        corpus_store, one_node, sample_ids, tmp_path):
    config = harness.fit_config(tmp_path, corpus_store, devices=1, num_nodes=2)
    nodes.Job(tmp_path, config, nnodes=2).start().finish()
    assert nodes.record_count(tmp_path) == harness.MAX_STEPS  # one launch, nothing redone
    assert_exact_sample_sequence(tmp_path, config, one_node, sample_ids)
    harness.assert_same_run(one_node, tmp_path, 2)


def test_a_killed_node_is_restarted_and_the_run_then_moves_to_one_node_exactly(
        corpus_store, one_node, sample_ids, tmp_path):
    """Two nodes with ``--max-restarts 1``: the worker of rank 1 is SIGKILLed after step 10;
    torchrun restarts both nodes' workers, which resume from the checkpoint of step 9 by
    themselves. After step 19 the whole job is killed (the allocation ends), and the same
    run goes on as ``torchrun --nnodes 1 --nproc-per-node 2``, from step 18 to 30."""
    config = harness.fit_config(tmp_path, corpus_store, devices=1, num_nodes=2)
    job = nodes.Job(tmp_path, config, nnodes=2, max_restarts=1).start()
    try:
        job.wait_for_step(10, rank=1)
        before = set(job.workers().values())
        job.kill_worker(rank=1)
        killed_at, killed_after = time.monotonic(), harness.recorded_steps(tmp_path)
        back, restarted_from = job.wait_for_restart(before)
        job.wait_for_step(19)
    finally:
        job.stop()
    assert restarted_from in newest_checkpoint(killed_after) and restarted_from > 0
    log = job.logs()
    assert "exitcode: -9" in log  # torchrun saw its worker killed
    assert f"Restored all states from the checkpoint at {tmp_path / 'checkpoints'}" in log

    stopped = harness.recorded_steps(tmp_path)
    one = nodes.with_layout(config, devices=2, num_nodes=1, name="one_node.yaml")
    moved_at = time.monotonic()
    job = nodes.Job(tmp_path, one, nnodes=1, nproc=2).start()
    first_step, moved_from = job.wait_for_restart(set())
    job.finish()
    assert moved_from in newest_checkpoint(stopped) and moved_from > restarted_from
    lost, repeated = assert_exact_sample_sequence(tmp_path, one, one_node, sample_ids)
    harness.assert_same_run(one_node, tmp_path, 2)
    print("\n" + nodes.summary({
        "killed_rank": 1, "killed_after_step": killed_after, "restarted_from": restarted_from,
        "recovery_s": round(back - killed_at, 1), "moved_after_step": stopped,
        "moved_from": moved_from, "move_s": round(first_step - moved_at, 1), "lost": lost,
        "repeated": repeated}))


# -- ranks that would resume from different checkpoints --------------------------------------
def _resume_on_rank(rank: int, init: str, cases: list[list[str | None]], out: str) -> None:
    """Rank ``rank`` of ``len(case)``: the guard's answer for each case (what each rank
    resolved), one line each in ``out/rank<rank>.txt``."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=len(cases[0]))
    results = []
    try:
        for paths in cases:
            try:
                SameResumeOnEveryRank(paths[rank]).setup(
                    SimpleNamespace(world_size=len(paths)), None, "fit")
                results.append("went on")
            except SystemExit as stop:
                results.append(str(stop))
    finally:
        dist.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text("\n".join(results))


def test_ranks_that_would_resume_from_different_checkpoints_all_stop_in_one_line(tmp_path):
    """Each process resolves ``--ckpt_path last`` on its own; on nodes with folders of their
    own, one may find step 3 and another nothing. Copies of one checkpoint under other paths
    (one shared folder mounted elsewhere) are the same resume."""
    (tmp_path / "node0").mkdir(), (tmp_path / "node1").mkdir(), (tmp_path / "node2").mkdir()
    step3, copy, step6 = (tmp_path / f"node{n}" / "last.ckpt" for n in range(3))
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(4)}}, step3)
    shutil.copy(step3, copy)
    torch.save({"global_step": 6, "state_dict": {"w": torch.zeros(4)}}, step6)
    cases = [[str(step3), str(copy)], [None, None], [str(step3), None], [str(step3), str(step6)]]
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_resume_on_rank, args=(init, cases, str(tmp_path)), nprocs=2)
    answers = [(tmp_path / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert answers[0] == answers[1]  # every rank stops, or none
    same, fresh, mixed, other_step = answers[0]
    assert same == fresh == "went on"
    assert mixed == (
        "lightning-aquila fit: the ranks would resume from different checkpoints (rank(s) 0: "
        f"step 3 ({step3}); rank(s) 1: a fresh start); the checkpoint folder must be one that "
        "every node sees (shared storage), not a disk of each node's own. Stopping before "
        "training")
    assert f"(rank(s) 0: step 3 ({step3}); rank(s) 1: step 6 ({step6}))" in other_step


# -- slow: random kills, a lost node, moves in both directions -------------------------------
def kill_points(count: int, seed: int) -> list:
    """``count`` faults drawn by a seeded RNG: SIGKILL the worker of a random rank some delay
    after a random step ("step"), or rank 0's (the writer's) while a checkpoint write is in
    progress ("write")."""
    rng = random.Random(seed)
    points = []
    for index in range(count):
        mode = ("step", "write")[index % 2]
        rank = 0 if mode == "write" else rng.randint(0, 1)
        step, delay = rng.randint(2, 26), round(rng.uniform(0.0, 0.4), 3)
        points.append(pytest.param((mode, rank, step, delay),
                                   id=f"{mode}-rank{rank}-step{step}-delay{delay}"))
    return points


def checkpoint_write_in_progress(run: Path) -> bool:
    folder = run / "checkpoints"
    return folder.exists() and any(p.name.endswith(PARTIAL_SUFFIX) for p in folder.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("point", kill_points(6, KILL_SEED))
def test_random_worker_kills_on_two_nodes_end_bitwise_equal(point, corpus_store, one_node,
                                                            sample_ids, tmp_path):
    """``KILL_SEED=3030 pytest -m slow -s tests/test_several_nodes.py -k random_worker``"""
    mode, rank, step, delay = point
    config = harness.fit_config(tmp_path, corpus_store, devices=1, num_nodes=2)
    job = nodes.Job(tmp_path, config, nnodes=2, max_restarts=1).start()
    try:
        job.wait_for_step(step, rank=rank)
        if mode == "write":
            deadline = time.monotonic() + harness.TIMEOUT
            while not checkpoint_write_in_progress(tmp_path) and time.monotonic() < deadline:
                time.sleep(0.0005)
        else:
            time.sleep(delay)
        before = set(job.workers().values())
        in_write = checkpoint_write_in_progress(tmp_path)
        job.kill_worker(rank)
        killed_at, killed_after = time.monotonic(), harness.recorded_steps(tmp_path)
        back, restarted_from = job.wait_for_restart(before)
        job.finish()
    finally:
        job.stop()
    assert restarted_from in newest_checkpoint(killed_after), killed_after
    lost, repeated = assert_exact_sample_sequence(tmp_path, config, one_node, sample_ids)
    harness.assert_same_run(one_node, tmp_path, 2)
    print("\n" + nodes.summary({
        "mode": mode, "killed_rank": rank, "killed_after_step": killed_after,
        "in_write": in_write, "restarted_from": restarted_from,
        "recovery_s": round(back - killed_at, 1), "lost": lost, "repeated": repeated}))


@pytest.mark.slow
def test_a_lost_node_is_replaced_and_the_job_ends_bitwise_equal(corpus_store, one_node,
                                                                sample_ids, tmp_path):
    """Node 1 disappears whole (its agent and worker SIGKILLed) after step 13, and a
    replacement node joins the rendezvous 3 s later, as a scheduler would start one: node 0's
    agent restarts its worker, and both resume from step 12.
    ``pytest -m slow -s tests/test_several_nodes.py -k lost_node``"""
    config = harness.fit_config(tmp_path, corpus_store, devices=1, num_nodes=2)
    job = nodes.Job(tmp_path, config, nnodes=2, max_restarts=1).start()
    try:
        job.wait_for_step(13)
        before = set(job.workers().values())
        job.stop([job.agents[1]])
        killed_at, killed_after = time.monotonic(), harness.recorded_steps(tmp_path)
        time.sleep(3)
        job.start_node(1)
        back, restarted_from = job.wait_for_restart(before)
        job.finish()
    finally:
        job.stop()
    assert restarted_from in newest_checkpoint(killed_after) and restarted_from > 0
    lost, repeated = assert_exact_sample_sequence(tmp_path, config, one_node, sample_ids)
    harness.assert_same_run(one_node, tmp_path, 2)
    print("\n" + nodes.summary({
        "killed_after_step": killed_after, "restarted_from": restarted_from,
        "recovery_s (3 s without a node)": round(back - killed_at, 1), "lost": lost,
        "repeated": repeated}))


def move_points(seed: int) -> list:
    rng = random.Random(seed)
    return [pytest.param((before, after, rng.randint(4, 26)),
                         id=f"{before[0]}x{before[1]}-to-{after[0]}x{after[1]}")
            for before, after in [((2, 1), (1, 2)), ((1, 2), (2, 1))] * 2]


@pytest.mark.slow
@pytest.mark.parametrize("point", move_points(KILL_SEED + 1))
def test_a_run_stopped_anywhere_moves_between_one_and_two_nodes_exactly(
        point, corpus_store, one_node, sample_ids, tmp_path):
    """The whole job is killed after a random step on one layout (nodes x processes) and
    the run goes on, ``--ckpt_path last``, on the other.
    ``KILL_SEED=3030 pytest -m slow -s tests/test_several_nodes.py -k moves``"""
    (nodes_before, nproc_before), (nodes_after, nproc_after), step = point
    config = harness.fit_config(tmp_path, corpus_store, devices=nproc_before,
                                num_nodes=nodes_before)
    job = nodes.Job(tmp_path, config, nnodes=nodes_before, nproc=nproc_before).start()
    try:
        job.wait_for_step(step)
    finally:
        job.stop()
    stopped = harness.recorded_steps(tmp_path)
    after = nodes.with_layout(config, devices=nproc_after, num_nodes=nodes_after,
                              name="moved.yaml")
    moved_at = time.monotonic()
    job = nodes.Job(tmp_path, after, nnodes=nodes_after, nproc=nproc_after).start()
    first_step, moved_from = job.wait_for_restart(set())
    job.finish()
    assert moved_from in newest_checkpoint(stopped)
    lost, repeated = assert_exact_sample_sequence(tmp_path, after, one_node, sample_ids)
    harness.assert_same_run(one_node, tmp_path, 2)
    print("\n" + nodes.summary({
        "moved_after_step": stopped, "moved_from": moved_from,
        "move_s": round(first_step - moved_at, 1), "lost": lost, "repeated": repeated}))


@pytest.mark.slow
def test_nodes_with_checkpoint_folders_of_their_own_stop_before_training(corpus_store, tmp_path):
    """Node 0's folder holds the checkpoint of step 3, node 1's (``dirpath`` of its own, as on
    a node-local disk) none. Before the guard, rank 0 resumed at step 4 and rank 1 started at
    step 1, trained together, and hung.
    ``pytest -m slow -s tests/test_several_nodes.py -k their_own``"""
    config = harness.fit_config(tmp_path, corpus_store, devices=1, num_nodes=2)
    job = nodes.Job(tmp_path, config, nnodes=2).start()
    try:
        job.wait_for_step(4)
    finally:
        job.stop()
    data = yaml.safe_load(config.read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["dirpath"] = str(tmp_path / "node1_checkpoints")
    own = config.with_name("node1.yaml")
    own.write_text(yaml.safe_dump(data, sort_keys=False))
    seen = [nodes.record_count(tmp_path, rank) for rank in range(2)]
    job = nodes.Job(tmp_path, config, nnodes=2, node_configs={1: own}).start()
    with pytest.raises(AssertionError, match="exited with 1"):
        job.finish()
    assert [nodes.record_count(tmp_path, rank) for rank in range(2)] == seen  # no step taken
    assert "the ranks would resume from different checkpoints (rank(s) 0: step 3" in job.logs()
    assert "rank(s) 1: a fresh start)" in job.logs()
