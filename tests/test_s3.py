"""``s3://`` stores and inputs against a real S3-compatible server: ``moto`` in server mode on
127.0.0.1, started by this module (as s3fs's own test suite does), reached through ``s3fs``.
Credentials come from the environment; ``storage_options`` carry only the endpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from lightning_aquila.datamodules import DomainDataModule, ShardStore
from lightning_aquila.datamodules.prepare import prepare
from lightning_aquila.datamodules.store import iter_documents

SECRET = "s3-test-secret-never-written"
TEXTS = [f"document {i} of a corpus kept in object storage. " * (5 + i % 7) for i in range(300)]


@pytest.fixture
def s3(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, request) -> dict:
    """A fresh bucket; credentials in the environment (as in production), the endpoint in
    ``storage_options``. Returns the bucket URL, the options and the filesystem."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "s3-test-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"endpoint_url": moto_endpoint}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    bucket = f"dmu-{request.node.name.replace('_', '-')[:40].lower().strip('-')}"
    fs.mkdir(bucket)
    return {"bucket": f"s3://{bucket}", "options": options, "fs": fs}


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS), "utf-8")
    return path


def test_prepare_writes_an_s3_store_that_reads_as_the_local_one(s3, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl")
    local, remote = str(tmp_path / "s.zarr"), f"{s3['bucket']}/s.zarr"
    prepare(str(source), "en", local, held_out_fraction=0.05, progress=False)
    prepare(str(source), "en", remote, held_out_fraction=0.05, progress=False,
            storage_options=s3["options"])
    assert s3["fs"].exists(f"{remote}/zarr.json")
    store = ShardStore(remote, s3["options"])
    store.verify(full=True)
    for split in ("train", "heldout"):
        assert [d.tolist() for d in iter_documents(store, "en", split)] == [
            d.tolist() for d in iter_documents(ShardStore(local), "en", split)]


def test_remove_domain_on_an_s3_store_uses_the_storage_options(s3, tmp_path):
    """remove-domain reaches the bucket through the endpoint in ``storage_options`` (found
    by a mutation check: without this test, dropping them from either of its two opens
    passed), unlists the domain and deletes its objects."""
    from lightning_aquila.datamodules.edit import remove_domain

    source = write_jsonl(tmp_path / "a.jsonl")
    remote = f"{s3['bucket']}/s.zarr"
    for domain in ("en", "fr"):
        prepare(str(source), domain, remote, progress=False, storage_options=s3["options"])
    remove_domain(remote, "fr", storage_options=s3["options"])
    assert sorted(ShardStore(remote, s3["options"]).domains) == ["en"]
    assert not s3["fs"].exists(f"{remote}/fr/zarr.json")


def test_prepare_reads_raw_input_from_s3(s3, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl")
    s3["fs"].put(str(source), f"{s3['bucket']}/raw/a.jsonl")
    local, from_s3 = str(tmp_path / "local.zarr"), str(tmp_path / "from_s3.zarr")
    prepare(str(source), "en", local, held_out_fraction=0, progress=False)
    report = prepare(f"{s3['bucket']}/raw/*.jsonl", "en", from_s3, held_out_fraction=0,
                     progress=False, storage_options=s3["options"])
    assert report.added[0]["path"] == f"{s3['bucket']}/raw/a.jsonl"
    assert [d.tolist() for d in iter_documents(ShardStore(from_s3), "en")] == [
        d.tolist() for d in iter_documents(ShardStore(local), "en")]


def test_the_datamodule_reads_and_resumes_from_an_s3_store_with_loader_workers(s3, tmp_path):
    source = write_jsonl(tmp_path / "a.jsonl")
    remote = f"{s3['bucket']}/s.zarr"
    prepare(str(source), "en", remote, held_out_fraction=0.05, progress=False,
            storage_options=s3["options"])

    def loader_batches(state: dict | None, count: int, workers: int = 0
                       ) -> tuple[list[np.ndarray], dict]:
        dm = DomainDataModule(remote, seq_len=16, batch_size=4, num_workers=workers, seed=3,
                              val_windows_per_domain=2, storage_options=s3["options"])
        dm.setup("fit")
        if state is not None:
            dm.load_state_dict(state)
        iterator = iter(dm.train_dataloader())
        batches = [next(iterator)["input_ids"].numpy() for _ in range(count)]
        assert len(next(iter(dm.val_dataloader()[0]))["input_ids"]) == 2
        return batches, dm.state_dict()

    # Outside a trainer a batch counts as consumed when drawn, so the state is taken from a
    # loader without workers (which draw ahead); the resumed half reads through a worker.
    whole, _ = loader_batches(None, 12, workers=1)
    first, state = loader_batches(None, 5)
    rest, _ = loader_batches(state, 7, workers=1)
    for expected, got in zip(whole, first + rest, strict=True):
        np.testing.assert_array_equal(expected, got)


def test_credentials_given_in_storage_options_are_used_and_written_nowhere(s3, tmp_path,
                                                                           monkeypatch):
    """Keys passed through ``storage_options`` (not the environment, which is emptied here)
    reach s3fs, and neither the key nor the secret appears in any object of the store."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    key, secret = "options-key-4711", "options-secret-0815"
    options = {**s3["options"], "key": key, "secret": secret}
    remote = f"{s3['bucket']}/s.zarr"
    prepare(str(write_jsonl(tmp_path / "a.jsonl")), "en", remote, progress=False,
            storage_options=options)
    assert ShardStore(remote, options).info("en").documents("train") > 0
    blobs = [s3["fs"].cat_file(path) for path in s3["fs"].find(s3["bucket"])]
    assert blobs and not any(key.encode() in blob or secret.encode() in blob
                             for blob in blobs)


def test_no_credential_is_written_to_the_store(s3, tmp_path):
    remote = f"{s3['bucket']}/s.zarr"
    prepare(str(write_jsonl(tmp_path / "a.jsonl")), "en", remote, progress=False,
            storage_options=s3["options"])
    blobs = [s3["fs"].cat_file(path) for path in s3["fs"].find(s3["bucket"])]
    assert blobs and not any(SECRET.encode() in blob or b"s3-test-key" in blob
                             for blob in blobs)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # the credentials were in use
