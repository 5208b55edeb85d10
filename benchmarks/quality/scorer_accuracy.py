"""How well the fastText scorer separates clean from junk documents it was not trained on:
accuracy per kind on ``scorer/test.jsonl`` (log-odds > 0 counts as clean), the same on the
training pool as stored (``fasttext_hq`` against the ground-truth ``quality`` column), and
which kinds a DCLM-style floor keeps (the pool's top share by score).

    python benchmarks/quality/scorer_accuracy.py CORPUS_DIR STORE [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from junk import KINDS

#: the top shares of the pool by score shown (DCLM keeps about 10%)
TOP = (0.1, 0.2, 0.3)


def by_kind(kinds: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """Per kind: documents and the share classified right (clean above 0, junk below)."""
    rows = {}
    for k, name in enumerate(KINDS):
        mine = scores[kinds == k]
        if len(mine):
            right = mine > 0 if k == 0 else mine <= 0
            rows[name] = {"documents": len(mine), "accuracy": float(right.mean()),
                          "median_score": float(np.median(mine))}
    junk = kinds != 0
    rows["all"] = {"documents": len(kinds),
                   "accuracy": float(((scores > 0) == ~junk).mean()),
                   "balanced_accuracy": float(np.mean([(scores[~junk] > 0).mean(),
                                                       (scores[junk] <= 0).mean()]))}
    return rows


def kept_by_floor(kinds: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, float]]:
    """For each top share of the pool by score: the share of clean documents in it and of
    the pool's clean documents it keeps."""
    out = {}
    for share in TOP:
        cut = np.quantile(scores, 1 - share, method="lower")
        kept = scores >= cut
        out[f"top{round(share * 100)}"] = {
            "documents": int(kept.sum()), "clean_share": float((kinds[kept] == 0).mean()),
            "clean_kept": float(kept[kinds == 0].mean())}
    return out


def measure(corpus: Path, store: str) -> dict:
    from lightning_aquila.datamodules.store import ShardStore, document_scores
    from lightning_aquila.scoring.classifier import load_classifier, log_odds

    model = load_classifier(str(corpus / "fasttext_hq.bin"))
    records = [json.loads(line) for line in
               (corpus / "scorer" / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    test = by_kind(np.array([r["kind"] for r in records]),
                   log_odds(model, [r["text"] for r in records], "__label__hq"))
    opened = ShardStore(store)
    pools = [d for d in opened.domains if d.startswith("web")]  # web, or web_D per domain
    kinds = np.concatenate([document_scores(opened, d, "quality", s)[1]
                            for d in pools for s in ("train", "heldout")]).astype(int)
    scores = np.concatenate([document_scores(opened, d, "fasttext_hq", s)[1]
                             for d in pools for s in ("train", "heldout")])
    return {"scorer_test": test, "pool": by_kind(kinds, scores),
            "pool_floor": kept_by_floor(kinds, scores)}


def markdown(result: dict) -> str:
    """The accuracy table of docs/benchmarks.md."""
    names = [k for k in (*KINDS, "all") if k in result["scorer_test"]]
    lines = ["| documents | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for part, label in (("scorer_test", "scorer test sample"), ("pool", "training pool")):
        cells = [f"{result[part][n]['accuracy']:.1%} ({result[part][n]['documents']})"
                 if n in result[part] else "-" for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    floor = "; ".join(f"top {k[3:]}%: {v['clean_share']:.0%} clean, keeps "
                      f"{v['clean_kept']:.0%} of the clean documents"
                      for k, v in result["pool_floor"].items())
    return "\n".join(lines) + f"\n\nThe pool by score: {floor}."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("corpus", type=Path)
    parser.add_argument("store")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    result = measure(args.corpus, args.store)
    print(markdown(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
