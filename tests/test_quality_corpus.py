"""benchmarks/quality/build_quality_corpus.py: the quality benchmark's corpus is reproducible,
holds every kind of junk, and its clean test documents share no text with what is trained
on or what the scorer learns from."""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks" / "quality"))
spec = importlib.util.spec_from_file_location(
    "build_quality_corpus", REPO / "benchmarks/quality/build_quality_corpus.py")
builder = importlib.util.module_from_spec(spec)
spec.loader.exec_module(builder)

SENTENCE = ("the function returns a list of values when called with the path argument and "
            "raises an error if the file does not exist so callers should check it first")
WORDS = SENTENCE.split()


def _document(rng: random.Random, number: int) -> str:
    paragraphs = []
    for p in range(4):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16))).capitalize()
                     + rng.choice((".", "!", "?")) for _ in range(8)]
        paragraphs.append(f"Section {number}.{p}: it's \"quoted\" - " + " ".join(sentences))
    return "\n\n".join(paragraphs)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mixing")
    rng = random.Random(0)
    (root / "en_docs").mkdir()
    lines = [json.dumps({"text": _document(rng, n)}) for n in range(240)]
    (root / "en_docs" / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _build(corpus: Path, out: Path) -> dict:
    return builder.build(corpus, out, domains=["en_docs"], junk_share=0.5, seed=3)


def _texts(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_same_settings_build_the_same_files(corpus, tmp_path):
    first = _build(corpus, tmp_path / "a")
    second = _build(corpus, tmp_path / "b")
    assert first["files"] == second["files"]
    for name in first["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_the_pool_and_the_scorer_test_sample_hold_every_kind_of_junk(corpus, tmp_path):
    manifest = _build(corpus, tmp_path)
    kinds = set(builder.KINDS)
    assert set(manifest["files"]["web/pool.jsonl"]["documents"]) == kinds
    assert set(manifest["files"]["scorer/test.jsonl"]["documents"]) == kinds
    assert set(manifest["files"]["scorer/negative.jsonl"]["documents"]) == kinds - {"clean"}
    assert set(manifest["files"]["clean_test/clean.jsonl"]["documents"]) == {"clean"}


def test_each_kind_is_what_its_maker_makes(corpus, tmp_path):
    _build(corpus, tmp_path)
    by_kind: dict[str, list[str]] = {}
    for record in _texts(tmp_path / "web" / "pool.jsonl"):
        by_kind.setdefault(builder.KINDS[record["kind"]], []).append(record["text"])
    assert all("Â" in t or "â€" in t for t in by_kind["mojibake"])
    assert all(len(t) <= 420 for t in by_kind["truncated"])
    assert all("Posted by admin" in t for t in by_kind["near_duplicate"])
    assert all(len(t.splitlines()) >= 12 for t in by_kind["boilerplate"])  # 10+ nav lines


def test_clean_test_documents_share_no_text_with_training_or_the_scorer(corpus, tmp_path):
    _build(corpus, tmp_path)
    held = {r["text"] for r in _texts(tmp_path / "clean_test" / "clean.jsonl")}
    # every chunk starts with its paragraph's "Section D.P" marker: a source document's id
    sections = {t.split(":")[0] for t in held}
    assert held
    for name in ("web/pool.jsonl", "scorer/positive.jsonl", "scorer/negative.jsonl",
                 "scorer/test.jsonl"):
        for record in _texts(tmp_path / name):
            assert record["text"] not in held
            assert not any(f"{s}:" in record["text"] for s in sections), name


@pytest.fixture(scope="module")
def two_domains(corpus, tmp_path_factory) -> Path:
    """The corpus above plus a smaller domain whose documents are marked ``Legal``."""
    root = tmp_path_factory.mktemp("mixing2")
    (root / "en_docs").symlink_to(corpus / "en_docs")
    rng = random.Random(1)
    (root / "en_small").mkdir()
    lines = [json.dumps({"text": _document(rng, 1000 + n).replace("Section", "Legal")})
             for n in range(80)]
    (root / "en_small" / "small.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_per_domain_builds_each_domain_as_alone_with_one_scorer_sample(two_domains, tmp_path):
    """--per-domain: a pool web_D and a test domain clean_D per source domain, each what a
    build of that domain alone makes; the scorer's samples are theirs, domain after domain."""
    assert builder.main([str(two_domains), str(tmp_path / "joint"), "--per-domain",
                         "--domains", "en_docs", "en_small", "--seed", "3"]) == 0
    joint = json.loads((tmp_path / "joint" / "manifest.json").read_text())
    assert joint["per_domain"] is True
    assert list(joint["files"]) == [
        "web_en_docs/pool.jsonl", "clean_en_docs/clean.jsonl", "web_en_small/pool.jsonl",
        "clean_en_small/clean.jsonl", "scorer/positive.jsonl", "scorer/negative.jsonl",
        "scorer/test.jsonl"]
    alone = {d: builder.build(two_domains, tmp_path / d, domains=[d], seed=3)
             for d in ("en_docs", "en_small")}
    for d in alone:
        for mine, theirs in ((f"web_{d}/pool.jsonl", "web/pool.jsonl"),
                             (f"clean_{d}/clean.jsonl", "clean_test/clean.jsonl")):
            assert (tmp_path / "joint" / mine).read_bytes() == (tmp_path / d / theirs
                                                                ).read_bytes()
    for sample in ("positive", "negative", "test"):
        assert (tmp_path / "joint" / "scorer" / f"{sample}.jsonl").read_bytes() == b"".join(
            (tmp_path / d / "scorer" / f"{sample}.jsonl").read_bytes() for d in alone)
    # each domain's pool and clean test documents hold only its own text, and every kind
    small = _texts(tmp_path / "joint" / "web_en_small" / "pool.jsonl")
    assert small and all("Section" not in r["text"] for r in small)
    assert set(joint["files"]["web_en_small/pool.jsonl"]["documents"]) == set(builder.KINDS)
    assert all("Legal" not in r["text"]
               for r in _texts(tmp_path / "joint" / "clean_en_docs" / "clean.jsonl"))


def test_scorer_docs_caps_each_sample_per_domain_with_per_domain(two_domains, tmp_path):
    """What --scorer-docs's help says: N chunks per sample (the test sample: N clean and N
    junk), from each domain under --per-domain, from all the domains together without it."""
    def sizes(*options: str) -> dict[str, int]:
        out = tmp_path / "-".join(options or ("pooled",))
        assert builder.main([str(two_domains), str(out), "--domains", "en_docs", "en_small",
                             "--scorer-docs", "3", *options]) == 0
        files = json.loads((out / "manifest.json").read_text())["files"]
        return {sample: sum(files[f"scorer/{sample}.jsonl"]["documents"].values())
                for sample in ("positive", "negative", "test")}

    assert sizes() == {"positive": 3, "negative": 3, "test": 6}
    assert sizes("--per-domain") == {"positive": 6, "negative": 6, "test": 12}
