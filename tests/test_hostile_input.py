"""Hostile input, as property tests (hypothesis): corrupt and random sources for ``prepare``,
byte flips in a store's chunks and metadata, random YAML mixture specs, random weight vectors.

Every case must either work or fail with our error type (``DataError``, or the
``ValueError`` of the Mixture contract) naming the input; none may crash with an unrelated
traceback, hang, or change a byte of the store that was there before. The number of cases is
set by the hypothesis profile (``tests/conftest.py``): ``ci`` (default) or ``nightly``
(``HYPOTHESIS_PROFILE=nightly``); ``pytest --hypothesis-show-statistics`` prints them.
"""

from __future__ import annotations

import argparse
import bz2
import contextlib
import gzip
import io
import json
import lzma
import math
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lightning_aquila.cli.tools import inspect_command as inspect_main  # noqa: E402
from lightning_aquila.datamodules import DataError, DomainDataModule, ShardStore  # noqa: E402
from lightning_aquila.datamodules.mixture import DomainMixture  # noqa: E402
from lightning_aquila.datamodules.prepare import prepare  # noqa: E402
from lightning_aquila.datamodules.store import iter_documents  # noqa: E402
from lightning_aquila.datamodules.writer import DomainWriter  # noqa: E402

#: hypothesis runs many examples in one test function: temporary folders are made per example
#: below a module-scoped folder, so function-scoped fixtures are not needed.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.NonInteractiveExampleWarning")
FIXTURE_OK = settings(suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow,
                                             HealthCheck.data_too_large])


# -- helpers -----------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below ``root`` (relative path -> bytes)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


@contextlib.contextmanager
def scratch(parent: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def copy_of(store: Path, parent: Path) -> Iterator[Path]:
    """A private copy of ``store`` for one example (examples must not see each other)."""
    with scratch(parent) as folder:
        url = folder / store.name
        shutil.copytree(store, url)
        yield url


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


@pytest.fixture(scope="module")
def base_store(work: Path) -> Path:
    """A store prepared from good text: domain ``base``, both splits, several chunks."""
    source = work / "base.jsonl"
    source.write_text("".join(json.dumps({"text": f"base document {i}: " + "words " * (i % 7)})
                              + "\n" for i in range(60)), encoding="utf-8")
    url = work / "base.zarr"
    prepare(str(source), "base", str(url), held_out_fraction=0.3, chunk_tokens=64,
            progress=False)
    return url


def assert_names(error: BaseException, *names: str) -> None:
    message = str(error)
    for name in names:
        assert name in message, f"{name!r} not in the error message: {message}"


def check_existing_domain(store: Path, before: dict[str, bytes], failed: bool) -> None:
    """A failed run leaves every byte as it was; a successful one leaves every file that was
    there alone except the domain attributes and the manifest (the commit). Either way the
    store opens, verifies and ``inspect`` works."""
    after = snapshot(store)
    if failed:
        assert after == before
    else:
        commit = {"zarr.json", "base/zarr.json"}
        changed = [k for k in before if k not in commit and after.get(k) != before[k]]
        assert changed == []
    ShardStore(str(store)).verify(full=True)
    with contextlib.redirect_stdout(io.StringIO()):
        assert inspect_main([str(store)]) == 0


# -- prepare: jsonl records of known kinds, with an exact oracle --------------------------------
texts = st.text(max_size=60)
numbers = st.one_of(st.integers(-10**6, 10**6), st.floats(-1e6, 1e6))
junk_values = st.one_of(st.none(), st.booleans(), st.integers(), st.lists(st.integers(),
                        max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                     max_size=2), st.binary(max_size=5))
#: Lines whose fate is known: (kind, bytes). "doc" is a good record (with its text), "blank" is
#: no record at all, anything else is a bad record.
GOOD, BLANK = "doc", "blank"


@st.composite
def jsonl_line(draw: st.DrawFn, quality_field: str | None) -> tuple[str, Any, bytes]:
    kind = draw(st.sampled_from([GOOD, GOOD, GOOD, BLANK, "invalid_json", "not_utf8",
                                 "not_object", "missing_field", "wrong_type", "surrogate",
                                 "deep", "huge_int", "huge_line", "bad_quality"]))
    ascii_only = draw(st.booleans())
    record: dict[str, Any] = {"meta": draw(st.text(max_size=5))}
    text = draw(texts)
    if kind in (GOOD, "huge_line", "bad_quality", "surrogate"):
        if kind == "huge_line":
            text = draw(st.sampled_from("ab 中\n")) * draw(st.integers(20_000, 80_000))
        if kind == "surrogate":
            cut = draw(st.integers(0, len(text)))
            text = text[:cut] + chr(draw(st.integers(0xD800, 0xDFFF))) + text[cut:]
            ascii_only = True  # json.dumps escapes it as \udxxx, which json.loads accepts
        record["text"] = text
        if quality_field and kind == "bad_quality":
            record[quality_field] = draw(st.one_of(
                st.text(max_size=3), st.booleans(), st.lists(st.integers(), max_size=2),
                st.sampled_from([math.inf, -math.inf, math.nan, 1e39, 10**400])))
        elif quality_field and draw(st.booleans()):
            record[quality_field] = draw(st.one_of(st.none(), numbers))
        if kind == "bad_quality" and not quality_field:
            kind = GOOD
        if kind == "huge_line":
            kind = GOOD
        line = json.dumps(record, ensure_ascii=ascii_only).encode()
        return kind, text, line
    if kind == BLANK:
        return kind, None, draw(st.sampled_from([b"", b" ", b"\t", b"  \r", b"\x0c"]))
    if kind == "invalid_json":
        good = json.dumps({"text": text}).encode()
        return kind, None, good[:draw(st.integers(0, len(good) - 1))] + b"}{"
    if kind == "not_utf8":
        return kind, None, b'{"text": "' + draw(st.sampled_from(
            [b"\xc3\x28", b"\xff", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])) + b'"}'
    if kind == "not_object":
        value = draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), texts,
                               st.none(), st.booleans()))
        return kind, None, json.dumps(value).encode()
    if kind == "missing_field":
        record["body"] = text
        return kind, None, json.dumps(record).encode()
    if kind == "wrong_type":
        record["text"] = draw(st.one_of(st.none(), st.booleans(), numbers,
                                        st.lists(texts, max_size=2),
                                        st.dictionaries(st.text(max_size=3), texts, max_size=2)))
        return kind, None, json.dumps(record).encode()
    if kind == "deep":
        depth = draw(st.integers(2_000, 50_000))
        return kind, None, b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    # huge_int: more digits than Python converts by default
    return kind, None, b'{"text": "x", "n": ' + b"7" * draw(st.integers(5_000, 20_000)) + b"}"


