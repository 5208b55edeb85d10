"""A smaller cut of a mixing corpus: the same domains, each keeping the documents whose hash
falls below ``--fraction``, so every domain shrinks in proportion (the benchmark's
multi-epoch settings train several passes over a cut instead of over the whole corpus).

    python benchmarks/mixing/cut_corpus.py CORPUS_DIR OUT_DIR --fraction 0.15

``CORPUS_DIR`` has one folder of ``*.jsonl`` per domain and ``tokenizer/`` (the layout of
``build_corpus.py``'s output); ``OUT_DIR`` gets the same layout, the tokenizer copied. A
document is one jsonl line; which ones are kept depends on their text alone, so the cut is
the same on every machine.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path


def kept(line: str, fraction: float) -> bool:
    digest = hashlib.blake2b(line.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < fraction


def cut(corpus: Path, out: Path, fraction: float) -> dict[str, tuple[int, int]]:
    """Writes the cut; returns (documents kept, documents) per domain."""
    counts = {}
    for folder in sorted(p for p in corpus.iterdir() if p.is_dir()):
        if folder.name == "tokenizer":
            shutil.copytree(folder, out / "tokenizer", dirs_exist_ok=True)
            continue
        total = taken = 0
        (out / folder.name).mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.glob("*.jsonl")):
            lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
            chosen = [line for line in lines if line.strip() and kept(line, fraction)]
            total += sum(1 for line in lines if line.strip())
            taken += len(chosen)
            if chosen:
                (out / folder.name / source.name).write_text("".join(chosen), encoding="utf-8")
        counts[folder.name] = (taken, total)
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--fraction", type=float, required=True,
                        help="share of each domain's documents to keep, in (0, 1]")
    args = parser.parse_args(argv)
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1], got {args.fraction}")
    for domain, (taken, total) in cut(args.corpus, args.out, args.fraction).items():
        print(f"{domain}: {taken:,} of {total:,} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
