"""What counts as a previous run in a run's folder, wherever its parts are: a root on object
storage may keep its checkpoints in a local folder, and a local root may name a bucket for
them (fsspec's in-memory filesystem stands for the object store: a real fsspec filesystem
with URLs, as s3fs is)."""

from __future__ import annotations

import fsspec

from lightning_aquila.cli.run_folder import previous_run_files


def test_a_remote_root_counts_its_metrics_and_a_local_checkpoint_folder(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/run-a/tsm/metrics.jsonl", b'{"step": 1}\n')
    local = tmp_path / "checkpoints"
    local.mkdir()
    (local / "last.ckpt").write_bytes(b"x")
    assert previous_run_files("memory://run-a", [local]) == [
        "memory://run-a/tsm/metrics.jsonl", f"{local}/"]


def test_a_local_root_counts_a_checkpoint_folder_in_a_bucket(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe("/bucket-b/ckpt/last.ckpt", b"x")
    (tmp_path / "tsm").mkdir()
    (tmp_path / "tsm" / "metrics.jsonl").write_text("")  # empty: a run that never stepped
    assert previous_run_files(tmp_path, ["memory://bucket-b/ckpt"]) == [
        "memory://bucket-b/ckpt/"]
    assert previous_run_files(tmp_path, ["memory://bucket-b/none"]) == []