@st.composite
def jsonl_case(draw: st.DrawFn) -> dict[str, Any]:
    quality_field = draw(st.sampled_from([None, "q"]))
    lines = draw(st.lists(jsonl_line(quality_field), max_size=12))
    return {"quality_field": quality_field, "lines": lines,
            "on_error": draw(st.sampled_from(["stop", "skip"])),
            "domain": draw(st.sampled_from(["base", "fresh"])),
            "held_out_fraction": draw(st.sampled_from([0.0, 0.2, 0.9])),
            "crlf": draw(st.booleans())}


@FIXTURE_OK
@given(case=jsonl_case())
def test_jsonl_records_of_every_kind_are_prepared_or_named_and_the_store_is_kept(
        case, work, base_store, dmu_tokenizer):
    from lightning_aquila.tokenizer import load_tokenizer

    lines = case["lines"]
    with copy_of(base_store, work) as store, scratch(work) as inputs:
        source = inputs / "hostile.jsonl"
        end = b"\r\n" if case["crlf"] else b"\n"
        source.write_bytes(b"".join(line + end for _, _, line in lines))
        before = snapshot(store)
        bad = [n for n, (kind, _, _) in enumerate(lines, 1) if kind not in (GOOD, BLANK)]
        good = [text for kind, text, _ in lines if kind == GOOD]
        try:
            report = prepare(str(source), case["domain"], str(store),
                             quality_field=case["quality_field"], on_error=case["on_error"],
                             held_out_fraction=case["held_out_fraction"], chunk_tokens=512,
                             batch_chars=500, progress=False)
        except DataError as error:
            check_existing_domain(store, before, failed=True)
            if "no documents" in str(error):  # an input of no documents adds nothing
                assert_names(error, str(source))
                assert not any(t.strip() for t in good)
                return
            if "nothing to train on" in str(error) or "too few to hold out" in str(error):
                assert_names(error, str(source))  # a fresh domain would have an empty split
                assert case["domain"] == "fresh" and case["held_out_fraction"] > 0
                return
            assert case["on_error"] == "stop" and bad, error
            assert_names(error, f"{source}:line {bad[0]}:")
            check_existing_domain(store, before, failed=True)
            return
        assert not (case["on_error"] == "stop" and bad)
        check_existing_domain(store, before, failed=False)
        [added] = report.added
        assert added["bad_records"] == len(bad)
        assert len(added["bad_examples"]) == min(len(bad), 5)
        assert [e.split(":line ")[1].split(":")[0] for e in added["bad_examples"]] == [
            str(n) for n in bad[:5]]
        tok = load_tokenizer(dmu_tokenizer)
        eos = ShardStore(str(store)).info(case["domain"]).tokenizer["eos_id"]
        expected = [[*tok.encode(t, add_special_tokens=False).ids, eos] for t in good
                    if t.strip()]
        assert added["documents"] + added["empty_documents"] == len(good)
        assert added["documents"] == len(expected)
        shard = ShardStore(str(store))
        docs = [d.tolist() for split in ("train", "heldout")
                for d in iter_documents(shard, case["domain"], split)]
        if case["domain"] == "fresh":
            assert sorted(docs) == sorted(expected)


