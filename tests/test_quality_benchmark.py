"""benchmarks/quality.py's arithmetic on constructed runs: the clean domain average of the
joint table is taken at token counts every clean domain was measured at, each pool's token
share is read from the run's record, and both tables print the cells they share alike."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks/quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules["quality_benchmark"] = quality
spec.loader.exec_module(quality)


def test_the_domain_average_pairs_points_by_token_count_not_by_place():
    """clean_b has no finite loss at 200 tokens and one more evaluation at 400: its second
    point is the 300-token evaluation, which must not be averaged with clean_a's 200."""
    curves = {"clean_a": [(100.0, 6.0), (200.0, 5.0), (300.0, 4.0)],
              "clean_b": [(100.0, 8.0), (300.0, 6.0), (400.0, 5.5)]}
    assert quality.domain_average(curves, ["clean_a", "clean_b"]) == [(100.0, 7.0),
                                                                      (300.0, 5.0)]


def test_curves_that_share_no_token_count_are_refused_naming_them():
    curves = {"clean_a": [(100.0, 6.0)], "clean_b": [(150.0, 8.0)]}
    with pytest.raises(ValueError, match=r"share no token count.*clean_a at \[100\.0\]; "
                                         r"clean_b at \[150\.0\]"):
        quality.domain_average(curves, ["clean_a", "clean_b"])


def _write_run(out: Path, policy: str, seed: int) -> object:
    """A finished run's monitor files: 100 tokens a step, test losses every 10 steps (clean_b
    not finite at step 20), the pools' token counts every 10 steps."""
    run = quality.mixing.Run("qj", policy, seed, out)
    (run.dir / "tsm").mkdir(parents=True)
    rows = []
    for step, a, b in ((10, 6.0, 8.0), (20, 5.0, None), (30, 4.0, 6.0)):
        rows.append({"step": step, "time": float(step), "tsm/tokens_total": 100.0 * step,
                     "tsm/tokens/web_a": 75.0 * step, "tsm/tokens/web_b": 25.0 * step,
                     "tsm/test_loss/clean_a": a, "tsm/test_loss/clean_b": b,
                     "tsm/test_loss/web_a": 7.0, "tsm/test_loss/web_b": 7.0})
    (run.dir / "tsm" / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    start = {"kind": "session_start", "step": 0, "time": 0.0,
             "domains": ["web_a", "web_b", "clean_a", "clean_b"]}
    (run.dir / "tsm" / "events.jsonl").write_text(json.dumps(start) + "\n", encoding="utf-8")
    (run.dir / "done.json").write_text("{}", encoding="utf-8")
    return run


def test_a_joint_run_is_summarised_at_the_evaluations_of_every_clean_domain(tmp_path):
    summary = quality.summarise_joint(_write_run(tmp_path, "joint-temperature", 1))
    assert summary["curve"] == [(1000.0, 7.0), (3000.0, 5.0)]
    assert (summary["tokens"], summary["clean"]) == (3000.0, 5.0)
    assert summary["per_domain"] == {"clean_a": 4.0, "clean_b": 6.0}
    assert (summary["worst"], summary["worst_domain"]) == (6.0, "clean_b")
    assert summary["pool_shares"] == {"web_a": 0.75, "web_b": 0.25}


def test_both_tables_print_the_cells_they_share_alike():
    runs = [{"policy": policy, "seed": seed, "done": True, "tokens": 3000.0, "clean": clean,
             "curve": [(1000.0, clean + 1.0), (3000.0, clean)], "pool": 7.0, "worst": clean,
             "worst_domain": "clean_a", "pool_shares": {"web_a": 0.5, "web_b": 0.5}}
            for policy, base in (("uniform", 5.0), ("joint-temperature", 5.0),
                                 ("curriculum", 4.9), ("joint-temperature-curriculum", 4.9))
            for seed, clean in ((1, base), (2, base + 0.2))]
    single = quality.table(runs).splitlines()
    joint = quality.joint_table(runs).splitlines()
    [row] = [r for r in single if r.startswith("| curriculum |")]
    [joint_row] = [r for r in joint if r.startswith("| temperature:2 × curriculum |")]
    shared = "| 1,2 | 5.000 ± 0.141 | -0.100 (-0.100, -0.100) | "
    assert shared in row and shared in joint_row
    assert row.endswith("| - | - | - | 7.000 ± 0.000 |")
    assert joint_row.endswith("| 5.000 ± 0.141 (clean_a) | 50% ± 0% / 50% ± 0% |")
