"""Checkpoints on object storage: ``--trainer.default_root_dir s3://bucket/run`` keeps the
checkpoints, ``config.yaml`` and the TSM run files in the bucket, and ``--ckpt_path last``
resumes bitwise; a SIGKILL in the middle of the upload of a later ``last.ckpt`` leaves the
previous one, which the relaunch loads, saying so in one line (``checkpoint_remote``).

Against a real S3 server process (moto, the ``moto_endpoint`` fixture of ``conftest.py``),
reached as in production: credentials and endpoint in the environment
(``AWS_ENDPOINT_URL_S3``). The runs are the crash tests' configuration
(``crash_helpers.harness``: aquila2-tiny, monitor, bandit engine, ``StepRecorder``) with a
narrower model (hidden size 32: 12 MB checkpoints, uploaded in two 8 MiB parts) and a
checkpoint every 6 steps. ``-m slow`` kills six more uploads, of
``last.ckpt`` and of ``step=N.ckpt`` at the checkpoints of steps 12, 18 and 24; each prints
what it hit and how long the relaunch took to train again (``-s``)::

    pytest tests/test_s3_checkpoints.py -m slow -s
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from crash_helpers import harness
from helpers.tiny_project import VOCAB, TinyLM, quiet_trainer
from torch.utils.data import DataLoader, Dataset

s3fs = pytest.importorskip("s3fs")

from lightning_aquila import checkpoint_remote  # noqa: E402
from lightning_aquila.checkpoint import AtomicCheckpointIO  # noqa: E402
from lightning_aquila.checkpoint_check import checked_resume_path  # noqa: E402
from lightning_aquila.checkpoint_record import Record, Verdict  # noqa: E402
from lightning_aquila.cli.run_folder import previous_run_files  # noqa: E402

BUCKET = "aquila-checkpoints"
KEY, SECRET = "s3-checkpoint-test-key", "s3-checkpoint-test-secret-never-written"
CHECKPOINT_EVERY = 6
PART = 5 << 20


@pytest.fixture(scope="module")
def s3_env(moto_endpoint, tmp_path_factory):
    """Credentials, endpoint and the run files' local cache in the environment, of this
    process and of the runs it starts (``harness.environment`` copies it)."""
    env = {"AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": moto_endpoint,
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache"))}
    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()  # none made for another endpoint
        s3().mkdir(BUCKET)
        yield env
    s3fs.S3FileSystem.clear_instance_cache()


def s3():
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def proxy(s3_env, tmp_path, monkeypatch):
    """A proxy process in front of the S3 server that logs every request
    (``helpers.s3_faults.FaultProxy``, no faults injected), as the endpoint of this
    process."""
    from helpers.s3_faults import FaultProxy

    proxy = FaultProxy(s3_env["AWS_ENDPOINT_URL_S3"], tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        yield proxy
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # none left with the proxy's endpoint
        proxy.stop()


def bytes_read(proxy, since: int, key: str) -> int:
    """Bytes of the object ``key`` (``bucket/path``) that GETs fetched since request
    ``since``."""
    return sum(size for method, path, size in proxy.requests()[since:]
               if method == "GET" and path == f"/{key}")


def s3_config(run: Path, store: str, root: str, padded_step: int | None = None) -> Path:
    """The crash tests' run with its root (and so its checkpoints and run files) at ``root``;
    only the step records stay local. ``padded_step``: its checkpoints carry 64 MB more
    (``helpers.checkpoint_padding``) until ``run/killed`` exists."""
    padding = [] if padded_step is None else [
        {"class_path": "helpers.checkpoint_padding.PaddedCheckpoint",
         "init_args": {"step": padded_step, "megabytes": 64, "marker": str(run / "killed")}}]
    config = harness.fit_config(run, store, extra_callbacks=padding)
    data = yaml.safe_load(config.read_text())
    data["trainer"]["default_root_dir"] = root
    for callback in data["trainer"]["callbacks"]:
        callback["init_args"].pop("run_dir", None)
        callback["init_args"].pop("dirpath", None)
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"]["every_n_train_steps"] = CHECKPOINT_EVERY
    data["model"]["config"]["hidden_size"] = 32
    config.write_text(yaml.safe_dump(data, sort_keys=False))
    return config


def download_last(root: str, run: Path) -> None:
    """``last.ckpt`` into ``run/checkpoints``, where ``harness.assert_same_run`` reads it."""
    (run / "checkpoints").mkdir(exist_ok=True)
    s3().get_file(f"{root}/checkpoints/last.ckpt", str(run / "checkpoints" / "last.ckpt"))


def load_object(url: str) -> dict:
    return torch.load(io.BytesIO(s3().cat_file(url)), map_location="cpu", weights_only=False)


def open_uploads(key: str, fs=None) -> list[dict]:
    """The multipart uploads of ``bucket/key`` begun and neither completed nor aborted."""
    bucket, name = key.removeprefix("s3://").split("/", 1)
    found = (fs or s3()).call_s3("list_multipart_uploads", Bucket=bucket, Prefix=name)
    return [u for u in found.get("Uploads", []) if u["Key"] == name]


def kill_during_upload(run: Path, config: Path, key: str, after_step: int) -> int:
    """Launches the run and SIGKILLs all its processes as soon as, after step ``after_step``,
    an upload of ``key`` is under way; returns the last step recorded."""
    process, fs = harness.start(run, harness.fit_command(config)), s3()
    try:
        deadline = time.monotonic() + harness.TIMEOUT
        while process.poll() is None and time.monotonic() < deadline:
            if harness.recorded_steps(run) < after_step:
                time.sleep(0.01)
            elif open_uploads(key, fs):
                break
        else:
            raise AssertionError(f"no upload of {key} seen under way:\n{harness.log_tail(run)}")
    finally:
        harness.kill_group(process)
        process.log.close()
    return harness.recorded_steps(run)


def relaunch(run: Path, config: Path) -> tuple[list[str], float]:
    """The same command again, to its end; the lines it printed and the seconds from its
    launch to its first trained step (the recovery time)."""
    log, records = run / "launches.log", run / "records" / "rank0.jsonl"
    before, lines_before = log.stat().st_size, len(records.read_text().splitlines())
    started = time.monotonic()
    process = harness.start(run, harness.fit_command(config))
    recovered = None
    while process.poll() is None and recovered is None:
        if len(records.read_text().splitlines()) > lines_before:
            recovered = time.monotonic() - started
        time.sleep(0.02)
    harness.finish(run, process)
    with open(log, "rb") as handle:
        handle.seek(before)
        lines = handle.read().decode(errors="replace").splitlines()
    return lines, recovered if recovered is not None else time.monotonic() - started


def first_step_after(run: Path, lines_before: int) -> int:
    return harness.read_jsonl(run / "records" / "rank0.jsonl")[lines_before]["step"]


@pytest.fixture(scope="module")
def reference(s3_env, tmp_path_factory, corpus_store) -> Path:
    """A run on S3 never interrupted (its step records local, its last.ckpt downloaded)."""
    run = tmp_path_factory.mktemp("reference")
    root = f"s3://{BUCKET}/reference"
    harness.fit(run, s3_config(run, corpus_store, root))
    download_last(root, run)
    return run


# -- a fit on S3 -------------------------------------------------------------------------------
def test_a_fit_on_s3_keeps_its_checkpoints_config_and_run_files_in_the_bucket(reference):
    fs = s3()
    root = f"{BUCKET}/reference"
    names = sorted(path.removeprefix(f"{root}/") for path in fs.find(root))
    assert names == ["checkpoints/.last.ckpt.crc32c.json", "checkpoints/.step=30.ckpt.crc32c.json",
                     "checkpoints/last.ckpt", "checkpoints/step=30.ckpt", "config.yaml",
                     "tsm/events.jsonl", "tsm/metrics.jsonl"]
    for name in ("last", "step=30"):
        url = f"s3://{root}/checkpoints/{name}.ckpt"
        records, mark = checkpoint_remote.read_sidecar(url)
        data = fs.cat_file(url)
        assert mark is None and records == [Record(len(data), _crc32c(data))]
    assert load_object(f"s3://{root}/checkpoints/last.ckpt")["global_step"] == harness.MAX_STEPS
    metrics = jsonl(fs.cat_file(f"{root}/tsm/metrics.jsonl").decode())
    assert max(m["step"] for m in metrics) == harness.MAX_STEPS
    # nothing went to a local folder named after the URL (``Path("s3://b")`` is ``s3:/b``)
    assert not (harness.REPO / "s3:").exists() and not (reference / "s3:").exists()
    blobs = [fs.cat_file(path) for path in fs.find(root)]
    assert not any(SECRET.encode() in blob or KEY.encode() in blob for blob in blobs)


def test_a_fresh_fit_is_refused_where_the_bucket_holds_a_run(reference):
    root = f"s3://{BUCKET}/reference"
    assert previous_run_files(root, [f"{root}/checkpoints"]) == [
        f"{root}/tsm/metrics.jsonl", f"{root}/checkpoints/"]
    assert previous_run_files(f"s3://{BUCKET}/nothing-here", []) == []


def test_a_bucket_root_counts_a_local_checkpoint_folder_and_a_local_root_a_bucket_one(
        s3_env, tmp_path):
    """Each path is asked where it is: a run whose root is in the bucket may keep its
    checkpoints in a local folder, and a local run may name a bucket folder for them."""
    root = f"s3://{BUCKET}/mixed-root"
    s3().pipe(f"{BUCKET}/mixed-root/tsm/metrics.jsonl", b'{"step": 1}\n')
    local = tmp_path / "checkpoints"
    local.mkdir()
    (local / "last.ckpt").write_bytes(b"x")
    assert previous_run_files(root, [local]) == [f"{root}/tsm/metrics.jsonl", f"{local}/"]
    s3().pipe(f"{BUCKET}/mixed-ckpt/last.ckpt", b"x")
    run = tmp_path / "local-run"
    (run / "tsm").mkdir(parents=True)
    (run / "tsm" / "metrics.jsonl").write_text("")  # empty: a run that never stepped
    assert previous_run_files(run, [f"s3://{BUCKET}/mixed-ckpt"]) == [
        f"s3://{BUCKET}/mixed-ckpt/"]
    assert previous_run_files(run, [f"s3://{BUCKET}/mixed-none"]) == []


# -- a kill during an upload -------------------------------------------------------------------
def kill_resume_compare(reference: Path, run: Path, store: str, name: str, checkpoint: int,
                        kind: str) -> tuple[int, float, list[str], int]:
    """Kills the run during the upload of ``last.ckpt`` (``kind="last"``) or of the step
    file of the ``checkpoint``-th checkpoint, checks what is left, relaunches, and compares
    with ``reference``; returns the step the relaunch resumed at, the recovery time, the
    lines it printed and the number of runs killed. The checkpoints of that step carry 64 MB
    of padding (eight 8 MiB parts), so that their upload is seen under way; the kill is sent
    then. When the upload completed in between all the same (a busy machine), the kill
    missed it and the run is tried again."""
    step, previous = checkpoint * CHECKPOINT_EVERY, (checkpoint - 1) * CHECKPOINT_EVERY
    for attempt in range(3):
        root = f"s3://{BUCKET}/{name}-{attempt}"
        target = f"{root}/checkpoints/{'last' if kind == 'last' else f'step={step}'}.ckpt"
        run_dir = run / f"attempt{attempt}"
        config = s3_config(run_dir, store, root, padded_step=step)
        killed_after = kill_during_upload(run_dir, config, target, previous + 1)
        (run_dir / "killed").touch()
        assert killed_after == step, f"killed after step {killed_after}, not in save {step}"
        if open_uploads(target):
            break
    else:
        raise AssertionError(f"3 kills in a row came after the upload of {target} completed")
    assert load_object(f"{root}/checkpoints/last.ckpt")["global_step"] == previous
    lines_before = len((run_dir / "records" / "rank0.jsonl").read_text().splitlines())
    lines, recovery = relaunch(run_dir, config)
    resumed = first_step_after(run_dir, lines_before) - 1
    assert open_uploads(target) == []  # the next save of the key aborted the leftover
    download_last(root, run_dir)
    harness.assert_same_run(reference, run_dir, 1)
    return resumed, recovery, lines, attempt + 1


def test_a_kill_during_the_upload_of_last_leaves_the_previous_one_which_the_resume_loads(
        reference, corpus_store, tmp_path):
    """Killed while ``last.ckpt`` of step 12 uploads: the object is still step 6's, its
    sidecar says an upload began; the relaunch resumes from step 6, says so in one line, and
    ends bitwise equal to the run never killed, with both sessions in its run files."""
    resumed, recovery, lines, kills = kill_resume_compare(reference, tmp_path, corpus_store,
                                                          "killed", checkpoint=2, kind="last")
    print(f"\nkill during the upload of last.ckpt at step 12 ({kills} kill(s)): resumed from "
          f"step {resumed}, training again {recovery:.1f} s after the relaunch")
    assert resumed == CHECKPOINT_EVERY
    [said] = [line for line in lines if line.startswith("lightning-aquila fit:")]
    url = re.search(r"checkpoint (s3://\S+/last\.ckpt):", said)[1]
    assert re.fullmatch(rf"s3://{BUCKET}/killed-\d/checkpoints/last.ckpt", url)
    assert re.fullmatch(rf"lightning-aquila fit: checkpoint {re.escape(url)}: the upload of a "
                        r"newer version, begun \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC, did not "
                        r"complete; this is the version before it; resuming from it", said)
    assert f"Restored all states from the checkpoint at {url}" in "\n".join(lines)
    events = jsonl(s3().cat_file(f"{url.rsplit('/', 2)[0]}/tsm/events.jsonl").decode())
    assert [e["step"] for e in events if e["kind"] == "session_start"] == [0, CHECKPOINT_EVERY]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["last", "step"])
@pytest.mark.parametrize("checkpoint", [2, 3, 4])
def test_kills_during_the_uploads_of_later_checkpoints_resume_exactly(checkpoint, kind,
                                                                      reference, corpus_store,
                                                                      tmp_path):
    """``pytest tests/test_s3_checkpoints.py -m slow -s``: killed while ``last.ckpt`` or
    ``step=N.ckpt`` of step 12, 18 or 24 uploads, resumed from the step before."""
    resumed, recovery, lines, kills = kill_resume_compare(
        reference, tmp_path, corpus_store, f"slow-{kind}-{checkpoint}", checkpoint, kind)
    print(f"\nkill during the upload of {kind} at step {checkpoint * CHECKPOINT_EVERY} "
          f"({kills} kill(s)): resumed from step {resumed}, training again {recovery:.1f} s "
          "after the relaunch")
    assert resumed == (checkpoint - 1) * CHECKPOINT_EVERY
    said = [line for line in lines if line.startswith("lightning-aquila fit:")]
    assert len(said) == (kind == "last"), said


# -- the save and the check, in this process ---------------------------------------------------
class _FailsToPickle:
    def __reduce__(self):
        raise RuntimeError("serialisation failed half-way")


def test_a_save_that_fails_half_way_aborts_its_upload_and_leaves_the_object(s3_env):
    """Two parts were uploaded when serialisation failed: an fsspec file closed on the way
    out would have completed the upload with them; the upload is aborted instead."""
    url = f"s3://{BUCKET}/failing/last.ckpt"
    checkpoint_io = AtomicCheckpointIO(part_size=PART)
    checkpoint_io.save_checkpoint({"global_step": 1}, url)
    before = s3().cat_file(url)
    with pytest.raises(RuntimeError, match="half-way"):
        checkpoint_io.save_checkpoint({"weights": torch.ones(3 * PART // 4),
                                       "broken": _FailsToPickle()}, url)
    assert s3().cat_file(url) == before and open_uploads(url) == []
    assert checkpoint_io.load_checkpoint(url)["global_step"] == 1


def test_at_every_step_of_a_remote_save_the_object_verifies_and_a_damaged_one_does_not(
        s3_env):
    """``checkpoint_remote``'s steps one by one: while an upload is under way (1-3) the old
    object verifies, with the note a resume prints; once completed (4, 5) the new one does,
    without; a damaged object never verifies."""
    url = f"s3://{BUCKET}/steps/last.ckpt"
    AtomicCheckpointIO(part_size=PART).save_checkpoint({"global_step": 1}, url)
    old = s3().cat_file(url)
    save = checkpoint_remote.RemoteSave(url, PART).__enter__()  # 1
    torch.save({"global_step": 2, "weights": torch.ones(PART // 2)}, save.writer)  # 2
    assert len(open_uploads(url)) == 1
    for step in (2, 3):
        if step == 3:
            save.ready()
        verdict = checkpoint_remote.verify(url)
        assert verdict.state == "intact" and "did not complete" in verdict.note, step
        assert not checkpoint_remote.verify(url, _flipped(old)).usable, step
    save.complete()  # 4
    new = s3().cat_file(url)
    for step in (4, 5):
        if step == 5:
            save.commit()
        assert checkpoint_remote.verify(url) == Verdict("intact"), step
        assert not checkpoint_remote.verify(url, new[:-1]).usable, step
        assert not checkpoint_remote.verify(url, _flipped(new)).usable, step
    assert not checkpoint_remote.verify(url, old).usable


def test_a_failed_completion_leaves_the_old_object_verified_with_the_note(s3_env):
    """The request that completes the upload fails (a lost connection, a kill): the old
    object stays, still verifies, and the resume will say that a newer one did not arrive."""
    url = f"s3://{BUCKET}/completion/last.ckpt"
    checkpoint_io = AtomicCheckpointIO(part_size=PART)
    checkpoint_io.save_checkpoint({"global_step": 1}, url)
    before = s3().cat_file(url)

    def lost_connection() -> None:
        raise ConnectionResetError("lost while completing the upload")

    with pytest.raises(ConnectionResetError), checkpoint_remote.RemoteSave(url, PART) as save:
        torch.save({"global_step": 2, "weights": torch.ones(PART // 2)}, save.writer)
        save._handle.commit = lost_connection
    assert s3().cat_file(url) == before and open_uploads(url) == []
    verdict = checkpoint_remote.verify(url)
    assert verdict.state == "intact" and "did not complete" in verdict.note
    assert checkpoint_io.load_checkpoint(url)["global_step"] == 1


def test_a_resume_downloads_the_checkpoint_once_for_its_check_and_its_load(proxy):
    """``checked_resume_path`` verifies the object before the trainer is built, and the
    loader loads the copy it verified: the object's bytes cross the network once. An object
    replaced in between is downloaded again, and the new one is loaded."""
    url = f"s3://{BUCKET}/once/last.ckpt"
    checkpoint_io = AtomicCheckpointIO(part_size=PART)
    checkpoint_io.save_checkpoint({"global_step": 7, "weights": torch.ones(PART // 8)}, url)
    size = s3().info(url)["size"]
    before = len(proxy.requests())
    assert checked_resume_path(url, []) == url
    assert checkpoint_io.load_checkpoint(url)["global_step"] == 7
    assert bytes_read(proxy, before, f"{BUCKET}/once/last.ckpt") == size

    assert checked_resume_path(url, []) == url
    checkpoint_io.save_checkpoint({"global_step": 8, "weights": torch.ones(PART // 8)}, url)
    before = len(proxy.requests())
    assert checkpoint_io.load_checkpoint(url)["global_step"] == 8
    assert bytes_read(proxy, before, f"{BUCKET}/once/last.ckpt") == s3().info(url)["size"]


class Windows(Dataset):
    """Token windows of two domains, for ``helpers.tiny_project.TinyLM``."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = torch.arange(i, i + 9) % VOCAB
        return {"input_ids": ids[:-1], "labels": ids[1:], "domain": torch.tensor(i % 2)}