# -- prepare: arbitrary bytes, any format and compression ---------------------------------------
COMPRESSORS = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress,
               ".xz": lzma.compress}


@st.composite
def raw_source(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """(file name, bytes, whether the bytes were damaged after compression)."""
    pieces = draw(st.lists(st.one_of(
        st.binary(max_size=40),
        texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
        texts.map(lambda t: (json.dumps({"text": t}) + "\n").encode()),
        st.sampled_from([b"\n", b"\r\n", b"\x00", b"\xef\xbb\xbf", b"\xff\xfe", b"{", b"["])),
        max_size=20))
    data = b"".join(pieces)
    fmt = draw(st.sampled_from([".jsonl", ".txt"]))
    suffix = draw(st.sampled_from(list(COMPRESSORS)))
    data = COMPRESSORS[suffix](data)
    damaged = False
    if suffix and data and draw(st.booleans()):
        damaged = True
        if draw(st.booleans()):
            data = data[:draw(st.integers(0, len(data) - 1))]
        else:
            flipped = bytearray(data)
            for _ in range(draw(st.integers(1, 4))):
                flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
            data = bytes(flipped)
    return f"hostile{fmt}{suffix}", data, damaged


@FIXTURE_OK
@given(source=raw_source(), on_error=st.sampled_from(["stop", "skip"]),
       domain=st.sampled_from(["base", "fresh"]))
def test_arbitrary_bytes_in_any_format_and_compression_are_prepared_or_named(
        source, on_error, domain, work, base_store):
    name, data, _ = source
    with copy_of(base_store, work) as store, scratch(work) as inputs:
        path = inputs / name
        path.write_bytes(data)
        before = snapshot(store)
        try:
            report = prepare(str(path), domain, str(store), on_error=on_error,
                             held_out_fraction=0.2, chunk_tokens=512, batch_chars=300,
                             piece_chars=64, progress=False)
        except DataError as error:
            assert_names(error, str(path))
            check_existing_domain(store, before, failed=True)
            return
        check_existing_domain(store, before, failed=False)
        if report.undecodable:  # skipped whole, named: only under skip, only txt
            assert on_error == "skip" and report.undecodable[0].startswith(f"{path}: ")
            assert not report.added
            return
        if name.endswith(".txt"):  # uncompressed: a txt file is prepared iff it is UTF-8
            data.decode("utf-8")  # it did not fail, so this must not either
        assert len(report.added) == 1


# -- prepare: parquet tables, random and damaged ------------------------------------------------
@st.composite
def parquet_source(draw: st.DrawFn) -> tuple[bytes, dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = draw(st.integers(0, 30))
    column_type = draw(st.sampled_from(["string", "large_string", "dictionary", "binary",
                                        "int64", "list", "null"]))
    texts_ = draw(st.lists(st.one_of(st.none(), texts), min_size=rows, max_size=rows))
    if column_type in ("string", "large_string"):
        column = pa.array(texts_, type=getattr(pa, column_type)())
    elif column_type == "dictionary":
        column = pa.array(texts_, type=pa.string()).dictionary_encode()
    elif column_type == "binary":
        column = pa.array([None if t is None else t.encode() for t in texts_], type=pa.binary())
    elif column_type == "int64":
        column = pa.array(draw(st.lists(st.one_of(st.none(), st.integers(-2**63, 2**63 - 1)),
                                        min_size=rows, max_size=rows)), type=pa.int64())
    elif column_type == "list":
        column = pa.array([None if t is None else [t] for t in texts_],
                          type=pa.list_(pa.string()))
    else:
        column = pa.nulls(rows)
    columns = {draw(st.sampled_from(["text", "text", "body"])): column}
    quality_type = draw(st.sampled_from([None, "float64", "int64", "string", "bool"]))
    if quality_type is not None:
        values = draw(st.lists(st.one_of(st.none(), st.floats(), st.integers(-10**9, 10**9),
                                         st.booleans(), texts), min_size=rows, max_size=rows))
        convert = {"float64": lambda v: float(v) if isinstance(v, (int, float)) else None,
                   "int64": lambda v: int(v) if isinstance(v, int) else None,
                   "string": lambda v: None if v is None else str(v),
                   "bool": lambda v: v if isinstance(v, bool) else None}[quality_type]
        columns["q"] = pa.array([convert(v) for v in values], type=getattr(
            pa, {"float64": "float64", "int64": "int64", "string": "string",
                 "bool": "bool_"}[quality_type])())
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer, row_group_size=draw(st.integers(1, 10)),
                   compression=draw(st.sampled_from(["none", "snappy", "zstd"])))
    data = buffer.getvalue()
    damage = draw(st.sampled_from([None, None, "flip", "truncate"]))
    if damage == "truncate":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        flipped = bytearray(data)
        for _ in range(draw(st.integers(1, 6))):
            flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
        data = bytes(flipped)
    return data, {"damage": damage, "column_type": column_type, "columns": list(columns),
                  "texts": texts_, "quality_type": quality_type}


@FIXTURE_OK
@given(source=parquet_source(), quality_field=st.sampled_from([None, "q"]),
       on_error=st.sampled_from(["stop", "skip"]), domain=st.sampled_from(["base", "fresh"]))
def test_random_and_damaged_parquet_files_are_prepared_or_named(
        source, quality_field, on_error, domain, work, base_store):
    data, info = source
    with copy_of(base_store, work) as store, scratch(work) as inputs:
        path = inputs / "hostile.parquet"
        path.write_bytes(data)
        before = snapshot(store)
        try:
            report = prepare(str(path), domain, str(store), quality_field=quality_field,
                             on_error=on_error, held_out_fraction=0.2, chunk_tokens=512,
                             progress=False)
        except DataError as error:
            assert_names(error, str(path))
            check_existing_domain(store, before, failed=True)
            return
        check_existing_domain(store, before, failed=False)
        if info["damage"] is None:
            assert "text" in info["columns"]
            assert quality_field is None or "q" in info["columns"]
            strings = info["column_type"] in ("string", "large_string", "dictionary")
            good = [t for t in info["texts"] if strings and t is not None]
            [added] = report.added
            if quality_field is None:
                assert added["documents"] + added["empty_documents"] == len(good)
                assert added["bad_records"] == len(info["texts"]) - len(good)


# -- the store: byte flips in chunks and in metadata -------------------------------------------
@pytest.fixture(scope="module")
def synthetic_store(work: Path, dmu_tokenizer: str) -> Path:
    """Two domains, both splits, with a quality array; chunks of 64 tokens. Marked as made
    with the bundled tokenizer, so that ``prepare`` may append to them."""
    from lightning_aquila.tokenizer import load_tokenizer, tokenizer_hash

    meta = {"hash": tokenizer_hash(load_tokenizer(dmu_tokenizer)), "eos_id": 8191}
    url = work / "synthetic.zarr"
    for index, name in enumerate(("a", "b")):
        with DomainWriter(str(url), name, tokenizer=meta, language="xx",
                          chunk_tokens=64, with_quality=True) as writer:
            for doc in range(12):
                tokens = (index * 1000 + doc * 37 + np.arange(20 + doc * 9)) % 50_000
                writer.add_document("train", tokens.astype(np.uint32), quality=doc / 12)
            writer.add_document("heldout", np.arange(150, dtype=np.uint32), quality=None)
            writer.add_source({"path": f"synthetic-{name}", "sha256": name})
            writer.commit()
    return url


def chunk_files(store: Path) -> list[str]:
    return sorted(str(p.relative_to(store)) for p in store.rglob("c/*") if p.is_file())


@st.composite
def damage(draw: st.DrawFn, data: bytes) -> bytes:
    how = draw(st.sampled_from(["flip", "flip", "flip", "truncate", "append", "empty",
                                "replace"]))
    if how == "flip" and data:  # distinct positions: two flips of one byte could cancel out
        flipped = bytearray(data)
        for at in draw(st.lists(st.integers(0, len(data) - 1), min_size=1, max_size=8,
                                unique=True)):
            flipped[at] ^= draw(st.integers(1, 255))
        return bytes(flipped)
    if how == "truncate" and data:
        return data[:draw(st.integers(0, len(data) - 1))]
    if how == "append":
        return data + draw(st.binary(min_size=1, max_size=16))
    if how == "replace":
        return draw(st.binary(max_size=len(data) + 8).filter(lambda b: b != data))
    return b""


@FIXTURE_OK
@given(data=st.data())
def test_a_damaged_chunk_is_always_caught_and_named(data, work, synthetic_store):
    chunks = chunk_files(synthetic_store)
    targets = data.draw(st.lists(st.sampled_from(chunks), min_size=1, max_size=3, unique=True))
    with copy_of(synthetic_store, work) as store:
        for target in targets:
            original = (store / target).read_bytes()
            (store / target).write_bytes(data.draw(damage(original)))
        # verify="full" decodes every chunk of every array: a damaged one is named
        with pytest.raises(DataError) as caught:
            ShardStore(str(store)).verify(full=True)
        named = [t for t in targets if all(part in str(caught.value) for part in (
            "domain {!r}, split {!r}, segment {!r}: chunk c/{} of {!r}".format(
                *Path(t).parts[:3], Path(t).parts[5], Path(t).parts[3]),))]
        assert named, (targets, str(caught.value))
        with pytest.raises(DataError, match=r"chunk c/\d+ of '\w+'"):
            DomainDataModule(str(store), seq_len=16, verify="full").setup("fit")
        # verify="chunks" only lists them; then training reads fail on a damaged token chunk
        dm = DomainDataModule(str(store), seq_len=16, verify="chunks",
                              val_windows_per_domain=0)
        dm.setup("fit")
        from lightning_aquila.datamodules.dataset import TrainWindows

        windows = TrainWindows(str(store), dm.domains, 16)
        spec = [[d, w] for d, name in enumerate(dm.domains)
                for w in range(dm.store.stream(name).windows(16))]
        hit = [t for t in targets if t.split("/")[1] == "train" and t.split("/")[3] == "tokens"]
        if hit:
            with pytest.raises(DataError, match=r"chunk c/\d+ of 'tokens'"):
                windows[np.array(spec)]
        else:
            windows[np.array(spec)]


def read_everything(url: str) -> dict[str, Any]:
    """Every token and document boundary a reader can get from a store (after verifying)."""
    shard = ShardStore(url)
    shard.verify(full=True)
    out: dict[str, Any] = {}
    for name in shard.domains:
        for split in ("train", "heldout"):
            stream = shard.stream(name, split)
            out[f"{name}/{split}"] = stream.read(0, stream.n_tokens).tolist()
            out[f"{name}/{split}/docs"] = [len(d) for d in iter_documents(shard, name, split)]
    return out


@FIXTURE_OK
@given(data=st.data())
def test_damaged_metadata_is_a_data_error_or_reads_the_same_tokens(data, work, synthetic_store,
                                                                   dmu_tokenizer):
    """Metadata has no checksum (zarr.json is plain JSON): damage must either fail as a
    ``DataError`` naming the store or leave what readers get unchanged (a flipped byte in a
    free-text attribute, say). ``prepare`` into the damaged store must not make it worse."""
    files = sorted(str(p.relative_to(synthetic_store))
                   for p in synthetic_store.rglob("zarr.json"))
    target = data.draw(st.one_of(st.just("zarr.json"), st.sampled_from(files)))
    domain = data.draw(st.sampled_from(["a", "fresh"]))
    with copy_of(synthetic_store, work) as store, scratch(work) as inputs:
        original = (store / target).read_bytes()
        (store / target).write_bytes(data.draw(damage(original)))
        try:
            assert read_everything(str(store)) == read_everything(str(synthetic_store))
            hypothesis.event("metadata damage: read the same tokens")
        except DataError as error:
            assert str(store) in str(error)
            hypothesis.event("metadata damage: DataError")
        source = inputs / "good.jsonl"
        source.write_text('{"text": "a good document"}\n', encoding="utf-8")
        before = snapshot(store)
        try:
            prepare(str(source), domain, str(store), held_out_fraction=0, progress=False)
        except DataError as error:
            assert str(store) in str(error)
            assert snapshot(store) == before
            hypothesis.event("prepare into the damaged store: DataError")
            return
        after = snapshot(store)
        assert {k for k in before if after.get(k) != before[k]} <= {"zarr.json",
                                                                   f"{domain}/zarr.json"}
        hypothesis.event("prepare into the damaged store: appended")


# -- the mixture: random weight vectors --------------------------------------------------------
DOMAINS = ["web", "code", "zh"]
weight_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 10), st.integers(-5, 10),
    st.integers(10**300, 10**400), st.booleans(), st.none(), st.text(max_size=4),
    st.sampled_from([np.float32(0.5), np.float64(np.nan), np.int64(3), 1e308, 5e-324]))
