"""The HeuriMentor efficacy benchmark: does an adaptive mixture beat a fixed one for the same
tokens? Runs every mixture policy of ``configs/benchmarks/mixing/`` for several seeds through
``lightning-aquila fit`` (one run per GPU, side by side), then reads each run's TSM files and
prints the table of ``docs/benchmarks.md`` ("Mixing").

Each run is ``fit --config base.yaml --config <policy>.yaml`` with the seed given to both
``seed_everything`` (model initialisation) and the datamodule (data order), so the runs of one
seed differ only in their mixture policy. DoReMi needs a reference run: as in DoReMi it is
trained on a baseline mixture, by default ``uniform`` with seed 0 (a seed no table row uses),
and its ``tsm/metrics.jsonl`` is written into ``doremi.yaml`` where ``${reference}`` stands.
A policy file may name another baseline, ``${reference:natural}``: DoReMi's own experiments
trained the reference on The Pile's default weights, not on uniform ones.

Usage::

    python benchmarks/mixing.py run --store runs/mixing/corpus.zarr --out runs/mixing \\
        --policies natural uniform doremi bandit aioli --seeds 1 2 3 4 5 --gpus 0 1 2 3
    python benchmarks/mixing.py table --out runs/mixing --store runs/mixing/corpus.zarr
    python benchmarks/mixing.py select --out runs/mixing --policies doremi aioli --seeds 1 2
                                      # prints the candidate to confirm on fresh seeds
    python benchmarks/mixing.py run --toy --store STORE --out DIR --policies uniform aioli \\
        --seeds 1 --gpus cpu          # the CI test: tiny model, bundled corpus, CPU

Metrics, per run, from the last held-out evaluation: the mean of the domains' held-out losses
("domain average"), the worst domain's, and the token-weighted one (each domain's loss
weighted by its share of the corpus's training tokens, i.e. the loss on text drawn as the
corpus is). "Tokens to target" is when a run's domain average first reaches the final
domain average of the best static policy (natural or uniform, whichever is lower on average
over the seeds) of the same seed, interpolated linearly between evaluations.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "benchmarks" / "mixing"
#: The table's order; any other ``configs/benchmarks/mixing/<name>.yaml`` (a variant such as
#: ``aioli-eta10``) is a policy too and follows these.
POLICIES = ("natural", "uniform", "doremi", "bandit", "aioli")
STATIC = ("natural", "uniform")
NOT_POLICIES = ("base", "cpu-toy")
REFERENCE = ("uniform", 0)  # DoReMi's reference run: (policy, seed)
#: where a policy file wants a reference run's metrics: ``${reference}`` (the uniform run) or
#: ``${reference:POLICY}`` (that policy's run)
REFERENCE_SLOT = re.compile(r"\$\{reference(?::([A-Za-z0-9_-]+))?\}")
#: --toy: the policies' warm-up shortened to fit the toy run's 50 steps
TOY_POLICY_ARGS = {"warmup_steps": 25}


@dataclass
class Run:
    policy: str
    seed: int
    out: Path

    @property
    def name(self) -> str:
        return "reference" if (self.policy, self.seed) == REFERENCE else (
            f"{self.policy}-s{self.seed}")

    @property
    def dir(self) -> Path:
        return self.out / self.name

    @property
    def metrics(self) -> Path:
        return self.dir / "tsm" / "metrics.jsonl"

    @property
    def done(self) -> bool:
        return (self.dir / "done.json").is_file()

    @property
    def last_checkpoint(self) -> Path:
        return self.dir / "checkpoints" / "last.ckpt"

    @property
    def seconds_so_far(self) -> float:
        """Wall seconds of earlier sittings of a resumed run."""
        path = self.dir / "sittings.json"
        return sum(json.loads(path.read_text())) if path.is_file() else 0.0

    def add_sitting(self, seconds: float) -> None:
        path = self.dir / "sittings.json"
        done = json.loads(path.read_text()) if path.is_file() else []
        path.write_text(json.dumps([*done, seconds]), encoding="utf-8")


# -- running -----------------------------------------------------------------------------------
@functools.cache  # the scheduler asks for every waiting run each time it polls
def reference_policy(policy: str) -> str | None:
    """The policy whose run ``policy``'s file reads as its reference, or ``None`` if it needs
    none."""
    found = {m.group(1) or REFERENCE[0] for m in REFERENCE_SLOT.finditer(
        (CONFIGS / f"{policy}.yaml").read_text(encoding="utf-8"))}
    if len(found) > 1:
        raise SystemExit(f"{policy}.yaml names several reference runs: {sorted(found)}")
    return found.pop() if found else None


def policy_config(run: Run, references: dict[str, Path], toy: bool,
                  checkpoint_every: int | None = None) -> Path:
    """The run's policy file: ``${reference}`` filled in with the metrics file of the
    reference run (``references``: policy -> its ``metrics.jsonl``), at toy scale the warm-ups
    cut, and
    with ``checkpoint_every`` a ``ModelCheckpoint`` (``last.ckpt`` every that many steps) added
    to its callbacks, so that a run longer than one sitting can be resumed."""
    text = (CONFIGS / f"{run.policy}.yaml").read_text(encoding="utf-8")
    text = REFERENCE_SLOT.sub(
        lambda m: str(references[m.group(1) or REFERENCE[0]].resolve()), text)
    if toy:
        for key, value in TOY_POLICY_ARGS.items():
            text = "\n".join(
                line[: line.index(key)] + f"{key}: {value}" if line.strip().startswith(
                    f"{key}:") else line for line in text.splitlines()) + "\n"
    if checkpoint_every:
        import yaml

        config = yaml.safe_load(text)
        trainer = config.setdefault("trainer", {})
        trainer["enable_checkpointing"] = True
        trainer.setdefault("callbacks", []).append({
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_train_steps": checkpoint_every, "save_last": True,
                          "save_top_k": 0}})
        text = yaml.safe_dump(config, sort_keys=False)
    path = run.dir / "policy.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def fit_command(run: Run, store: str, references: dict[str, Path], toy: bool,
                extra: Sequence[str], checkpoint_every: int | None = None) -> list[str]:
    """``fit`` for the run; with ``checkpoint_every``, resuming its ``last.ckpt`` if an earlier
    sitting left one (the sampler, mixture history and TSM/ATE state resume with it)."""
    configs = [CONFIGS / "base.yaml", *([CONFIGS / "cpu-toy.yaml"] if toy else []),
               policy_config(run, references, toy, checkpoint_every)]
    resume = []
    if checkpoint_every:  # an earlier sitting's files may be there, with or without last.ckpt
        resume = ["--reuse_run_dir", "true"]
        if run.last_checkpoint.is_file():
            resume += ["--ckpt_path", "last"]
    return [sys.executable, "-m", "lightning_aquila.cli", "fit",
            *[a for c in configs for a in ("--config", str(c))],
            "--seed_everything", str(run.seed), "--data.init_args.seed", str(run.seed),
            "--data.init_args.store", store,
            "--trainer.default_root_dir", str(run.dir), *resume, *extra]


@dataclass
class Slot:
    device: str  # a CUDA device index, or "cpu"
    process: subprocess.Popen | None = None
    run: Run | None = None
    started: float = 0.0
    log: Any = None


@dataclass
class Scheduler:
    """Runs ``fit`` for each run, one per device at a time, the DoReMi runs once their
    reference run is done. Without checkpoints it stops starting runs when the next one would
    not end before ``deadline``; with ``checkpoint_every`` it starts them anyway and stops
    every run still going at the deadline, to be resumed from its ``last.ckpt`` by the next
    sitting (for runs longer than one sitting: a GPU lent 10 minutes a command)."""

    runs: list[Run]
    devices: list[str]
    store: str
    toy: bool
    extra: list[str]
    deadline: float = math.inf
    checkpoint_every: int | None = None
    durations: list[float] = field(default_factory=list)

    def ready(self, run: Run, references: dict[str, Run]) -> bool:
        wanted = reference_policy(run.policy)
        return wanted is None or references[wanted].done

    def launch(self, slot: Slot, run: Run, references: dict[str, Run]) -> None:
        command = fit_command(run, self.store, {p: r.metrics for p, r in references.items()},
                              self.toy, self.extra, self.checkpoint_every)
        env = dict(os.environ)
        if slot.device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = slot.device
        run.dir.mkdir(parents=True, exist_ok=True)
        slot.log = open(run.dir / "fit.log", "a", encoding="utf-8")  # noqa: SIM115
        slot.process = subprocess.Popen(command, stdout=slot.log, stderr=subprocess.STDOUT,
                                        env=env, cwd=ROOT)
        slot.run, slot.started = run, time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {run.name} on {slot.device}", flush=True)

    def finish(self, slot: Slot, stopped: bool = False) -> None:
        code = slot.process.wait()
        slot.log.close()
        took = time.time() - slot.started
        run = slot.run
        if stopped:  # Lightning exits 0 on SIGTERM too: a stopped run is never "done"
            run.add_sitting(took)
            status = "stopped at the deadline (resumes from last.ckpt next time)"
        elif code == 0:
            self.durations.append(took)
            total = run.seconds_so_far + took
            (run.dir / "done.json").write_text(json.dumps({"seconds": total}), encoding="utf-8")
            status = "done"
        else:
            status = f"FAILED (exit {code}, see {run.dir / 'fit.log'})"
        print(f"[{time.strftime('%H:%M:%S')}] {run.name} {status} after {took:.0f} s",
              flush=True)
        slot.process, slot.run = None, None

    def stop_all(self, slots: list[Slot]) -> None:
        """At the deadline: stop the runs still going (their last checkpoint stays)."""
        for slot in slots:
            if slot.process is not None:
                slot.process.terminate()
        for slot in slots:
            if slot.process is not None:
                try:
                    slot.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    slot.process.kill()
                self.finish(slot, stopped=True)

    def run_all(self, references: dict[str, Run]) -> list[Run]:
        """Run what is not done yet (``references``: the reference run of each policy that
        DoReMi-style runs read); returns the runs left unrun."""
        todo = [r for r in self.runs if not r.done]
        slots = [Slot(d) for d in self.devices]
        while todo or any(s.process for s in slots):
            for slot in slots:
                if slot.process is not None and slot.process.poll() is not None:
                    self.finish(slot)
            if self.checkpoint_every and time.time() > self.deadline:
                self.stop_all(slots)
                break
            expected = 0.0 if self.checkpoint_every else (
                max(self.durations) if self.durations else 0.0)
            for slot in slots:
                if slot.process is not None:
                    continue
                busy = {s.run.name for s in slots if s.run is not None}
                runnable = [r for r in todo if self.ready(r, references) and r.name not in busy]
                if not runnable:
                    continue
                if time.time() + expected > self.deadline:
                    todo = []
                    break
                run = runnable[0]
                todo.remove(run)
                self.launch(slot, run, references)
            if not todo and not any(s.process for s in slots):
                break
            if not any(s.process for s in slots) and todo:
                blocked = ", ".join(r.name for r in todo)
                print(f"cannot run {blocked}: the reference run failed", flush=True)
                break
            time.sleep(0.5)
        return [r for r in self.runs if not r.done]


def known_policies() -> list[str]:
    found = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in NOT_POLICIES)
    return [p for p in POLICIES if p in found] + [p for p in found if p not in POLICIES]


def plan(policies: Sequence[str], seeds: Sequence[int], out: Path,
         reference_seed: int = REFERENCE[1]) -> tuple[list[Run], dict[str, Run]]:
    """The runs in the order they start, and the reference run of each baseline policy that a
    DoReMi-style policy reads (``{"uniform": Run}`` for ``doremi``). Reference runs start
    first, then seed by seed so that an interrupted benchmark still has whole seeds. With
    ``reference_seed`` one of ``seeds`` that seed's own baseline run is the reference (one run
    fewer, for budgets too small for a run no table row uses)."""
    unknown = [p for p in policies if p not in known_policies()]
    if unknown:
        raise SystemExit(f"unknown policy(ies) {unknown}; known (configs/benchmarks/mixing): "
                         f"{known_policies()}")
    if reference_seed == REFERENCE[1] and REFERENCE[1] in seeds:
        raise SystemExit(f"seed {REFERENCE[1]} is the DoReMi reference run's; use others")
    wanted = sorted({w for p in policies if (w := reference_policy(p)) is not None})
    bad = [w for w in wanted if w not in known_policies() or reference_policy(w) is not None]
    if bad:
        raise SystemExit(f"reference run(s) of unknown or adaptive policy(ies) {bad}: a "
                         "reference is trained on a fixed baseline mixture")
    references = {w: Run(w, reference_seed, out) for w in wanted}
    first = {r.name for r in references.values()}
    rest = [Run(p, s, out) for s in seeds for p in policies]
    return [*references.values(), *[r for r in rest if r.name not in first]], references


# -- reading the runs --------------------------------------------------------------------------
def summarise(run: Run, shares: dict[str, float]) -> dict[str, Any] | None:
    """The run's last held-out evaluation, and its domain-average curve against tokens (read
    through the report's own loaders, as ``report --compare`` draws them)."""
    from lightning_aquila.report_compare import held_out_curves
    from lightning_aquila.run_record import load_run

    if not run.metrics.is_file():
        return None
    record = load_run(run.dir)
    curves = held_out_curves(record)
    if not curves["average"]:
        return None
    last = {d: curves[d][-1][1] for d in record.domains()}
    worst = max(last, key=last.get)
    seconds = json.loads((run.dir / "done.json").read_text())["seconds"] if run.done else None
    return {
        "reference": reference_of(run),
        "policy": run.policy, "seed": run.seed, "tokens": curves["average"][-1][0],
        "average": curves["average"][-1][1], "worst": last[worst], "worst_domain": worst,
        "token_weighted": sum(shares[d] * last[d] for d in last) / sum(shares[d] for d in last),
        "curve": curves["average"], "seconds": seconds, "done": run.done,
    }


