"""``lightning-aquila prepare`` / ``inspect``: formats, idempotency, bad records, held-out split."""

from __future__ import annotations

import gzip
import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightning_aquila.cli.tools import inspect_command as inspect_main
from lightning_aquila.cli.tools import prepare_command as main
from lightning_aquila.datamodules.prepare import prepare
from lightning_aquila.datamodules.store import DataError, ShardStore, iter_documents

TEXTS = [
    "The Data Management Unit owns the corpus.",
    "数据管理单元负责语料。",
    "def add(a, b):\n    return a + b\n",
    "Short.",
    "A longer paragraph, with punctuation; numbers 12345 and\nline breaks.\n\nAnd a second one.",
]


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text, "source": "test"}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture
def tokenizer(dmu_tokenizer):
    from lightning_aquila.tokenizer import load_tokenizer, special_token_ids

    tok = load_tokenizer(dmu_tokenizer)
    return tok, special_token_ids(tok)[1]


def expected_ids(tok, text: str, eos: int) -> list[int]:
    return [*tok.encode(text, add_special_tokens=False).ids, eos]


def test_each_jsonl_document_is_tokenized_as_the_tokenizer_does_with_eos_after_it(
        tmp_path, tokenizer):
    tok, eos = tokenizer
    source = write_jsonl(tmp_path / "in" / "a.jsonl", TEXTS)
    report = prepare(str(source), "en_test", str(tmp_path / "s.zarr"), held_out_fraction=0,
                     progress=False)
    assert (report.documents, len(report.added)) == (5, 1)
    docs = [d.tolist() for d in iter_documents(ShardStore(str(tmp_path / "s.zarr")), "en_test")]
    assert docs == [expected_ids(tok, t, eos) for t in TEXTS]


def test_a_txt_file_is_one_document_even_when_read_in_small_pieces(tmp_path, tokenizer):
    tok, eos = tokenizer
    text = "".join(f"line {i}: some text here\n" for i in range(400))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    prepare(str(tmp_path / "book.txt"), "en_books", str(tmp_path / "s.zarr"),
            held_out_fraction=0, piece_chars=100, progress=False)
    [doc] = list(iter_documents(ShardStore(str(tmp_path / "s.zarr")), "en_books"))
    assert doc[-1] == eos and eos not in doc[:-1]
    assert tok.decode(doc[:-1].tolist()) == tok.decode(tok.encode(text).ids)


def test_parquet_text_and_quality_columns_are_read(tmp_path, tokenizer):
    tok, eos = tokenizer
    table = pa.table({"content": TEXTS, "score": [0.1, 0.2, None, 0.4, 0.5]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=2)
    url = str(tmp_path / "s.zarr")
    prepare(str(tmp_path / "a.parquet"), "en_pq", url, text_field="content",
            quality_field="score", held_out_fraction=0, progress=False)
    store = ShardStore(url)
    docs = [d.tolist() for d in iter_documents(store, "en_pq")]
    assert docs == [expected_ids(tok, t, eos) for t in TEXTS]
    segment = store.info("en_pq").segments["train"][0].id
    quality = store.array("en_pq", "train", segment, "quality")[:]
    np.testing.assert_allclose(quality, [0.1, 0.2, np.nan, 0.4, 0.5], rtol=1e-6)


def test_gzip_compressed_jsonl_is_read_transparently(tmp_path, tokenizer):
    tok, eos = tokenizer
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)
    prepare(str(tmp_path / "a.jsonl.gz"), "en_gz", str(tmp_path / "s.zarr"),
            held_out_fraction=0, progress=False)
    docs = [d.tolist() for d in iter_documents(ShardStore(str(tmp_path / "s.zarr")), "en_gz")]
    assert docs == [expected_ids(tok, t, eos) for t in TEXTS]