weight_keys = st.one_of(st.sampled_from(DOMAINS), st.text(max_size=4), st.integers(0, 3))


def weight_problem(weights: Any, normalize: bool) -> str | None:
    """What the Mixture contract says is wrong with ``weights`` (None: they are valid)."""
    if not isinstance(weights, dict):
        return repr(weights)
    unknown = [k for k in weights if k not in DOMAINS]
    if unknown:
        return repr(unknown[0])
    values = []
    for key in DOMAINS:
        value = weights.get(key, 0.0)
        if isinstance(value, (bool, str)) or value is None:
            return repr(key)
        value = float(value) if not isinstance(value, int) or abs(value) < 10**308 else math.inf
        if not math.isfinite(value) or value < 0:
            return repr(key)
        values.append(value)
    top = max(values)
    if top == 0:
        return "all zero"
    if not normalize and abs(math.fsum(v / top for v in values) * top - 1.0) > 1e-3:
        return "sum to"
    return None


@given(weights=st.one_of(st.dictionaries(weight_keys, weight_values, max_size=4),
                         st.lists(st.floats(), max_size=3), st.none(), st.text(max_size=4)),
       normalize=st.booleans())
def test_set_weights_accepts_valid_weights_and_refuses_others_leaving_the_mixture_alone(
        weights, normalize):
    mixture = DomainMixture(DOMAINS, {"web": 2, "code": 1, "zh": 1})
    mixture.set_weights({"web": 0.2, "code": 0.3, "zh": 0.5}, reason="before")
    before = mixture.state_dict()
    problem = weight_problem(weights, normalize)
    if problem is not None:
        with pytest.raises(ValueError) as caught:
            mixture.set_weights(weights, reason="hostile", normalize=normalize)
        assert_names(caught.value, problem)
        assert mixture.state_dict() == before
        return
    change = mixture.set_weights(weights, reason="hostile", normalize=normalize)
    assert mixture.weights == change.weights and len(mixture.history) == 3
    values = list(mixture.weights.values())
    assert all(math.isfinite(w) and w >= 0 for w in values)
    assert math.isclose(sum(values), 1.0, abs_tol=1e-9)
    for name in DOMAINS:  # the proportions asked for, rescaled
        if weights.get(name, 0) == 0:
            assert mixture.weights[name] == 0


