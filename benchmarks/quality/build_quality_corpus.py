"""The quality benchmark's corpus (issue 27, "Evidence"): one domain of the mixing corpus
turned into a crawl-like pool of clean and junk documents, plus the clean documents the
runs are judged on and the samples the fastText scorer is trained and tested on.

    python benchmarks/quality/build_quality_corpus.py /work/mixing-corpus OUT \\
        --domains en_tech_docs --fraction 0.25 --junk-share 0.5 --seed 0

Source documents are cut into chunks of about 1-4K characters at paragraph breaks (web-page
sized), and each *source document* goes, by a seeded hash of its text, to one of three
disjoint parts, so that no two parts share text:

- ``clean_test`` (15%): clean chunks only; the runs' held-out test loss is read on them.
  Never trained on, never shown to the scorer.
- ``scorer`` (15%): chunks for the classifier, split by chunk hash into a positive sample
  (clean), the sources of a negative sample (junk of every kind made from them) and a test
  sample (clean chunks and junk made from them) for its accuracy.
- ``web`` (70%): the training pool. A ``--junk-share`` of its chunks is replaced by junk of a
  kind drawn uniformly from :data:`junk.KINDS` (a near-duplicate copies one of the pool's
  clean chunks instead of its own), the rest stay clean.

Output (``OUT``): ``web/pool.jsonl`` and ``clean_test/clean.jsonl`` (the two domains to
``prepare``; each record has ``text`` and ``kind``, the index in :data:`junk.KINDS`, which
``prepare --quality-field kind`` stores as the ground truth), ``scorer/positive.jsonl``,
``scorer/negative.jsonl``, ``scorer/test.jsonl``, ``tokenizer/`` (copied from ``--tokenizer``)
and ``manifest.json`` (settings, per file its SHA-256, and documents and characters per kind).
Everything is a pure function of the source files and the settings.

With ``--per-domain`` each source domain ``D`` is built on its own, as above, into a pool
``web_D/pool.jsonl`` and a test domain ``clean_D/clean.jsonl`` (junk of ``D`` made from ``D``
only); the scorer's files hold every domain's samples, domain after domain, so that one
classifier scores all the pools (the benchmark of quality and mixture together).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from junk import KINDS, MAKERS

#: chunk sizes in characters: a chunk is emitted once it reaches MIN; a paragraph longer
#: than MAX is cut at line breaks
CHUNK_MIN, CHUNK_MAX, CHUNK_DROP = 1200, 4000, 200
#: shares of the source documents: the clean test part, then the scorer's part
TEST_SHARE, SCORER_SHARE = 0.15, 0.15


def unit(seed: int, *parts: str) -> float:
    """A stable place in [0, 1) for ``parts`` under ``seed``."""
    digest = hashlib.blake2b(":".join([str(seed), *parts]).encode("utf-8"),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def chunks(text: str) -> Iterator[str]:
    """The document cut at paragraph breaks into pieces of CHUNK_MIN to about CHUNK_MAX
    characters (a longer paragraph cut at line breaks); a tail under CHUNK_DROP is dropped."""
    pieces: list[str] = []
    for paragraph in text.split("\n\n"):
        while len(paragraph) > CHUNK_MAX:
            cut = paragraph.rfind("\n", CHUNK_MIN, CHUNK_MAX)
            cut = cut if cut > 0 else CHUNK_MAX
            pieces.append(paragraph[:cut])
            paragraph = paragraph[cut:].lstrip("\n")
        pieces.append(paragraph)
    current = ""
    for piece in pieces:
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= CHUNK_MIN:
            yield current.strip()
            current = ""
    if len(current.strip()) >= CHUNK_DROP:
        yield current.strip()


def read_documents(corpus: Path, domains: list[str], fraction: float, seed: int
                   ) -> list[str]:
    """The texts of the domains' documents kept by ``fraction`` (a hash of the text), in
    file and line order."""
    texts = []
    for domain in domains:
        for path in sorted((corpus / domain).glob("*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    text = json.loads(line)["text"]
                    if unit(seed, "keep", text) < fraction:
                        texts.append(text)
    return texts


def junk(source: str, kind: str, seed: int, key: str, near: list[str] | None = None) -> str:
    """Junk of ``kind`` made from ``source`` (a near-duplicate copies one of ``near``)."""
    rng = random.Random(f"{seed}:{kind}:{key}")
    if kind == "near_duplicate" and near:
        source = near[rng.randrange(len(near))]
    return MAKERS[kind](source, rng)


def split(texts: list[str], seed: int, junk_share: float, scorer_docs: int
          ) -> dict[str, list[dict]]:
    """The source ``texts`` cut into chunks and sent to their parts: ``pool`` (clean chunks
    and junk made from the others), ``clean`` (the clean test chunks) and the scorer's
    ``positive``, ``negative`` and ``test`` samples, each made from at most ``scorer_docs``
    chunks (the test sample holds them clean and as junk: up to twice as many records)."""
    parts: dict[str, list[str]] = {"clean_test": [], "scorer": [], "web": []}
    for text in texts:
        place = unit(seed, "part", text)
        part = ("clean_test" if place < TEST_SHARE else
                "scorer" if place < TEST_SHARE + SCORER_SHARE else "web")
        parts[part].extend(chunks(text))
    junk_kinds = KINDS[1:]

    def kind_of(text: str) -> str:
        return junk_kinds[int(unit(seed, "kind", text) * len(junk_kinds))]

    # the pool: clean chunks and junk made from the others
    pool_clean = [c for c in parts["web"] if unit(seed, "junk", c) >= junk_share]
    pool = [{"text": c, "kind": 0} for c in pool_clean]
    for c in parts["web"]:
        if unit(seed, "junk", c) < junk_share:
            kind = kind_of(c)
            pool.append({"text": junk(c, kind, seed, c, pool_clean),
                         "kind": KINDS.index(kind)})
    pool.sort(key=lambda r: unit(seed, "order", r["text"]))
    # the scorer's samples: thirds of its chunks by hash
    thirds: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for c in parts["scorer"]:
        thirds[int(unit(seed, "scorer", c) * 3)].append(c)
    positive = [{"text": c, "kind": 0} for c in thirds[0][:scorer_docs]]
    negative = []
    for i, c in enumerate(thirds[1][:scorer_docs]):
        kind = junk_kinds[i % len(junk_kinds)]
        negative.append({"text": junk(c, kind, seed, c, thirds[1]), "kind": KINDS.index(kind)})
    test = [{"text": c, "kind": 0} for c in thirds[2][:scorer_docs]]
    for i, c in enumerate(thirds[2][:scorer_docs]):
        kind = junk_kinds[i % len(junk_kinds)]
        test.append({"text": junk(c, kind, seed, c, thirds[2]), "kind": KINDS.index(kind)})
    return {"pool": pool, "clean": [{"text": c, "kind": 0} for c in parts["clean_test"]],
            "positive": positive, "negative": negative, "test": test}


def build(corpus: Path, out: Path, *, domains: list[str], fraction: float = 1.0,
          junk_share: float = 0.5, seed: int = 0, scorer_docs: int = 400,
          tokenizer: Path | None = None, per_domain: bool = False) -> dict:
    """Writes the corpus to ``out``; returns the manifest. With ``per_domain``, each source
    domain ``D`` is split on its own into a pool ``web_D`` and a test domain ``clean_D``
    (junk made from ``D`` only); each scorer sample is made from up to ``scorer_docs``
    chunks of every domain, so that one classifier is trained for all the pools."""
    groups = [[d] for d in domains] if per_domain else [domains]
    files: dict[str, list[dict]] = {}
    scorer: dict[str, list[dict]] = {"positive": [], "negative": [], "test": []}
    for group in groups:
        made = split(read_documents(corpus, group, fraction, seed), seed, junk_share,
                     scorer_docs)
        pool, clean = (f"web_{group[0]}", f"clean_{group[0]}") if per_domain else (
            "web", "clean_test")
        files[f"{pool}/pool.jsonl"] = made["pool"]
        files[f"{clean}/clean.jsonl"] = made["clean"]
        for sample, records in scorer.items():
            records.extend(made[sample])
    files.update({f"scorer/{sample}.jsonl": records for sample, records in scorer.items()})
    manifest: dict = {"source": str(corpus), "domains": domains, "per_domain": per_domain,
                      "fraction": fraction,
                      "junk_share": junk_share, "seed": seed, "scorer_docs": scorer_docs,
                      "chunk_chars": [CHUNK_MIN, CHUNK_MAX], "kinds": list(KINDS), "files": {}}
    for name, records in files.items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True)
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        path.write_text(data, encoding="utf-8")
        documents, chars = Counter(), Counter()
        for r in records:
            documents[KINDS[r["kind"]]] += 1
            chars[KINDS[r["kind"]]] += len(r["text"])
        manifest["files"][name] = {
            "sha256": hashlib.sha256(data.encode("utf-8")).hexdigest(),
            "documents": dict(sorted(documents.items())), "chars": dict(sorted(chars.items()))}
    if tokenizer is not None:
        shutil.copytree(tokenizer, out / "tokenizer", dirs_exist_ok=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path, help="a mixing corpus (one folder per domain)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--domains", nargs="+", default=["en_tech_docs"])
    parser.add_argument("--fraction", type=float, default=1.0,
                        help="share of the source documents used, in (0, 1]")
    parser.add_argument("--junk-share", type=float, default=0.5,
                        help="share of the pool's chunks replaced by junk, in [0, 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorer-docs", type=int, default=400,
                        help="chunks per scorer sample: the positive and the negative "
                             "sample hold at most this many each, the test sample at most "
                             "this many clean and as many junk; with --per-domain, that many "
                             "from each domain (up to this many times the number of "
                             "--domains)")
    parser.add_argument("--per-domain", action="store_true",
                        help="a pool web_D and a test domain clean_D per source domain D "
                             "(the scorer's samples drawn from every domain)")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="tokenizer folder copied to OUT/tokenizer (default: the "
                             "corpus's tokenizer/)")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1 or not 0 <= args.junk_share < 1:
        parser.error("--fraction must be in (0, 1] and --junk-share in [0, 1)")
    tokenizer = args.tokenizer or (args.corpus / "tokenizer")
    manifest = build(args.corpus, args.out, domains=args.domains, fraction=args.fraction,
                     junk_share=args.junk_share, seed=args.seed, scorer_docs=args.scorer_docs,
                     tokenizer=tokenizer if tokenizer.is_dir() else None,
                     per_domain=args.per_domain)
    for name, about in manifest["files"].items():
        print(f"{name}: {about['documents']} documents, "
              f"{sum(about['chars'].values()):,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