def test_each_run_file_goes_up_once_per_checkpoint_and_once_at_the_end_of_fit(proxy,
                                                                                 tmp_path):
    """With ``save_last`` every checkpoint event saves two files, each telling the monitor to
    upload its run files; at the end of the fit the report is written, then the log
    closes. Each file is uploaded once per event, and never again unchanged: every PUT of a
    file carries more than the one before it (the files only grow)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_aquila.callbacks.monitor import TrainingStateMonitor

    run = f"s3://{BUCKET}/uploads"
    monitor = TrainingStateMonitor(run_dir=run, domains=["a", "b"], train_loss_every_n_steps=1,
                                   report_on_fit_end=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2,
                                 save_last=True, save_top_k=-1)
    before = len(proxy.requests())
    quiet_trainer(tmp_path, [monitor, checkpoint], max_steps=4, enable_checkpointing=True
                  ).fit(TinyLM(), DataLoader(Windows(), batch_size=4))
    puts: dict[str, list[int]] = {}
    for method, path, size in proxy.requests()[before:]:
        if method == "PUT":
            puts.setdefault(path.removeprefix(f"/{BUCKET}/uploads/"), []).append(size)
    assert sorted(puts) == ["report.html", "report.png", "tsm/events.jsonl",
                            "tsm/metrics.jsonl"]
    assert len(puts["tsm/metrics.jsonl"]) == 2  # the checkpoints of steps 2 and 4
    for name, sizes in puts.items():
        assert sizes == sorted(set(sizes)), (name, sizes)
        assert sizes[-1] == s3().info(f"{run}/{name}")["size"], name


def test_a_damaged_remote_last_is_never_loaded_and_the_resume_falls_back_in_one_line(
        s3_env, capsys):
    folder = f"s3://{BUCKET}/damaged"
    checkpoint_io = AtomicCheckpointIO()
    for step in (3, 6):
        checkpoint_io.save_checkpoint({"global_step": step}, f"{folder}/step={step}.ckpt")
    checkpoint_io.save_checkpoint({"global_step": 6}, f"{folder}/last.ckpt")
    fs = s3()
    fs.pipe_file(f"{folder}/last.ckpt", _flipped(fs.cat_file(f"{folder}/last.ckpt")))
    six = fs.cat_file(f"{folder}/step=6.ckpt")
    fs.pipe_file(f"{folder}/step=6.ckpt", six[: len(six) // 2])  # as a non-atomic store would
    assert checked_resume_path("last", [folder]) == f"{folder}/step=3.ckpt"
    [said] = capsys.readouterr().err.splitlines()
    assert said.startswith(f"lightning-aquila fit: checkpoint {folder}/last.ckpt is damaged "
                           "(checksum mismatch: crc32c ")
    assert said.endswith(f"; resuming from {folder}/step=3.ckpt instead (1 newer one(s) "
                         "damaged too)")
    with pytest.raises(ValueError, match=r"last.ckpt is damaged \(checksum mismatch"):
        checkpoint_io.load_checkpoint(f"{folder}/last.ckpt")
    with pytest.raises(ValueError, match=rf"step=6.ckpt is damaged \(size {len(six) // 2} "):
        checkpoint_io.load_checkpoint(f"{folder}/step=6.ckpt")
    fs.pipe_file(f"{folder}/step=3.ckpt", b"")
    with pytest.raises(SystemExit) as stopped:
        checked_resume_path("last", [folder])
    assert re.fullmatch(rf"lightning-aquila fit: checkpoint {folder}/last.ckpt is damaged "
                        rf"\(checksum mismatch: crc32c \w+, recorded \w+\) and no intact "
                        rf"checkpoint is left in {folder} \(also damaged: step=\d.ckpt, "
                        r"step=\d.ckpt\); stopping before training", str(stopped.value))


def test_bad_settings_for_object_storage_are_refused_in_one_line():
    from lightning_aquila.strategies import AquilaParallelStrategy

    with pytest.raises(ValueError, match=r"part_size=1048576\): object stores take parts of "
                                         r"at least 5242880 bytes"):
        AtomicCheckpointIO(part_size=1 << 20)
    with pytest.raises(ValueError, match=r"sharded checkpoints cannot go to object storage "
                                         r"\(s3://bucket/run/last.ckpt\)"):
        AquilaParallelStrategy().save_checkpoint({}, "s3://bucket/run/last.ckpt")


def test_sharded_checkpoints_to_object_storage_are_refused_at_setup_in_one_line(s3_env,
                                                                                  tmp_path):
    """``AquilaParallelStrategy`` saves sharded checkpoints by renaming a directory, which
    object storage cannot do: a fit whose ``ModelCheckpoint`` folder is a URL stops in the
    strategy's setup, before the model is set up or trained, with one line naming it.

    The fit runs in a process of its own: the strategy starts a process group (gloo, its
    store's threads), which must not live on in the test process, whose later DataLoader
    workers are forked from it."""
    folder = f"s3://{BUCKET}/sharded/checkpoints"
    script = f"""
import sys
sys.path[:0] = {[str(Path(__file__).parent)]!r}
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader
from helpers.tiny_project import TinyLM
from test_s3_checkpoints import Windows
from lightning_aquila.cli.errors import one_line
from lightning_aquila.strategies import AquilaParallelStrategy

trainer = Trainer(accelerator="cpu", devices=1, strategy=AquilaParallelStrategy(), max_steps=2,
                  callbacks=[ModelCheckpoint(dirpath={folder!r})], logger=False,
                  enable_progress_bar=False, enable_model_summary=False,
                  default_root_dir={str(tmp_path)!r})
try:
    trainer.fit(TinyLM(), DataLoader(Windows(), batch_size=4))
except ValueError as error:
    print("refused:", one_line(error) if one_line(error) == str(error) else repr(error))
print("steps:", trainer.global_step)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == [
        f"refused: AquilaParallelStrategy: sharded checkpoints cannot go to object storage "
        f"({folder}): give a local or shared-filesystem checkpoint folder, or "
        "save_distributed_checkpoint=false for single files",
        "steps: 0"], done.stdout + done.stderr[-3000:]
    assert not s3().exists(folder)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _flipped(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def _crc32c(data: bytes) -> int:
    import google_crc32c

    return int.from_bytes(google_crc32c.Checksum(data).digest(), "big")