# -- the mixture: random YAML specs, through the CLI's parser ----------------------------------
STORE_DOMAINS = ["a", "b", "c"]


@pytest.fixture(scope="module")
def yaml_store(work: Path) -> str:
    url = work / "yaml.zarr"
    for index, name in enumerate(STORE_DOMAINS):
        with DomainWriter(str(url), name, tokenizer={"hash": "synthetic"}, language="xx",
                          chunk_tokens=256) as writer:
            writer.add_document("train", np.arange(300 * (index + 1), dtype=np.uint32))
            writer.add_document("heldout", np.arange(100, dtype=np.uint32))
            writer.add_source({"path": name, "sha256": name})
            writer.commit()
    return str(url)


@pytest.fixture(scope="module")
def cli_parser() -> Any:
    """The parser ``lightning-aquila fit`` uses (LightningCLI's, built once)."""
    from lightning.pytorch import LightningDataModule

    from lightning_aquila.cli.trainer import AquilaCLI
    from lightning_aquila.module import AquilaLM

    class ParserOnly(AquilaCLI):
        def instantiate_classes(self) -> None:  # only the parser is wanted here
            pass

    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        cli = ParserOnly(AquilaLM, LightningDataModule, subclass_mode_data=True, run=False,
                         args=["--data", "lightning_aquila.datamodules.DomainDataModule",
                               "--data.store", "unused"])
    finally:
        sys.argv = argv
    cli.parser.exit_on_error = False
    return cli.parser