def test_inputs_and_store_may_be_fsspec_urls(tmp_path):
    import fsspec

    with fsspec.open(f"memory://dmu-{tmp_path.name}/in/a.jsonl", "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in TEXTS)
    url = f"memory://dmu-{tmp_path.name}/s.zarr"
    report = prepare(f"memory://dmu-{tmp_path.name}/in/*.jsonl", "en_mem", url,
                     held_out_fraction=0, progress=False)
    assert report.added[0]["path"].startswith("memory://")
    assert ShardStore(url).info("en_mem").documents() == 5


def test_running_prepare_twice_adds_nothing(tmp_path):
    source = write_jsonl(tmp_path / "in" / "a.jsonl", TEXTS)
    url = str(tmp_path / "s.zarr")
    first = prepare(str(source), "en", url, progress=False)
    before = ShardStore(url).info("en")
    second = prepare(str(source), "en", url, progress=False)
    after = ShardStore(url).info("en")
    assert (len(first.added), second.added, second.skipped) == (1, [], [str(source)])
    assert after == before


def test_new_sources_append_to_a_domain_and_leave_its_data_alone(tmp_path):
    url = str(tmp_path / "s.zarr")
    a = write_jsonl(tmp_path / "in" / "a.jsonl", TEXTS[:3])
    prepare(str(a), "en", url, held_out_fraction=0, progress=False)
    old = ShardStore(url).stream("en")
    old_tokens = old.read(0, old.n_tokens)
    write_jsonl(tmp_path / "in" / "b.jsonl", TEXTS[3:])
    report = prepare(str(tmp_path / "in" / "*.jsonl"), "en", url, held_out_fraction=0,
                     progress=False)
    assert [s["path"] for s in report.added] == [str(tmp_path / "in" / "b.jsonl")]
    store = ShardStore(url)
    assert store.info("en").documents() == 5
    np.testing.assert_array_equal(store.stream("en").read(0, len(old_tokens)), old_tokens)


def test_a_renamed_copy_of_a_source_is_recognised_by_its_content_hash(tmp_path):
    url = str(tmp_path / "s.zarr")
    a = write_jsonl(tmp_path / "a.jsonl", TEXTS)
    prepare(str(a), "en", url, progress=False)
    b = tmp_path / "copy.jsonl"
    b.write_bytes(a.read_bytes())
    assert prepare(str(b), "en", url, progress=False).skipped == [str(b)]


def test_a_corrupt_jsonl_line_stops_prepare_naming_file_and_line(tmp_path, capsys):
    source = write_jsonl(tmp_path / "bad.jsonl", TEXTS)
    lines = source.read_text(encoding="utf-8").splitlines()
    lines.insert(3, '{"text": "unterminated')
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    url = str(tmp_path / "s.zarr")
    code = main(["--input", str(source), "--domain", "en", "--output", url, "--quiet"])
    assert code == 1
    assert f"{source}:line 4: invalid JSON" in capsys.readouterr().err
    with pytest.raises(DataError, match="no domain 'en'"):
        ShardStore(url).info("en")  # nothing half-written is visible


def test_corrupt_records_are_skipped_and_counted_when_asked(tmp_path, capsys):
    source = write_jsonl(tmp_path / "bad.jsonl", TEXTS)
    with open(source, "a", encoding="utf-8") as f:
        f.write("not json at all\n")
        f.write(json.dumps({"body": "wrong field"}) + "\n")
    url = str(tmp_path / "s.zarr")
    code = main(["--input", str(source), "--domain", "en", "--output", url, "--quiet",
                 "--on-error", "skip", "--held-out-fraction", "0"])
    assert code == 0
    err = capsys.readouterr().err
    assert "skipped 2 bad record(s)" in err
    assert f"{source}:line 6: invalid JSON" in err and f"{source}:line 7: no field 'text'" in err
    info = ShardStore(url).info("en")
    assert info.documents() == 5 and info.sources[0]["bad_records"] == 2


def test_the_held_out_split_takes_the_given_fraction_of_documents_reproducibly(tmp_path):
    texts = [f"document number {i} " * 3 for i in range(400)]
    source = write_jsonl(tmp_path / "a.jsonl", texts)
    stores = [str(tmp_path / f"s{i}.zarr") for i in range(2)]
    for url in stores:
        prepare(str(source), "en", url, held_out_fraction=0.25, progress=False)
    infos = [ShardStore(url).info("en") for url in stores]
    held = infos[0].documents("heldout")
    assert held + infos[0].documents("train") == 400
    assert abs(held - 100) <= 4 * math.sqrt(400 * 0.25 * 0.75)  # binomial, 4 sigma
    heldout_docs = [[d.tolist() for d in iter_documents(ShardStore(url), "en", "heldout")]
                    for url in stores]
    assert heldout_docs[0] == heldout_docs[1]


def test_a_small_domain_still_gets_one_held_out_document(tmp_path):
    import hashlib

    from lightning_aquila.datamodules.split import held_out

    url = str(tmp_path / "s.zarr")
    by_rule = []
    for name in ("a", "b"):
        source = write_jsonl(tmp_path / f"{name}.jsonl", [f"{name} doc {i} " * 5
                                                         for i in range(12)])
        sha = hashlib.sha256(source.read_bytes()).hexdigest()
        by_rule.append(sum(held_out(sha, line, 0.01) for line in range(1, 13)))
        prepare(str(source), "en", url, held_out_fraction=0.01, progress=False)
    # 12 documents at 1% would usually give none: the first run holds out its lowest-hash
    # document; the second run finds the domain already has one and follows the rule alone.
    assert ShardStore(url).info("en").documents("heldout") == max(by_rule[0], 1) + by_rule[1]


def test_memory_does_not_grow_with_the_input(tmp_path):
    def peak(documents: int) -> int:
        source = write_jsonl(tmp_path / f"in{documents}.jsonl",
                             [f"text {i} of a streamed corpus. " * 20 for i in range(documents)])
        tracemalloc.start()
        prepare(str(source), "en", str(tmp_path / f"s{documents}.zarr"), batch_chars=64_000,
                chunk_tokens=16_384, progress=False)
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return high

    small, large = peak(1_000), peak(8_000)  # ~0.6 MB vs ~5 MB of text
    assert large < 1.5 * small, (small, large)


def test_inspect_prints_domain_language_documents_tokens_and_share(tmp_path, capsys):
    url = str(tmp_path / "s.zarr")
    prepare(str(write_jsonl(tmp_path / "a.jsonl", TEXTS)), "en_prose", url, progress=False)
    prepare(str(write_jsonl(tmp_path / "b.jsonl", TEXTS[:2])), "zh_lit", url, progress=False)
    assert inspect_main([url]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[1].split()
    assert header[:5] == ["domain", "language", "documents", "tokens", "share"]
    rows = {line.split()[0]: line.split() for line in out[3:]}
    tokens = {d: ShardStore(url).info(d).total_tokens for d in ("en_prose", "zh_lit")}
    assert rows["en_prose"][1:4] == ["en", "5", f"{tokens['en_prose']:,}"]
    assert rows["zh_lit"][1] == "zh"
    assert rows["en_prose"][4] == f"{tokens['en_prose'] / sum(tokens.values()):.1%}"


def test_missing_inputs_are_an_error_naming_the_pattern(tmp_path, capsys):
    code = main(["--input", str(tmp_path / "none*.jsonl"), "--domain", "en", "--output",
                 str(tmp_path / "s.zarr"), "--quiet"])
    assert code == 1 and "no input files match" in capsys.readouterr().err