def reference_of(run: Run) -> str | None:
    """The name of the run whose losses a DoReMi run steered toward: the folder of the
    ``reference`` its policy file names (``reference`` with seed 0, or ``uniform-sN`` under
    ``--reference-seed N``)."""
    import yaml

    path = run.dir / "policy.yaml"
    if not path.is_file():
        return None
    for callback in yaml.safe_load(path.read_text(encoding="utf-8")).get(
            "trainer", {}).get("callbacks", []):
        policy = callback.get("init_args", {}).get("policy", {})
        reference = policy.get("init_args", {}).get("reference") if policy else None
        if isinstance(reference, str):
            return Path(reference).parent.parent.name
    return None


def tokens_to_reach(curve: Sequence[tuple[int, float]], target: float) -> float | None:
    """The training tokens at which the curve first reaches ``target`` (linear between
    evaluations); ``None`` if it never does."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(tokens)
            t0, l0 = previous
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        previous = (tokens, loss)
    return None


def corpus_shares(store: str) -> dict[str, float]:
    from lightning_aquila.datamodules.store import ShardStore

    opened = ShardStore(store)
    tokens = {d: opened.info(d).tokens("train") for d in opened.domains}
    total = sum(tokens.values())
    return {d: n / total for d, n in tokens.items()}


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}"


def best_static(summaries: list[dict[str, Any]]) -> tuple[str | None, dict[int, dict[str, Any]]]:
    """The finished static policy with the lowest mean final domain average, and its run of
    each seed: the baseline every "tokens to target" is measured against."""
    finished = [s for s in summaries if s["done"] and s["policy"] in STATIC]
    best = min({s["policy"] for s in finished}, key=lambda p: statistics.fmean(
        s["average"] for s in finished if s["policy"] == p), default=None)
    return best, {s["seed"]: s for s in finished if s["policy"] == best}


def table(summaries: list[dict[str, Any]]) -> str:
    """The markdown table of the finished runs: per policy, mean ± sample standard deviation
    over its seeds."""
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for s in (s for s in summaries if s["done"]):
        by_policy.setdefault(s["policy"], []).append(s)
    best, baseline = best_static(summaries)
    lines = [f"Best static policy: {best or '-'} (target: its final domain average, per seed)",
             "",
             "| policy | seeds | domain average | worst domain | token-weighted | "
             "tokens to target (fewer than best static) | worst no worse (seeds) | "
             "wall s/run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for policy in [p for p in known_policies() if p in by_policy]:
        runs = sorted(by_policy[policy], key=lambda s: s["seed"])
        reach, savings, no_worse = [], [], 0
        for s in runs:
            base = baseline.get(s["seed"])
            if base is None:
                continue
            hit = tokens_to_reach(s["curve"], base["average"])
            reach.append(hit)
            if hit is not None:
                savings.append(1.0 - hit / base["tokens"])
            no_worse += s["worst"] <= base["worst"] + 1e-9
        seeds = ",".join(str(s["seed"]) for s in runs)
        reached = [r for r in reach if r is not None]
        reach_text = "-" if not reach else (
            f"{statistics.fmean(reached) / 1e6:.1f}M ({statistics.fmean(savings):+.1%}), "
            f"{len(reached)}/{len(reach)} seeds reach it" if reached else
            f"never (0/{len(reach)} seeds)")
        wall = [s["seconds"] for s in runs if s["seconds"]]
        lines.append(
            f"| {policy} | {seeds} | {_spread([s['average'] for s in runs])} | "
            f"{_spread([s['worst'] for s in runs])} | "
            f"{_spread([s['token_weighted'] for s in runs])} | {reach_text} | "
            f"{no_worse}/{len(reach)} | {statistics.fmean(wall) if wall else 0:.0f} |")
    references = [f"{s['policy']}-s{s['seed']} <- {s['reference']}" for s in summaries
                  if s.get("reference") and s["done"]]
    if references:  # a seed's own uniform run (--reference-seed) or the separate seed-0 one
        lines += ["", "DoReMi references: " + ", ".join(sorted(references))]
    return "\n".join(lines)


def per_seed(summaries: list[dict[str, Any]]) -> str:
    """Every finished run's final figures, for the seed-by-seed view."""
    lines = ["| run | tokens | domain average | worst (domain) | token-weighted |",
             "|---|---:|---:|---:|---:|"]
    order = known_policies()
    for s in sorted((s for s in summaries if s["done"]),
                    key=lambda s: (s["seed"], order.index(s["policy"]))):
        lines.append(f"| {s['policy']}-s{s['seed']} | {s['tokens'] / 1e6:.1f}M | "
                     f"{s['average']:.3f} | {s['worst']:.3f} ({s['worst_domain']}) | "
                     f"{s['token_weighted']:.3f} |")
    return "\n".join(lines)