yaml_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10), st.integers(10**300, 10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=6),
    st.sampled_from(["natural", "uniform", "1e-3", ".nan", "-.inf", "0x10"]))
yaml_keys = st.one_of(st.sampled_from(STORE_DOMAINS), st.text(max_size=3))


def or_junk(plausible: st.SearchStrategy, junk: st.SearchStrategy,
            hostile: bool) -> st.SearchStrategy:
    """A plausible value; in a hostile spec, sometimes junk instead."""
    return st.one_of(plausible, plausible, junk) if hostile else plausible


def weight_specs(hostile: bool) -> st.SearchStrategy:
    plausible = st.one_of(
        st.dictionaries(st.sampled_from(STORE_DOMAINS), st.floats(0, 5), min_size=1),
        st.sampled_from(["natural", "uniform"]))
    junk = st.one_of(yaml_scalars, st.lists(yaml_scalars, max_size=3), st.dictionaries(
        yaml_keys, st.one_of(st.floats(0, 5), yaml_scalars), max_size=4))
    return or_junk(plausible, junk, hostile)


def bound_specs(low: float, high: float, hostile: bool) -> st.SearchStrategy:
    plausible = st.one_of(st.floats(low, high), st.dictionaries(
        st.sampled_from(STORE_DOMAINS), st.floats(low, high), max_size=3))
    junk = st.one_of(yaml_scalars, st.floats(-1, 2), st.dictionaries(
        yaml_keys, st.one_of(st.floats(0, 1), yaml_scalars), max_size=3))
    return or_junk(plausible, junk, hostile)


