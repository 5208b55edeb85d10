"""The bundled corpus and the shipped byte-level BPE tokenizer trained on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightning_aquila.cli.tools import train_tokenizer_command as main
from lightning_aquila.tokenizer import (
    DEFAULT_TOKENIZER,
    load_tokenizer,
    special_token_ids,
    tokenizer_hash,
    train_tokenizer,
)

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
DOMAINS = sorted(p for p in CORPUS.iterdir() if p.is_dir())


def documents(domain: str) -> list[dict]:
    return [json.loads(line) for path in sorted((CORPUS / domain).glob("*.jsonl"))
            for line in path.read_text("utf-8").splitlines()]


@pytest.fixture(scope="module")
def shipped():
    return load_tokenizer()


@pytest.fixture(scope="module")
def small_slice(tmp_path_factory) -> Path:
    """A few real documents of three domains, enough to learn a 600-id tokenizer quickly."""
    path = tmp_path_factory.mktemp("slice") / "slice.jsonl"
    docs = [d for domain in ("zh_literature", "en_prose", "code_python")
            for d in documents(domain)[:8]]
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), "utf-8")
    return path


# --- the corpus ----------------------------------------------------------------------------
def test_corpus_has_at_least_five_domains_of_at_least_100_kb_each():
    assert len(DOMAINS) >= 5
    for domain in DOMAINS:
        size = sum(p.stat().st_size for p in domain.glob("*.jsonl"))
        assert size >= 100_000, f"{domain.name}: {size} bytes"


def test_every_corpus_line_is_a_json_document_with_text_and_source():
    for path in sorted(CORPUS.glob("*/*.jsonl")):
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            record = json.loads(line)
            assert isinstance(record["text"], str) and record["text"].strip(), (path, number)
            assert isinstance(record["source"], str) and record["source"], (path, number)
            assert "\r" not in record["text"], (path, number)


def test_corpus_documents_are_not_duplicated():
    texts = [d["text"] for domain in DOMAINS for d in documents(domain.name)]
    assert len(set(texts)) == len(texts)


def test_every_corpus_source_is_listed_in_the_licences():
    licences = (CORPUS / "LICENSES.md").read_text("utf-8")
    for path in sorted(CORPUS.glob("*/*.jsonl")):
        assert f"{path.parent.name}/{path.name}" in licences


# --- the shipped tokenizer -----------------------------------------------------------------
def test_shipped_tokenizer_has_8192_ids_with_bos_and_eos_as_the_last_two(shipped):
    assert DEFAULT_TOKENIZER.parts[-3:] == ("lightning_aquila", "assets", "tokenizer")
    assert (DEFAULT_TOKENIZER / "tokenizer.json").is_file()
    assert shipped.get_vocab_size() == 8192
    assert special_token_ids(shipped) == (8190, 8191)
    assert (shipped.id_to_token(8190), shipped.id_to_token(8191)) == ("<s>", "</s>")


@pytest.mark.parametrize("domain", ["zh_literature", "en_prose", "code_python"])
def test_shipped_tokenizer_round_trips_corpus_text_exactly(shipped, domain):
    texts = [d["text"] for d in documents(domain)[:40]]
    for text, encoding in zip(texts, shipped.encode_batch(texts)):
        assert shipped.decode(encoding.ids) == text
        assert all(0 <= i < 8192 for i in encoding.ids)


def test_any_unicode_encodes_without_unknown_tokens(shipped):
    text = "Ωμέγα — naïve 🦅 \x00\t\n 中文 e\u0301 \U0010ffff"
    ids = shipped.encode(text).ids
    assert shipped.decode(ids) == text
    assert max(ids) < 8190  # plain text never produces bos/eos


def test_special_tokens_are_single_ids_and_dropped_on_decode(shipped):
    ids = shipped.encode("<s>春眠不觉晓</s>").ids
    assert (ids[0], ids[-1]) == (8190, 8191)
    assert shipped.decode(ids) == "春眠不觉晓"


def test_shipped_tokenizer_compresses_every_domain_to_over_2_5_bytes_per_token(shipped):
    for domain in DOMAINS:
        texts = [d["text"] for d in documents(domain.name)[:30]]
        tokens = sum(len(e.ids) for e in shipped.encode_batch(texts))
        assert sum(len(t.encode()) for t in texts) / tokens > 2.5, domain.name


# --- identity --------------------------------------------------------------------------------
def test_hash_is_the_same_whichever_way_the_tokenizer_is_reached(shipped):
    expected = tokenizer_hash(shipped)
    assert len(expected) == 64 and int(expected, 16) >= 0
    assert tokenizer_hash(DEFAULT_TOKENIZER) == expected
    assert tokenizer_hash(str(DEFAULT_TOKENIZER)) == expected
    assert tokenizer_hash(DEFAULT_TOKENIZER / "tokenizer.json") == expected
    assert tokenizer_hash(load_tokenizer(str(DEFAULT_TOKENIZER / "tokenizer.json"))) == expected


def test_loading_a_missing_tokenizer_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(missing)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_tokenizer(tmp_path)  # a directory without tokenizer.json


# --- training ----------------------------------------------------------------------------------
def test_training_is_deterministic_and_gives_a_tokenizer_of_its_own(tmp_path, small_slice):
    first = train_tokenizer([str(small_slice)], str(tmp_path / "a"), vocab_size=600)
    second = train_tokenizer([str(small_slice)], str(tmp_path / "b"), vocab_size=600)
    assert first == tmp_path / "a" / "tokenizer.json"
    assert first.read_bytes() == second.read_bytes()
    assert tokenizer_hash(first) == tokenizer_hash(second) != tokenizer_hash(DEFAULT_TOKENIZER)
    trained = load_tokenizer(first)
    assert trained.get_vocab_size() == 600
    assert special_token_ids(trained) == (598, 599)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["tokenizer.json"]


def test_training_on_too_little_text_for_the_vocabulary_is_refused(tmp_path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("just a few words\n", "utf-8")
    with pytest.raises(ValueError, match="smaller vocab_size"):
        train_tokenizer([str(tiny)], str(tmp_path / "out"), vocab_size=8192)
    assert not (tmp_path / "out" / "tokenizer.json").exists()


def test_cli_trains_from_globs_and_reports_the_ids_and_hash(tmp_path, small_slice, capsys):
    out = tmp_path / "cli"
    assert main(["--input", str(small_slice.parent / "*.jsonl"), "--output", str(out),
                 "--vocab-size", "600"]) == 0
    printed = capsys.readouterr().out
    assert "vocab size: 600" in printed
    assert "598" in printed and "599" in printed
    assert tokenizer_hash(out) in printed
    assert str(out / "tokenizer.json") in printed


def test_cli_rejects_a_glob_that_matches_nothing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--input", str(tmp_path / "none*.jsonl"), "--output", str(tmp_path / "o")])
    assert "matches no file" in capsys.readouterr().err
