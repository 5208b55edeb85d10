"""The zarr v3 shard store: layout, reading, commit semantics and damage detection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr

from lightning_aquila.datamodules.store import DataError, ShardStore, iter_documents
from lightning_aquila.datamodules.writer import DomainWriter

TOKENIZER = {"hash": "t1", "vocab_size": 1000, "eos_id": 999}


def write(url: str, domain: str, docs: list[np.ndarray], *, split: str = "train",
          chunk_tokens: int = 100, sha: str = "s", tokenizer=TOKENIZER) -> None:
    with DomainWriter(url, domain, tokenizer=tokenizer, language="en",
                      chunk_tokens=chunk_tokens) as writer:
        for doc in docs:
            writer.add_document(split, doc.astype(np.uint32))
        writer.add_source({"path": f"{domain}.jsonl", "sha256": sha})
        writer.commit()


def docs_of(lengths: list[int], start: int = 0) -> list[np.ndarray]:
    out, pos = [], start
    for n in lengths:
        out.append(np.arange(pos, pos + n) % 997)
        pos += n
    return out


def chunk_file(url: str, store: ShardStore, domain: str, index: int) -> Path:
    segment = store.info(domain).segments["train"][0].id
    return Path(url) / domain / "train" / segment / "tokens" / "c" / str(index)


def test_a_domain_reads_back_as_one_stream_across_documents_chunks_and_appends(tmp_path):
    url = str(tmp_path / "s.zarr")
    first, second = docs_of([37, 250, 3]), docs_of([180, 41], start=5)
    write(url, "en", first, sha="one")
    write(url, "en", second, sha="two")  # a second prepare run appends a segment
    store = ShardStore(url)
    stream = store.stream("en")
    expected = np.concatenate(first + second)
    assert stream.n_tokens == len(expected) == 511
    np.testing.assert_array_equal(stream.read(0, 511), expected)
    for start, stop in [(95, 105), (285, 300), (289, 311), (0, 1), (510, 511)]:
        np.testing.assert_array_equal(stream.read(start, stop), expected[start:stop])
    assert [len(d) for d in iter_documents(store, "en")] == [37, 250, 3, 180, 41]


def test_domain_attributes_record_language_tokenizer_sources_and_counts(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "en", docs_of([10, 20]), sha="abc")
    write(url, "en", docs_of([5]), split="heldout", sha="def")
    info = ShardStore(url).info("en")
    assert (info.language, info.tokenizer_hash) == ("en", "t1")
    assert [s["sha256"] for s in info.sources] == ["abc", "def"]
    assert (info.tokens("train"), info.documents("train")) == (30, 2)
    assert (info.tokens("heldout"), info.documents("heldout")) == (5, 1)
    assert info.max_token_id == 29
    attrs = zarr.open_group(url, mode="r")["en"].attrs.asdict()
    assert attrs["tokens"] == {"train": 30, "heldout": 5}
    manifest = zarr.open_group(url, mode="r").attrs["lightning_aquila"]
    assert manifest["format"] == "lightning-aquila-shards" and manifest["domains"] == ["en"]


@pytest.mark.parametrize("scheme", ["memory", "file", "path"])
def test_stores_open_through_local_paths_file_urls_and_fsspec_urls(tmp_path, scheme):
    url = {"memory": f"memory://dmu-{tmp_path.name}/s.zarr",
           "file": f"file://{tmp_path}/s.zarr", "path": str(tmp_path / "s.zarr")}[scheme]
    write(url, "en", docs_of([300]))
    np.testing.assert_array_equal(ShardStore(url).stream("en").read(0, 300), docs_of([300])[0])


def test_a_failed_write_leaves_the_store_as_it_was(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "en", docs_of([50]), sha="one")
    with pytest.raises(RuntimeError, match="boom"), DomainWriter(
        url, "en", tokenizer=TOKENIZER, language="en", chunk_tokens=100
    ) as writer:
        writer.add_document("train", np.arange(500, dtype=np.uint32))
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"), DomainWriter(
        url, "zh", tokenizer=TOKENIZER, language="zh", chunk_tokens=100
    ) as writer:
        writer.add_document("train", np.arange(500, dtype=np.uint32))
        raise RuntimeError("boom")
    store = ShardStore(url)
    assert list(store.domains) == ["en"] and store.info("en").tokens() == 50
    assert len(list(zarr.open_group(url, mode="r")["en/train"].keys())) == 1
    assert "zh" not in zarr.open_group(url, mode="r")


def test_segments_of_a_crashed_run_are_invisible_and_removed_by_the_next_writer(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "en", docs_of([50]), sha="one")
    crashed = DomainWriter(url, "en", tokenizer=TOKENIZER, language="en", chunk_tokens=100)
    crashed.add_document("train", np.arange(500, dtype=np.uint32))
    crashed.writer("train").close()  # all data written; the process dies before commit
    assert ShardStore(url).info("en").tokens() == 50
    assert len(list(zarr.open_group(url, mode="r")["en/train"].keys())) == 2
    write(url, "en", docs_of([7]), sha="two")
    assert ShardStore(url).info("en").tokens() == 57
    assert len(list(zarr.open_group(url, mode="r")["en/train"].keys())) == 2


def test_appending_with_another_tokenizer_is_refused_naming_both_hashes(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "en", docs_of([50]))
    with pytest.raises(DataError, match=r"domain 'en'.*tokenizer t1, not t2"):
        write(url, "en", docs_of([50]), tokenizer={"hash": "t2"})


def test_a_missing_chunk_is_named_by_verify(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "en", docs_of([450]))
    store = ShardStore(url)
    chunk_file(url, store, "en", 2).unlink()
    with pytest.raises(DataError, match=r"domain 'en', split 'train', segment .*c/2"):
        ShardStore(url).verify()


def test_a_corrupt_chunk_is_named_when_read(tmp_path):
    url = str(tmp_path / "s.zarr")
    write(url, "en", docs_of([450]))
    store = ShardStore(url)
    path = chunk_file(url, store, "en", 1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store.verify()  # every chunk is present ...
    with pytest.raises(DataError, match=r"domain 'en', split 'train', segment .*chunk c/1"):
        store.verify(full=True)  # ... but one fails its checksum
    with pytest.raises(DataError, match="chunk c/1"):
        ShardStore(url).stream("en").read(150, 160)


def test_opening_something_that_is_not_a_store_names_it(tmp_path):
    with pytest.raises(DataError, match="no shard store at"):
        ShardStore(str(tmp_path / "nothing.zarr"))
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    with pytest.raises(DataError, match="not a lightning-aquila shard store"):
        ShardStore(str(tmp_path / "plain.zarr"))


def test_domain_names_that_cannot_be_groups_are_refused(tmp_path):
    with pytest.raises(DataError, match="invalid domain name 'a/b'"):
        write(str(tmp_path / "s.zarr"), "a/b", docs_of([5]))