def increasing(index: int, value: Any) -> Any:
    """A stage end that grows with the stage index when it is an integer; junk as drawn."""
    return (index + 1) * value if type(value) is int else value


@st.composite
def yaml_stage(draw: st.DrawFn, index: int, hostile: bool) -> Any:
    if hostile and draw(st.integers(0, 9)) == 0:
        return draw(yaml_scalars)
    stage: dict[Any, Any] = {"weights": draw(weight_specs(hostile))}
    if draw(st.booleans()):
        stage["name"] = draw(or_junk(st.just(f"K{index}"), yaml_scalars, hostile))
    end = draw(st.sampled_from(["until_tokens", "until_step", "both", "neither"]
                               if hostile else ["until_tokens", "until_step"]))
    if end in ("until_tokens", "both"):
        stage["until_tokens"] = increasing(index, draw(or_junk(st.integers(1, 10**5),
                                                               yaml_scalars, hostile)))
    if end in ("until_step", "both"):
        stage["until_step"] = increasing(index, draw(or_junk(st.integers(1, 50), yaml_scalars,
                                                             hostile)))
    if hostile and draw(st.integers(0, 4)) == 0:
        stage[draw(st.text(max_size=3))] = draw(yaml_scalars)
    if hostile and draw(st.integers(0, 4)) == 0:
        del stage["weights"]
    return stage


@st.composite
def yaml_spec(draw: st.DrawFn, store: str) -> dict[str, Any]:
    """A ``lightning-aquila fit`` config's data and policy parts: plausible ones (many get to
    a mixture) and hostile ones (junk in some fields)."""
    hostile = draw(st.booleans())
    data_args: dict[str, Any] = {"store": store, "seq_len": 8, "val_windows_per_domain": 0}
    if draw(st.booleans()):
        data_args["weights"] = draw(weight_specs(hostile))
    if draw(st.integers(0, 3)) == 0:
        data_args["domains"] = draw(or_junk(
            st.lists(st.sampled_from(STORE_DOMAINS), min_size=1, max_size=3, unique=True),
            st.one_of(st.lists(st.sampled_from([*STORE_DOMAINS, "nope"]), max_size=3),
                      yaml_scalars), hostile))
    spec: dict[str, Any] = {"data": {"class_path": "lightning_aquila.datamodules.DomainDataModule",
                                     "init_args": data_args}}
    policy = draw(st.sampled_from(["StaticMixture", "StagedMixture", "StagedMixture",
                                   "ExcessLossMixture", "BanditMixture", "none"]
                                  + (["bogus"] if hostile else [])))
    if policy == "none":
        return spec
    args: dict[str, Any] = {}
    if policy == "StagedMixture":
        count = draw(st.integers(0 if hostile else 1, 4))
        stages = st.tuples(*[yaml_stage(i, hostile) for i in range(count)]).map(list)
        args["stages"] = draw(or_junk(stages, yaml_scalars, hostile))
        if not hostile and "until_tokens" in args["stages"][-1] and draw(st.booleans()):
            del args["stages"][-1]["until_tokens"]  # the last stage may run to the end
    elif policy == "ExcessLossMixture":
        args["reference"] = draw(or_junk(st.fixed_dictionaries(
            {d: st.floats(0, 10) for d in STORE_DOMAINS}), weight_specs(True), hostile))
        if draw(st.booleans()):
            args["signal"] = draw(or_junk(st.sampled_from(["train", "val"]), yaml_scalars,
                                          hostile))
    elif policy == "BanditMixture":
        for key, values in (("smoothing", st.floats(0, 0.99)), ("warmup_steps",
                            st.integers(0, 5)), ("importance_weighted", st.booleans())):
            if draw(st.booleans()):
                args[key] = draw(or_junk(values, yaml_scalars, hostile))
    elif draw(st.booleans()):
        args["weights"] = draw(weight_specs(hostile))
    for key, values in (("min_weight", bound_specs(0, 0.3, hostile)),
                        ("max_weight", bound_specs(0.4, 1, hostile)),
                        ("update_every", or_junk(st.integers(1, 5), st.one_of(
                            st.integers(-2, 0), yaml_scalars), hostile))):
        if draw(st.integers(0, 2)) == 0:
            args[key] = draw(values)
    module = ("os" if policy == "bogus" else "lightning_aquila.callbacks.policies")
    spec["trainer"] = {"callbacks": [
        {"class_path": "lightning_aquila.callbacks.TrainingStateMonitor"},
        {"class_path": "lightning_aquila.callbacks.engine.AdaptiveTrainingEngine",
         "init_args": {"policy": {"class_path": f"{module}.{policy}", "init_args": args}}}]}
    return spec