def value_at(curve: Sequence[tuple[int, float]], tokens: float) -> float | None:
    """The curve's value at ``tokens`` (linear between evaluations); ``None`` outside it."""
    for (t0, v0), (t1, v1) in itertools.pairwise(curve):
        if t0 <= tokens <= t1:
            return v0 if t1 == t0 else v0 + (v1 - v0) * (tokens - t0) / (t1 - t0)
    return curve[-1][1] if curve and curve[-1][0] == tokens else None


def stopped(summaries: list[dict[str, Any]]) -> str:
    """The runs a sitting's deadline stopped before the end, each at its last evaluation
    against the best static policy of its seed at the same tokens: a partial result is still
    a comparison at equal tokens, and says whether the run can still reach the target."""
    best, baseline = best_static(summaries)
    lines = [f"Stopped before the end, at their last evaluation (best static: {best or '-'}, "
             "same seed, same tokens):", "",
             "| run | tokens | domain average | best static there | best static's final "
             "(target) | reached the target at |", "|---|---:|---:|---:|---:|---:|"]
    order = known_policies()
    for s in sorted((s for s in summaries if not s["done"]),
                    key=lambda s: (s["seed"], order.index(s["policy"]))):
        base = baseline.get(s["seed"])
        there = value_at(base["curve"], s["tokens"]) if base else None
        target = base["average"] if base else None
        hit = tokens_to_reach(s["curve"], target) if base else None
        lines.append(
            f"| {s['policy']}-s{s['seed']} | {s['tokens'] / 1e6:.1f}M | {s['average']:.3f} | "
            f"{'-' if there is None else f'{there:.3f}'} | "
            f"{'-' if target is None else f'{target:.3f}'} | "
            f"{'not yet' if hit is None else f'{hit / 1e6:.1f}M'} |")
    return "\n".join(lines)


