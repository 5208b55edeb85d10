"""The quality benchmark (issue 27, "Evidence"): at equal tokens, does drawing documents by
their fastText score reach uniform sampling's clean held-out loss with fewer tokens, and how
much of the pool does it still see? Runs the sampling settings of ``configs/benchmarks/
quality/<policy>.yaml`` for several seeds through ``lightning-aquila fit`` with the mixing
benchmark's machinery (``benchmarks/mixing.py``: settings, waves, slots, geometry, paired
seeds), on a store made by ``benchmarks/quality/build_quality_corpus.py`` and
``prepare_store.sh``, then prints the table of ``docs/benchmarks.md`` ("Quality").

Usage::

    python benchmarks/quality.py run --out runs/quality --gpus cpu cpu \\
        --overlay configs/benchmarks/quality/cpu-small.yaml --evaluations 12 \\
        --settings q-1ep=/tmp/quality.zarr:1 \\
        --wave "uniform filter-top20 tau-1 tau-2 curriculum:1,2,3"
    python benchmarks/quality.py table --out runs/quality --json results.json

On a store built with ``build_quality_corpus.py --per-domain`` (pools ``web_D``, clean test
domains ``clean_D``) the ``joint-*`` policies put quality and mixture together (a fixed or
an adaptive mixture, uniform documents or the τ curriculum); their table is the domain
average of the clean test losses, its worst domain and the paired difference against
``joint-temperature`` (fixed mixture, uniform documents).

Metrics, per run: the loss on the test part of ``clean_test`` (clean documents no run
trained on and the scorer never saw), its curve against tokens, the tokens at which it first
reaches the uniform run's final loss of the same seed (the saving is one minus their ratio
to uniform's tokens), and, from a replay of the run's sampler (``quality/diversity.py``), the
share of the pool's documents (and of its clean ones) drawn at least once and the share of
drawn tokens that were junk. The settings are the files' as committed; nothing is tuned per
seed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "quality"))
_spec = importlib.util.spec_from_file_location("mixing_benchmark", ROOT / "mixing.py")
mixing = importlib.util.module_from_spec(_spec)
sys.modules["mixing_benchmark"] = mixing  # its dataclasses look their module up
_spec.loader.exec_module(mixing)

from diversity import coverage, drawn_windows  # noqa: E402

CONFIGS = ROOT.parent / "configs" / "benchmarks" / "quality"
#: quality and mixture together, on a --per-domain corpus: the baseline first
JOINT = ("joint-temperature", "joint-temperature-curriculum", "joint-effective-data",
         "joint-effective-data-curriculum")
POLICIES = ("uniform", "filter-top20", "tau-0.5", "tau-1", "tau-2", "curriculum", *JOINT)
BASELINE = "uniform"
#: the domain trained on and the one judged on
POOL, CLEAN = "web", "clean_test"
#: the issue's goal: uniform's final clean loss with this share of tokens fewer
GOAL_SAVING = 1 / 3

# The mixing benchmark's driver, pointed at this benchmark's configs.
mixing.CONFIGS = CONFIGS
mixing.POLICIES = POLICIES
mixing.NOT_POLICIES = ("base", "cpu-small")
_policy_config = mixing.policy_config


def policy_config(run: Any, geometry: Any, reference_seed: int,
                  checkpoint_every: int | None = None) -> Path:
    """The mixing driver's policy file, with ``${half_steps}`` (a curriculum's stage end)."""
    path = _policy_config(run, geometry, reference_seed, checkpoint_every)
    path.write_text(path.read_text(encoding="utf-8").replace(
        "${half_steps}", str(geometry.max_steps // 2)), encoding="utf-8")
    return path


mixing.policy_config = policy_config


# -- reading the runs --------------------------------------------------------------------------
def data_args(run: Any, setting: dict[str, Any], overlay: Path | None) -> dict[str, Any]:
    """The run's datamodule arguments as ``fit`` received them: base, overlay, policy file,
    then the driver's store and seed."""
    args: dict[str, Any] = {}
    for path in [CONFIGS / "base.yaml", *([overlay] if overlay else []), run.dir / "policy.yaml"]:
        args.update(((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {})
                    .get("init_args") or {})
    return args | {"store": setting["store"], "seed": run.seed}


def temperature_changes(record: Any) -> list[tuple[int, Any]]:
    return [(int(e["batch_index"]), e["quality_temperature"])
            for e in record.of_kind("quality_temperature") if e.get("batch_index") is not None]


def summarise(run: Any, setting: dict[str, Any], overlay: Path | None) -> dict[str, Any] | None:
    """The run's clean test curve and final loss, the pool's (junk included) final loss and
    its diversity figures (cached in the run's folder: the replay takes a while)."""
    from lightning_aquila.tracking.compare import held_out_curves
    from lightning_aquila.tracking.run_record import load_run

    if not run.metrics.is_file():
        return None
    record = load_run(run.dir)
    curves = held_out_curves(record, "test")
    if not curves.get(CLEAN):
        return None
    cached = run.dir / "diversity.json"
    if run.done and cached.is_file():
        seen = json.loads(cached.read_text())
    elif run.done:
        args = data_args(run, setting, overlay)
        counts = drawn_windows(args, setting["max_steps"], POOL, temperature_changes(record))
        seen = coverage(setting["store"], POOL, counts, int(args["seq_len"]))
        cached.write_text(json.dumps(seen), encoding="utf-8")
    else:
        seen = {}
    return {"policy": run.policy, "seed": run.seed, "done": run.done,
            "tokens": curves[CLEAN][-1][0], "clean": curves[CLEAN][-1][1],
            "pool": curves[POOL][-1][1] if curves.get(POOL) else math.nan,
            "curve": curves[CLEAN], **seen}


def is_joint(setting: dict[str, Any]) -> bool:
    """A --per-domain corpus: pools web_D and clean test domains clean_D."""
    return POOL not in setting["shares"]


def summarise_joint(run: Any) -> dict[str, Any] | None:
    """The clean test loss per domain clean_D at the run's last evaluation of all of them,
    their plain average (every domain alike) and worst, the average's curve, and the share of
    training tokens of each pool."""
    from lightning_aquila.tracking.compare import held_out_curves
    from lightning_aquila.tracking.run_record import load_run

    if not run.metrics.is_file():
        return None
    record = load_run(run.dir)
    curves = held_out_curves(record, "test")
    cleans = sorted(d for d in curves if d.startswith("clean_"))
    if not cleans or not all(curves[d] for d in cleans):
        return None
    curve = domain_average(curves, cleans)
    tokens = curve[-1][0]
    final = {d: dict(curves[d])[tokens] for d in cleans}
    return {"policy": run.policy, "seed": run.seed, "done": run.done, "tokens": tokens,
            "clean": curve[-1][1], "worst": max(final.values()),
            "worst_domain": max(final, key=final.get), "per_domain": final, "curve": curve,
            "pool_shares": pool_shares(record)}


def domain_average(curves: Mapping[str, Sequence[tuple[float, float]]],
                   domains: Sequence[str]) -> list[tuple[float, float]]:
    """The plain mean of the ``(tokens, loss)`` curves of ``domains`` at each token count where
    every one of them has a point. A domain's curve has a gap where its loss was not finite,
    so curves can differ in length and in their token counts: their n-th points need not be
    the same evaluation. Refuses curves that share no token count."""
    points = [dict(curves[d]) for d in domains]
    shared = sorted(set(points[0]).intersection(*points[1:]))
    if not shared:
        raise ValueError(f"the clean test curves of {list(domains)} share no token count "
                         "(no evaluation measured every domain), so they have no average: "
                         + "; ".join(f"{d} at {sorted(p)}" for d, p in zip(domains, points)))
    return [(tokens, statistics.fmean(p[tokens] for p in points)) for tokens in shared]


def pool_shares(record: Any) -> dict[str, float]:
    """Each pool's share of the training tokens at the end (the monitor's count), from the
    run's record as ``load_run`` read it."""
    last = {d: record.last(f"tsm/tokens/{d}") for d in record.names("tsm/tokens/")
            if d.startswith(POOL)}
    total = sum(last.values())
    return {d: n / total for d, n in sorted(last.items())} if total else {}


def joint_table(summaries: list[dict[str, Any]]) -> str:
    """The markdown table of quality and mixture together: per cell over its finished seeds,
    paired with the fixed mixture and uniform documents."""
    cells = {JOINT[0]: "temperature:2 × uniform", JOINT[1]: "temperature:2 × curriculum",
             JOINT[2]: "effective-data × uniform", JOINT[3]: "effective-data × curriculum"}
    pools = sorted({d for s in summaries if s["done"] for d in s["pool_shares"]})

    def more(mine: list[dict[str, Any]]) -> list[str]:
        worst = sorted({s["worst_domain"] for s in mine})
        shares = " / ".join(_mean([s["pool_shares"].get(d, 0.0) for s in mine], percent=True)
                            for d in pools)
        return [f"{_mean([s['worst'] for s in mine])} ({', '.join(worst)})", shares]

    return "\n".join([
        "| mixture × documents | seeds | clean domain average | paired Δ vs "
        "temperature:2 × uniform (per seed) | tokens to its final: saving (per seed) | "
        f"worst domain | token shares ({' / '.join(pools)}) |",
        "|---|---|---:|---|---|---:|---|",
        *policy_rows(summaries, JOINT, JOINT[0], more, cells)])


def gather(out: Path, name: str, overlay: Path | None) -> list[dict[str, Any]]:
    folder = out / name
    setting = json.loads((folder / "setting.json").read_text())
    found = []
    for path in sorted(folder.glob("*-s*")):
        policy, _, seed = path.name.rpartition("-s")
        if policy in POLICIES and seed.isdigit():
            run = mixing.Run(name, policy, int(seed), out)
            summary = (summarise_joint(run) if is_joint(setting) else
                       summarise(run, setting, overlay))
            if summary is not None:
                found.append(summary)
    return found


def compare(summary: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    hit = mixing.tokens_to_reach(summary["curve"], base["clean"])
    return {"delta": summary["clean"] - base["clean"],
            "saving": None if hit is None else 1.0 - hit / base["tokens"]}


def paired_cells(pairs: list[dict[str, Any]], baseline: bool) -> tuple[str, str]:
    """The table's paired difference and saving cells: their means, then per seed."""
    if baseline or not pairs:
        return "-", "-"
    delta = (f"{statistics.fmean(c['delta'] for c in pairs):+.3f} ("
             + ", ".join(f"{c['delta']:+.3f}" for c in pairs) + ")")
    savings = [c["saving"] for c in pairs]
    reached = [v for v in savings if v is not None]
    saving = (f"{statistics.fmean(reached):+.0%} in {len(reached)}/{len(pairs)} seeds ("
              + ", ".join("never" if v is None else f"{v:+.0%}" for v in savings) + ")"
              if reached else f"never (0/{len(pairs)})")
    return delta, saving


def _mean(values: Sequence[float], digits: int = 3, percent: bool = False) -> str:
    if not values:
        return "-"
    form = (lambda v: f"{v:.0%}") if percent else (lambda v: f"{v:.{digits}f}")
    mean = statistics.fmean(values)
    spread = f" ± {form(statistics.stdev(values))}" if len(values) > 1 else ""
    return form(mean) + spread


def policy_rows(summaries: list[dict[str, Any]], policies: Sequence[str], baseline: str,
                more: Callable[[list[dict[str, Any]]], list[str]],
                names: Mapping[str, str] | None = None) -> list[str]:
    """The rows both tables share, one per policy of ``policies`` with finished runs, in
    that order: its name (``names`` may rename it), seeds, mean clean loss, and the paired
    difference and saving against ``baseline``'s run of the same seed; then the cells
    ``more`` makes of its finished runs (sorted by seed)."""
    runs = [s for s in summaries if s["done"]]
    base = {s["seed"]: s for s in runs if s["policy"] == baseline}
    rows = []
    for policy in [p for p in policies if any(s["policy"] == p for s in runs)]:
        mine = sorted((s for s in runs if s["policy"] == policy), key=lambda s: s["seed"])
        pairs = [compare(s, base[s["seed"]]) for s in mine if s["seed"] in base]
        delta, saving = paired_cells(pairs, policy == baseline)
        cells = [(names or {}).get(policy, policy), ",".join(str(s["seed"]) for s in mine),
                 _mean([s["clean"] for s in mine]), delta, saving, *more(mine)]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def table(summaries: list[dict[str, Any]]) -> str:
    """The markdown table: per policy over its finished seeds, paired with uniform."""
    def more(mine: list[dict[str, Any]]) -> list[str]:
        replayed = [s for s in mine if "documents_seen" in s]  # the diversity replay's figures
        return [*(_mean([s[key] for s in replayed], percent=True) for key in
                  ("documents_seen", "clean_documents_seen", "junk_token_share")),
                _mean([s["pool"] for s in mine])]

    return "\n".join([
        "| policy | seeds | clean test loss | paired Δ vs uniform (per seed) | tokens to "
        "uniform's final: saving (per seed) | pool docs seen | clean docs seen | junk "
        "share of tokens | pool loss (junk incl.) |",
        "|---|---|---:|---|---|---:|---:|---:|---:|",
        *policy_rows(summaries, POLICIES, BASELINE, more)])


def verdict(summaries: list[dict[str, Any]]) -> str:
    """The issue's goal: the best quality-aware policy (by mean saving, then by the paired
    difference) reaches uniform's final clean loss with at least a third fewer tokens, in
    every seed."""
    runs = [s for s in summaries if s["done"]]
    base = {s["seed"]: s for s in runs if s["policy"] == BASELINE}
    best, best_key, best_savings = None, (-math.inf, -math.inf), []
    for policy in POLICIES[1:]:
        pairs = [compare(s, base[s["seed"]]) for s in runs
                 if s["policy"] == policy and s["seed"] in base]
        if not pairs:
            continue
        savings = [c["saving"] for c in pairs]
        # by mean saving (never reaching counts as -100%), then by the paired difference
        key = (statistics.fmean(-1.0 if v is None else v for v in savings),
               -statistics.fmean(c["delta"] for c in pairs))
        if key > best_key:
            best, best_key, best_savings = policy, key, savings
    if best is None:
        return "no quality-aware run paired with a uniform run yet"
    met = all(v is not None and v >= GOAL_SAVING for v in best_savings)
    shown = ", ".join("never" if v is None else f"{v:+.0%}" for v in best_savings)
    return (f"best quality-aware policy: {best} (paired Δ {-best_key[1]:+.3f}), tokens saved "
            f"to reach uniform's final clean loss per seed: {shown} -> goal (>= 33% in every "
            f"seed) {'MET' if met else 'MISSED'}")


def report(out: Path, names: Sequence[str], overlay: Path | None) -> dict[str, Any]:
    everything = {}
    for name in names:
        about = json.loads((out / name / "setting.json").read_text())
        summaries = gather(out, name, overlay)
        everything[name] = {"setting": about, "runs": summaries}
        print(f"### {name}: {about['store']}, {about['epochs']} epochs = "
              f"{about['max_steps'] * about['tokens_per_step'] / 1e6:.2f}M tokens "
              f"({about['max_steps']} steps)\n")
        if is_joint(about):
            print(joint_table(summaries), "\n", flush=True)
            continue
        print(table(summaries), "\n")
        print(verdict(summaries), "\n", flush=True)
    return everything


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("command", choices=["run", "table"])
    parser.add_argument("--settings", nargs="+", default=[], metavar="NAME=STORE:EPOCHS")
    parser.add_argument("--wave", action="append", default=[], metavar="'POLICIES:SEEDS'")
    parser.add_argument("--out", type=Path, default=Path("runs/quality"))
    parser.add_argument("--gpus", nargs="+", default=["0"],
                        help="a slot per entry: CUDA device indices (repeat to share), or cpu")
    parser.add_argument("--evaluations", type=int, default=20)
    parser.add_argument("--overlay", type=Path, default=None,
                        help="a config after base.yaml for every run (cpu-small.yaml on CPU)")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from now after which no run starts that would not end")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[])
    args = parser.parse_args(argv)
    if args.command == "run":
        settings = [mixing.Setting.parse(t) for t in args.settings]
        if not settings or not args.wave:
            parser.error("run needs --settings and at least one --wave")
        geometry = {s.name: mixing.describe(s, args.out, args.overlay, args.evaluations)
                    for s in settings}
        runs = mixing.plan(settings, [mixing.parse_wave(w) for w in args.wave], args.out)
        deadline = time.time() + args.deadline if args.deadline else math.inf
        left = mixing.Scheduler(runs, args.gpus, {s.name: s for s in settings}, geometry,
                                args.overlay, list(args.fit_args), deadline=deadline,
                                evaluations=args.evaluations).run_all()
        if left:
            print(f"not run: {', '.join(f'{r.setting}/{r.name}' for r in left)}", flush=True)
        names = [s.name for s in settings]
    else:
        names = mixing.table_settings(args.out, args.settings)
    everything = report(args.out, names, args.overlay)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