def run_spec(parser: Any, text: str, state: Any) -> dict[str, float]:
    """What ``lightning-aquila fit`` does with a config up to the first batch: parse,
    instantiate, then the datamodule builds its mixture and the engine asks its policy."""
    from lightning_aquila.callbacks.engine import AdaptiveTrainingEngine
    from lightning_aquila.cli.trainer import check_config_groups

    config = parser.parse_string(text)
    check_config_groups(config)  # AquilaCLI.before_instantiate_classes
    init = parser.instantiate_classes(config)
    datamodule = init.data
    mixture = datamodule.mixture
    for callback in init.trainer.callbacks or []:
        if isinstance(callback, AdaptiveTrainingEngine) and callback.policy is not None:
            callback.policy.setup(list(mixture.domains), datamodule.natural_weights())
            proposal = callback.policy.propose(state, dict(mixture.weights))
            if proposal is not None:
                mixture.set_weights(proposal, normalize=True)
    return mixture.weights


@FIXTURE_OK
@given(data=st.data())
def test_random_yaml_mixture_specs_work_or_fail_naming_the_field(data, cli_parser, yaml_store):
    import yaml

    from lightning_aquila.callbacks.state import TrainingState

    spec = data.draw(yaml_spec(yaml_store))
    text = yaml.safe_dump(spec)
    if data.draw(st.integers(0, 4)) == 0:  # and some that are not even YAML of that shape
        at = data.draw(st.integers(0, len(text)))
        text = text[:at] + data.draw(st.sampled_from(["\t", ": ", "- ", "{", "]", "&a *b",
                                                      "!!python/object:os.system ", "\n  x"]))\
            + text[at:]
    state = TrainingState(step=data.draw(st.integers(0, 200)),
                          tokens=data.draw(st.integers(0, 10**6)),
                          tokens_per_domain={d: 100 for d in STORE_DOMAINS})
    try:
        weights = run_spec(cli_parser, text, state)
    except (argparse.ArgumentError, ValueError) as error:  # DataError is a ValueError
        hypothesis.event(f"outcome: {type(error).__name__}")
        message = str(error)
        assert message.strip()
        for unrelated in ("Traceback", "KeyError", "TypeError", "ZeroDivisionError",
                          "AttributeError", "OverflowError", "IndexError"):
            assert unrelated not in message, message
        return
    hypothesis.event("outcome: weights set")
    assert set(weights) <= set(STORE_DOMAINS)
    assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-9)
    assert all(math.isfinite(w) and w >= 0 for w in weights.values())


@FIXTURE_OK
@given(data=st.data())
def test_random_mixture_specs_given_to_the_constructors_directly_fail_as_value_errors(
        data, yaml_store):
    """The same specs without the CLI's type checks (a Python caller, or ``yaml.safe_load``
    output passed on): our constructors and ``setup`` must still refuse them clearly."""
    from lightning_aquila.callbacks import policies
    from lightning_aquila.callbacks.state import TrainingState

    spec = data.draw(yaml_spec(yaml_store))
    data_args = spec["data"]["init_args"]
    state = TrainingState(step=data.draw(st.integers(0, 200)),
                          tokens=data.draw(st.integers(0, 10**6)),
                          tokens_per_domain={d: 100 for d in STORE_DOMAINS})
    try:
        datamodule = DomainDataModule(**data_args)
        mixture = datamodule.mixture
        if "trainer" in spec:
            policy_spec = spec["trainer"]["callbacks"][1]["init_args"]["policy"]
            name = policy_spec["class_path"].rsplit(".", 1)[1]
            cls = getattr(policies, name, None)
            if cls is None:
                return  # the CLI refuses an unknown class_path; nothing to call here
            policy = cls(**policy_spec["init_args"])
            policy.setup(list(mixture.domains), datamodule.natural_weights())
            proposal = policy.propose(state, dict(mixture.weights))
            if proposal is not None:
                mixture.set_weights(proposal, normalize=True)
    except ValueError as error:
        hypothesis.event(f"outcome: {type(error).__name__}")
        assert str(error).strip()
        return
    hypothesis.event("outcome: weights set")
    weights = mixture.weights
    assert math.isclose(sum(weights.values()), 1.0, abs_tol=1e-9)
    assert all(math.isfinite(w) and w >= 0 for w in weights.values())