def select(summaries: list[dict[str, Any]], policies: Sequence[str],
           seeds: Sequence[int]) -> str:
    """The candidate with the lowest mean final domain average over the selection ``seeds``:
    the rule fixed before the selection runs, applied by the machine that finishes them so
    that the confirmation runs can start on fresh seeds at once. Every candidate must have
    finished every selection seed; a partial comparison picks nothing."""
    finished = {(s["policy"], s["seed"]): s["average"] for s in summaries if s["done"]}
    missing = [f"{p}-s{seed}" for p in policies for seed in seeds if (p, seed) not in finished]
    if missing:
        raise SystemExit(f"cannot select: not finished: {', '.join(missing)}")
    return min(policies, key=lambda p: statistics.fmean(finished[p, seed] for seed in seeds))


# -- the command -------------------------------------------------------------------------------
def gather(out: Path, store: str | None, policies: Sequence[str],
           seeds: Sequence[int] | None) -> list[dict[str, Any]]:
    """Every run's summary, finished (``done``) or stopped at a deadline. The corpus shares
    come from the store, and are kept in ``<out>/shares.json`` so that the table can be
    printed again where the store is not."""
    saved = out / "shares.json"
    if store is not None:
        shares = corpus_shares(store)
        out.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(shares, indent=1), encoding="utf-8")
    elif saved.is_file():
        shares = json.loads(saved.read_text(encoding="utf-8"))
    else:
        raise SystemExit(f"give --store: {saved} does not exist yet")
    found = []
    for path in sorted(out.glob("*-s*")):
        policy, _, seed = path.name.rpartition("-s")
        if policy in policies and seed.isdigit() and (seeds is None or int(seed) in seeds):
            summary = summarise(Run(policy, int(seed), out), shares)
            if summary is not None:
                found.append(summary)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("command", choices=["run", "table", "select"],
                        help="run: train what is not done yet, then print the table; "
                             "table: only print it; select: print the policy (of "
                             "--policies) with the lowest mean final domain average over "
                             "--seeds")
    parser.add_argument("--store", default=None,
                        help="the shard store the runs train on (required to run; the table "
                             "can use the corpus shares saved by an earlier run)")
    parser.add_argument("--out", type=Path, default=Path("runs/mixing"),
                        help="one folder per run goes here (NAME-sSEED, and 'reference')")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES),
                        help="policies to run: names of configs/benchmarks/mixing/*.yaml "
                             f"(default {list(POLICIES)})")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3, 4, 5],
                        help="seeds for model initialisation and data order (not 0: the "
                             "DoReMi reference run's)")
    parser.add_argument("--gpus", nargs="+", default=["0"],
                        help="CUDA device indices, one run on each at a time; 'cpu' to run "
                             "on the CPU (one at a time)")
    parser.add_argument("--toy", action="store_true",
                        help="add configs/benchmarks/mixing/cpu-toy.yaml: tiny model, 50 "
                             "CPU steps")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from now after which no run starts that would not "
                             "end in time (by the longest run so far)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                        help="write last.ckpt every STEPS steps and resume unfinished runs "
                             "from it; with --deadline, runs still going then are stopped "
                             "(for runs longer than one sitting on a lent GPU)")
    parser.add_argument("--reference-seed", type=int, default=REFERENCE[1],
                        help="the seed of DoReMi's reference run on its baseline mixture "
                             f"(default {REFERENCE[1]}, a seed no row uses; one of --seeds "
                             "makes that seed's own baseline run the reference)")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                        help="everything after this goes to every `fit` (e.g. "
                             "--trainer.max_steps 200)")
    args = parser.parse_args(argv)
    runs, references = plan(args.policies, args.seeds, args.out, args.reference_seed)
    if args.command == "run" and args.store is None:
        parser.error("run needs --store")
    if args.command == "run":
        deadline = time.time() + args.deadline if args.deadline else math.inf
        left = Scheduler(runs, args.gpus, args.store, args.toy, list(args.fit_args),
                         deadline, args.checkpoint_every).run_all(references)
        if left:
            print(f"not run: {', '.join(r.name for r in left)}", flush=True)
    summaries = gather(args.out, args.store, args.policies, args.seeds)
    if args.command == "select":
        print(select(summaries, args.policies, args.seeds))
        return 0
    if not summaries:
        print(f"no runs with a held-out evaluation under {args.out}", file=sys.stderr)
        return 1
    if any(s["done"] for s in summaries):
        print(table(summaries))
        print()
        print(per_seed(summaries))
    if not all(s["done"] for s in summaries):
        print()
        print(stopped(summaries))
    (args.out / "summary.json").write_text(json.dumps(summaries, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
