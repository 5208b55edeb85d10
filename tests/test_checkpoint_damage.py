"""A damaged checkpoint is found before training starts, and never loaded.

Each checkpoint gets a size + CRC32C record at save (``checkpoint_record``). A run of the
crash tests' configuration (``crash_helpers.harness``: aquila2-tiny, monitor, bandit engine,
checkpoints every 3 steps with ``save_last``, all of them kept) dies hard after step 20,
leaving ``step=3.ckpt`` ... ``step=18.ckpt`` and ``last.ckpt`` (step 18). The tests damage
copies of that folder and relaunch ``lightning-aquila fit --ckpt_path last``: it must fall back
to the newest intact checkpoint, say so in one line, and end bitwise equal to a run never
interrupted; or stop in one line when nothing is intact. Sharded checkpoints are written by
``AquilaParallelStrategy`` (FSDP2, one gloo process) and damaged shard by shard.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from crash_helpers import harness
from distributed_helpers.launch import run_training, tiny_init

from lightning_aquila.checkpoint import AtomicCheckpointIO
from lightning_aquila.checkpoint_check import checked_resume_path
from lightning_aquila.checkpoint_record import (
    MANIFEST_NAME,
    ChecksumWriter,
    begin_record,
    commit_record,
    read_sidecar,
    sidecar_path,
    verify,
)

CRASH_STEP = 20  # checkpoints at 3, 6, ..., 18 survive it


def keep_all_checkpoints(config: Path) -> Path:
    data = yaml.safe_load(config.read_text())
    for callback in data["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["save_top_k"] = -1
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_store) -> Path:
    """A run never interrupted."""
    run = tmp_path_factory.mktemp("uninterrupted")
    harness.fit(run, keep_all_checkpoints(harness.fit_config(run, corpus_store)))
    return run


def crash_run(run: Path, store: str) -> tuple[Path, Path]:
    """A run in ``run`` that exits hard after step 20 (``CrashOnce``); its checkpoint folder
    and the configuration that resumes it (the same, without the crash). Each resume test
    crashes its own run: ``ModelCheckpoint`` keeps its state only in the folder it wrote."""
    crash = {"class_path": "crash_helpers.CrashOnce",
             "init_args": {"step": CRASH_STEP, "marker": str(run / "crashed")}}
    config = keep_all_checkpoints(harness.fit_config(run, store, extra_callbacks=[crash]))
    process = harness.start(run, harness.fit_command(config))
    try:
        assert process.wait(harness.TIMEOUT) == 17, harness.log_tail(run)
    finally:
        process.log.close()
    return run / "checkpoints", keep_all_checkpoints(harness.fit_config(run, store))


@pytest.fixture(scope="module")
def crashed(tmp_path_factory, corpus_store) -> Path:
    """The folder of a crashed run, for tests that only read copies of it."""
    run = tmp_path_factory.mktemp("crashed")
    crash_run(run, corpus_store)
    return run


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def flip_byte(path: Path, offset: int = -4096) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def relaunch(run: Path, config: Path) -> tuple[int, list[str]]:
    """``fit --ckpt_path last`` again; its exit code and the lines it printed."""
    log = run / "launches.log"
    before = log.stat().st_size if log.exists() else 0
    process = harness.start(run, harness.fit_command(config))
    try:
        code = process.wait(harness.TIMEOUT)
    finally:
        process.log.close()
    with open(log, "rb") as handle:
        handle.seek(before)
        text = handle.read().decode(errors="replace")
    return code, [line for line in text.splitlines() if not line.startswith("=====")]


def lines_with(lines: list[str], text: str) -> list[str]:
    return [line for line in lines if text in line]


# -- resume from damage ------------------------------------------------------------------------
def test_a_truncated_last_checkpoint_falls_back_to_the_newest_intact_one_and_resumes_exactly(
        reference, corpus_store, tmp_path):
    checkpoints, config = crash_run(tmp_path, corpus_store)
    recorded = (checkpoints / "last.ckpt").stat().st_size
    truncate(checkpoints / "last.ckpt")
    left = (checkpoints / "last.ckpt").stat().st_size
    code, lines = relaunch(tmp_path, config)
    assert code == 0, "\n".join(lines[-40:])
    [said] = lines_with(lines, "is damaged")
    assert said == (f"lightning-aquila fit: checkpoint {checkpoints / 'last.ckpt'} is damaged "
                    f"(size {left} bytes, recorded "
                    f"{recorded}); resuming from "
                    f"{checkpoints / 'step=18.ckpt'} instead")
    harness.assert_same_run(reference, tmp_path, 1)


def test_a_flipped_byte_is_detected_and_the_run_resumes_exactly_from_an_older_checkpoint(
        reference, corpus_store, tmp_path):
    """The same size, one bit different: only the checksum tells. Step 18's file is damaged
    too, so the run goes back to step 15 and redoes 16..30."""
    checkpoints, config = crash_run(tmp_path, corpus_store)
    flip_byte(checkpoints / "step=18.ckpt")
    flip_byte(checkpoints / "last.ckpt")
    code, lines = relaunch(tmp_path, config)
    assert code == 0, "\n".join(lines[-40:])
    [said] = lines_with(lines, "is damaged")
    assert said.startswith(f"lightning-aquila fit: checkpoint {checkpoints / 'last.ckpt'} is "
                           "damaged (checksum mismatch: crc32c ")
    assert said.endswith(f"; resuming from {checkpoints / 'step=15.ckpt'} instead "
                         "(1 newer one(s) damaged too)")
    harness.assert_same_run(reference, tmp_path, 1)


def test_with_no_intact_checkpoint_the_run_stops_in_one_line_before_training(
        crashed, corpus_store, tmp_path):
    for part in ("checkpoints", "records"):
        shutil.copytree(crashed / part, tmp_path / part)
    checkpoints = tmp_path / "checkpoints"
    config = harness.fit_config(tmp_path, corpus_store)
    for path in checkpoints.glob("*.ckpt"):
        truncate(path)
    records = (tmp_path / "records" / "rank0.jsonl").read_bytes()
    code, lines = relaunch(tmp_path, config)
    assert code != 0
    printed = [line for line in lines if line.strip() and line != "Seed set to 1234"]
    assert len(printed) == 1, printed  # one line, no traceback
    assert printed[0].startswith(f"lightning-aquila fit: checkpoint {checkpoints / 'last.ckpt'} "
                                 "is damaged (size ")
    assert f"no intact checkpoint is left in {checkpoints} (also damaged: " in printed[0]
    assert printed[0].endswith("; stopping before training")
    assert (tmp_path / "records" / "rank0.jsonl").read_bytes() == records  # no step ran


def test_a_checkpoint_without_a_record_is_resumed_with_a_note(crashed, tmp_path, capsys):
    """Written before records existed: accepted, once, with a note that it is unverified."""
    shutil.copytree(crashed / "checkpoints", tmp_path / "checkpoints")
    last = tmp_path / "checkpoints" / "last.ckpt"
    sidecar_path(last).unlink()
    assert checked_resume_path("last", [tmp_path / "checkpoints"]) == str(last)
    [note] = capsys.readouterr().err.splitlines()
    assert note == (f"lightning-aquila fit: checkpoint {last} has no size/checksum record "
                    f"(.last.ckpt.crc32c.json): it was written without one and cannot be "
                    "verified; resuming from it")


def test_the_checkpoint_loader_refuses_a_damaged_file(crashed, tmp_path):
    """Outside the CLI (``Trainer.fit(ckpt_path=...)``) the damaged file is not loaded
    either: ``AtomicCheckpointIO.load_checkpoint`` checks the record first."""
    shutil.copytree(crashed / "checkpoints", tmp_path / "checkpoints")
    path = tmp_path / "checkpoints" / "step=9.ckpt"
    flip_byte(path)
    with pytest.raises(ValueError, match=r"step=9.ckpt is damaged \(checksum mismatch"):
        AtomicCheckpointIO().load_checkpoint(path)


# -- the crash window of a save --------------------------------------------------------------
def test_a_crash_between_the_record_and_the_rename_leaves_both_states_verifiable(tmp_path):
    """A save's steps one by one (``checkpoint_record``'s docstring): at every point
    between them the file under the name verifies, and a damaged one does not."""
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "weights": torch.ones(1000)}, path)
    old = path.read_bytes()
    # 1. the new file, complete, under its temporary name
    temporary = tmp_path / ".last.ckpt.new.partial"
    with open(temporary, "wb") as handle:
        writer = ChecksumWriter(handle)
        torch.save({"global_step": 2, "weights": torch.zeros(1000)}, writer)
    # 2. the record: the old file is still in place, and it verifies
    begin_record(path, writer.record)
    assert len(read_sidecar(path)) == 2
    assert verify(path).state == "intact" and path.read_bytes() == old
    # 3. the rename: the new file verifies before the sidecar is rewritten
    os.replace(temporary, path)
    assert verify(path).state == "intact" and path.read_bytes() != old
    # 4. only the new record; the old bytes no longer pass under the name
    commit_record(path, writer.record)
    assert verify(path).state == "intact" and len(read_sidecar(path)) == 1
    path.write_bytes(old)
    assert verify(path).state == "damaged"


def test_a_file_damaged_inside_the_window_still_looks_damaged(tmp_path):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"weights": torch.ones(1000)}, path)
    flip_byte(path, offset=-200)
    temporary = tmp_path / ".last.ckpt.new.partial"
    with open(temporary, "wb") as handle:
        writer = ChecksumWriter(handle)
        torch.save({"weights": torch.zeros(1000)}, writer)
    begin_record(path, writer.record)
    assert verify(path).state == "damaged"


# -- sharded checkpoints -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """``aquila_fsdp`` on one gloo process, a sharded checkpoint after steps 1 and 2."""
    out = tmp_path_factory.mktemp("sharded") / "run"
    run_training(out, "--init-from", tiny_init(tmp_path_factory), "--steps", "2",
                 "--strategy", "aquila_fsdp", "--checkpoint-every", "1")
    return out / "checkpoints"


def test_a_sharded_checkpoint_records_every_file_in_its_manifest(sharded):
    assert sorted(p.name for p in (sharded / "step2.ckpt").iterdir()) == [
        ".metadata", "__0_0.distcp", MANIFEST_NAME, "meta.pt"]
    assert verify(sharded / "step2.ckpt").state == "intact"


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped"])
def test_a_damaged_shard_is_detected_and_the_resume_falls_back(sharded, damage, tmp_path,
                                                               capsys):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(sharded, checkpoints)
    shard = checkpoints / "step2.ckpt" / "__0_0.distcp"
    {"missing": Path.unlink, "truncated": truncate, "flipped": flip_byte}[damage](shard)
    problem = {"missing": "missing shard __0_0.distcp",
               "truncated": "shard __0_0.distcp is ",
               "flipped": "shard __0_0.distcp: checksum mismatch"}[damage]
    assert problem in verify(checkpoints / "step2.ckpt").problem
    resumed = checked_resume_path(str(checkpoints / "step2.ckpt"), [checkpoints])
    assert resumed == str(checkpoints / "step1.ckpt")
    [said] = capsys.readouterr().err.splitlines()
    assert problem in said and said.endswith(f"resuming from {resumed} instead")
