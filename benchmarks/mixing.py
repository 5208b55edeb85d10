"""The HeuriMentor efficacy benchmark: does an adaptive mixture beat the best fixed one for
the same tokens, on data no policy read? Runs mixture policies (``configs/benchmarks/mixing/
<policy>.yaml``) for several seeds in several *settings* (a corpus and a token budget each)
through ``lightning-aquila fit``, several runs side by side per GPU, then reads each run's TSM
files and prints, per setting, the table of ``docs/benchmarks.md`` ("Mixing").

A setting is ``NAME=STORE:EPOCHS``: the runs train ``EPOCHS`` passes' worth of the store's
training tokens (``trainer.max_steps`` follows from the batch), evaluate ``--evaluations``
times, and a policy file's ``${eval_interval}`` (its update interval) and ``${warmup_steps}``
are filled in to match. Each run is ``fit --config base.yaml --config <policy>.yaml`` with
the seed given to both ``seed_everything`` (model initialisation) and the datamodule (data
order), so the runs of one seed and setting differ only in their mixture policy. A DoReMi
policy file names its reference run as ``${reference}`` (the uniform run) or
``${reference:POLICY}``: that policy's run of ``--reference-seed`` in the same setting.

Runs are started in *waves*, ``"POLICY ...:SEED,..."``, in order of priority (within a wave,
seed by seed, longest setting first), so that an interrupted benchmark still has whole seeds;
``"POLICY ...:SEED,... in SETTING,..."`` limits a wave to those settings.
The policy ``@best-fixed`` stands for the setting's best fixed mixture, chosen once every
fixed policy of the earlier waves has finished its seeds there.

Usage::

    python benchmarks/mixing.py run --out runs/mixing --gpus 0 0 0 0 0 0 \\
        --settings a-0.5ep=/data/a.zarr:0.5 a-3ep=/data/a-cut.zarr:3 \\
        --wave "natural uniform temperature unimax effective-data:1,2,3" \\
        --wave "effective-data @best-fixed:4,5"
    python benchmarks/mixing.py table --out runs/mixing     # what the table says now
    python benchmarks/mixing.py table --out runs/mixing --earlier OLD.json  # with an earlier
                                          # sitting's raw rows (--json) for runs not redone
    python benchmarks/mixing.py run --toy --settings toy=STORE:1 --wave "uniform:1" \\
        --gpus cpu --out DIR                  # the CI test: tiny model, bundled corpus, CPU

Metrics, per run, from its ``test`` held-out losses (``tsm/test_loss/<domain>``: documents no
policy and no decision read; a run without a test part falls back to the dev losses and the
table says so): the mean of the domains' losses ("domain average"), the worst domain's, and
the token-weighted one (each domain weighted by its share of the corpus's training tokens).
The best fixed mixture of a setting is the fixed policy (one whose file changes no weights)
with the lowest mean final domain average over its seeds; every other policy is compared
with it seed by seed (same seed, same data order and initialisation): the paired difference
of the final domain average, the tokens at which the policy first reaches the best fixed
mixture's final loss, and the regret (policy minus best fixed, at equal tokens) at every
evaluation.
"""

from __future__ import annotations

import argparse
import functools
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

import yaml

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "benchmarks" / "mixing"
#: The table's order; any other ``configs/benchmarks/mixing/<name>.yaml`` is a policy too and
#: follows these.
POLICIES = ("natural", "uniform", "temperature", "unimax", "effective-data", "doremi",
            "bandit", "aioli")
NOT_POLICIES = ("base", "cpu-toy", "cpu-small")
BEST_FIXED = "@best-fixed"
#: where a policy file wants a reference run's metrics: ``${reference}`` (the uniform run) or
#: ``${reference:POLICY}`` (that policy's run)
REFERENCE_SLOT = re.compile(r"\$\{reference(?::([A-Za-z0-9_-]+))?\}")
DEFAULT_REFERENCE = "uniform"
#: the fractions of a run's tokens at which the table shows the regret
REGRET_AT = (0.1, 0.25, 0.5, 0.75, 1.0)
#: a seed is "worse" when its final domain average exceeds the best fixed one's by more
WORSE_BY = 0.01
#: the learning-rate warm-up, as a share of a run's steps
WARMUP_SHARE = 0.05
#: --wait-for-stores: seconds with nothing to run before the stores still missing are given up
STORE_WAIT = 900


# -- settings, runs, plans ---------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """A corpus (a shard store) and a budget in passes over its training tokens."""

    name: str
    store: str
    epochs: float

    @classmethod
    def parse(cls, text: str) -> Setting:
        name, sep, rest = text.partition("=")
        store, colon, epochs = rest.rpartition(":")
        try:
            value = float(epochs)
        except ValueError:
            value = math.nan
        if not (sep and colon and name and store) or not value > 0:
            raise SystemExit(f"--settings {text!r}: expected NAME=STORE:EPOCHS, e.g. "
                             "a-3ep=/data/a.zarr:3")
        return cls(name, store, value)


@dataclass(frozen=True)
class Geometry:
    """What a setting's runs do: their steps, evaluation interval and warm-up."""

    train_tokens: int
    tokens_per_step: int
    max_steps: int
    eval_interval: int
    warmup_steps: int

    @classmethod
    def of(cls, setting: Setting, overlay: Path | None, evaluations: int) -> Geometry:
        from lightning_aquila.datamodules.store import ShardStore

        store = ShardStore(setting.store)
        tokens = sum(store.info(d).tokens("train") for d in store.domains)
        data = {}
        for path in [CONFIGS / "base.yaml", *([overlay] if overlay else [])]:
            data.update(yaml.safe_load(path.read_text())["data"]["init_args"])
        per_step = int(data["batch_size"]) * int(data["seq_len"])
        steps = max(1, round(setting.epochs * tokens / per_step))
        interval = max(1, round(steps / evaluations))
        steps = interval * max(1, round(steps / interval))  # the last evaluation at the end
        return cls(tokens, per_step, steps, interval, max(1, round(WARMUP_SHARE * steps)))


@dataclass
class Run:
    setting: str
    policy: str
    seed: int
    out: Path

    @property
    def name(self) -> str:
        return f"{self.policy}-s{self.seed}"

    @property
    def dir(self) -> Path:
        return self.out / self.setting / self.name

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


def known_policies() -> list[str]:
    found = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in NOT_POLICIES)
    return [p for p in POLICIES if p in found] + [p for p in found if p not in POLICIES]


@functools.cache
def is_fixed(policy: str) -> bool:
    """A fixed mixture: its file sets the data's weights and runs no mixture policy."""
    config = yaml.safe_load((CONFIGS / f"{policy}.yaml").read_text(encoding="utf-8"))
    callbacks = (config.get("trainer") or {}).get("callbacks") or []
    return not any(str(c.get("class_path", "")).endswith("AdaptiveTrainingEngine")
                   for c in callbacks)


@functools.cache  # the scheduler asks for every waiting run each time it polls
def reference_policy(policy: str) -> str | None:
    """The policy whose run ``policy``'s file reads as its reference, or ``None``."""
    found = {m.group(1) or DEFAULT_REFERENCE for m in REFERENCE_SLOT.finditer(
        (CONFIGS / f"{policy}.yaml").read_text(encoding="utf-8"))}
    if len(found) > 1:
        raise SystemExit(f"{policy}.yaml names several reference runs: {sorted(found)}")
    return found.pop() if found else None


def parse_wave(text: str) -> tuple[list[str], list[int], list[str] | None]:
    """``"POLICY POLICY:SEED,SEED[ in SETTING,SETTING]"`` -> (policies, seeds, settings or
    ``None`` for every setting)."""
    body, in_, names_text = text.partition(" in ")
    only = names_text.replace(",", " ").split() if in_ else None
    policies, colon, seeds = body.rpartition(":")
    try:
        numbers = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        numbers = []
    names = policies.split()
    if not colon or not names or not numbers or only == []:
        raise SystemExit(f"--wave {text!r}: expected 'POLICY [POLICY ...]:SEED[,SEED...]' "
                         "optionally followed by ' in SETTING[,SETTING...]'")
    unknown = [p for p in names if p != BEST_FIXED and p not in known_policies()]
    if unknown:
        raise SystemExit(f"unknown policy(ies) {unknown}; known (configs/benchmarks/mixing): "
                         f"{known_policies()}")
    bad = [p for p in names if p != BEST_FIXED and (w := reference_policy(p)) is not None
           and (w not in known_policies() or not is_fixed(w))]
    if bad:
        raise SystemExit(f"policy(ies) {bad} name a reference that is not a fixed mixture: "
                         "a reference is trained on a fixed baseline mixture")
    return names, numbers, only


def plan(settings: Sequence[Setting],
         waves: Sequence[tuple[list[str], list[int], list[str] | None]], out: Path,
         reference_seed: int = 1, sizes: dict[str, int] | None = None) -> list[Run]:
    """The runs in the order they start: wave by wave; in a wave seed by seed, the setting
    with the most tokens first (``sizes``: tokens per run of each setting); each DoReMi run's
    reference run before it (once). ``@best-fixed`` runs stay placeholders until resolved."""
    sizes = sizes or {}
    order = sorted(settings, key=lambda s: -sizes.get(s.name, 0))
    runs: list[Run] = []
    names: set[tuple[str, str, int]] = set()

    def add(run: Run) -> None:
        if (run.setting, run.policy, run.seed) not in names:
            names.add((run.setting, run.policy, run.seed))
            runs.append(run)

    known = {s.name for s in settings}
    for policies, seeds, only in waves:
        missing = sorted(set(only or ()) - known)
        if missing:
            raise SystemExit(f"--wave ... in {','.join(only)}: no setting named {missing}; "
                             f"the settings are {sorted(known)}")
        for seed in seeds:
            for setting in order:
                if only is not None and setting.name not in only:
                    continue
                for policy in policies:
                    wanted = reference_policy(policy) if policy != BEST_FIXED else None
                    if wanted is not None:
                        add(Run(setting.name, wanted, reference_seed, out))
                    add(Run(setting.name, policy, seed, out))
    return runs


def describe(setting: Setting, out: Path, overlay: Path | None, evaluations: int
             ) -> Geometry:
    """The setting's geometry, also written to ``<out>/<setting>/setting.json`` with the
    store, the budget and the corpus shares, for the tables."""
    geometry = Geometry.of(setting, overlay, evaluations)
    folder = out / setting.name
    folder.mkdir(parents=True, exist_ok=True)
    about = {"store": setting.store, "epochs": setting.epochs, **vars(geometry),
             "shares": corpus_shares(setting.store)}
    (folder / "setting.json").write_text(json.dumps(about, indent=1), encoding="utf-8")
    return geometry


# -- running -----------------------------------------------------------------------------------
def policy_config(run: Run, geometry: Geometry, reference_seed: int,
                  checkpoint_every: int | None = None) -> Path:
    """The run's policy file with its slots filled (``${reference...}``, ``${eval_interval}``,
    ``${warmup_steps}``) and, with ``checkpoint_every``, a ``ModelCheckpoint`` (``last.ckpt``
    every that many steps) added, so that a run longer than one sitting can be resumed."""
    text = (CONFIGS / f"{run.policy}.yaml").read_text(encoding="utf-8")
    text = REFERENCE_SLOT.sub(lambda m: str(Run(
        run.setting, m.group(1) or DEFAULT_REFERENCE, reference_seed, run.out).metrics
        .resolve()), text)
    text = text.replace("${eval_interval}", str(geometry.eval_interval))
    text = text.replace("${warmup_steps}", str(geometry.warmup_steps))
    if checkpoint_every:
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


def fit_command(run: Run, setting: Setting, geometry: Geometry, reference_seed: int,
                overlay: Path | None, extra: Sequence[str],
                checkpoint_every: int | None = None) -> list[str]:
    """``fit`` for the run; with ``checkpoint_every``, resuming its ``last.ckpt`` if an earlier
    sitting left one (the sampler, mixture history and TSM/ATE state resume with it)."""
    configs = [CONFIGS / "base.yaml", *([overlay] if overlay else []),
               policy_config(run, geometry, reference_seed, checkpoint_every)]
    resume = []
    if checkpoint_every:  # an earlier sitting's files may be there, with or without last.ckpt
        resume = ["--reuse_run_dir", "true"]
        if run.last_checkpoint.is_file():
            resume += ["--ckpt_path", "last"]
    return [sys.executable, "-m", "lightning_aquila.cli", "fit",
            *[a for c in configs for a in ("--config", str(c))],
            "--seed_everything", str(run.seed), "--data.init_args.seed", str(run.seed),
            "--data.init_args.store", setting.store,
            "--trainer.max_steps", str(geometry.max_steps),
            "--trainer.val_check_interval", str(geometry.eval_interval),
            "--model.warmup_steps", str(geometry.warmup_steps),
            "--trainer.default_root_dir", str(run.dir), *resume, *extra]


@dataclass
class Slot:
    device: str  # a CUDA device index, or "cpu"; repeat one to run several runs on it
    process: subprocess.Popen | None = None
    run: Run | None = None
    started: float = 0.0
    log: Any = None


@dataclass
class Scheduler:
    """Runs ``fit`` for each run in order, one per slot at a time: a DoReMi run once its
    reference is done, a ``@best-fixed`` run once the setting's fixed runs of the earlier
    waves are (then it becomes that policy's run, or is dropped when that run exists).
    Without checkpoints it stops starting runs when the next one would not end before
    ``deadline``; with ``checkpoint_every`` it starts them anyway and stops every run still
    going at the deadline, to be resumed from its ``last.ckpt`` by the next sitting."""

    runs: list[Run]
    devices: list[str]
    settings: dict[str, Setting]
    geometry: dict[str, Geometry]
    overlay: Path | None
    extra: list[str]
    reference_seed: int = 1
    deadline: float = math.inf
    checkpoint_every: int | None = None
    evaluations: int = 25
    wait_for_stores: bool = False
    durations: list[float] = field(default_factory=list)

    def store_ready(self, setting: str) -> bool:
        """Whether the setting's store can be trained on; with ``wait_for_stores``, once
        ``<store>.ready`` exists (a sitting prepares a corpus that arrives later), and then
        its geometry is measured and recorded."""
        if setting not in self.geometry:
            store = self.settings[setting].store
            if self.wait_for_stores and not Path(f"{store}.ready").is_file():
                return False
            self.geometry[setting] = describe(self.settings[setting], self.runs[0].out,
                                              self.overlay, self.evaluations)
        return True

    def ready(self, run: Run) -> bool:
        if not self.store_ready(run.setting):
            return False
        if run.policy == BEST_FIXED:
            return all(r.done for r in self.fixed_before(run))
        wanted = reference_policy(run.policy)
        return wanted is None or Run(run.setting, wanted, self.reference_seed, run.out).done

    def fixed_before(self, run: Run) -> list[Run]:
        """The fixed-mixture runs of ``run``'s setting planned before it."""
        index = self.runs.index(run)
        return [r for r in self.runs[:index] if r.setting == run.setting
                and r.policy != BEST_FIXED and is_fixed(r.policy)]

    def resolve(self, run: Run) -> Run | None:
        """A ``@best-fixed`` placeholder as the run of the best fixed policy so far, or
        ``None`` when that run is planned or done already."""
        if run.policy != BEST_FIXED:
            return run
        summaries = [summarise(r) for r in self.fixed_before(run)]
        best = best_fixed([s for s in summaries if s is not None])[0]
        if best is None:
            return None
        resolved = Run(run.setting, best, run.seed, run.out)
        taken = any((r.setting, r.policy, r.seed) == (resolved.setting, best, run.seed)
                    for r in self.runs if r is not run)
        return None if taken or resolved.done else resolved

    def launch(self, slot: Slot, run: Run) -> None:
        command = fit_command(run, self.settings[run.setting], self.geometry[run.setting],
                              self.reference_seed, self.overlay, self.extra,
                              self.checkpoint_every)
        env = dict(os.environ)
        if slot.device != "cpu":
            env["CUDA_VISIBLE_DEVICES"] = slot.device
        run.dir.mkdir(parents=True, exist_ok=True)
        slot.log = open(run.dir / "fit.log", "a", encoding="utf-8")  # noqa: SIM115
        slot.process = subprocess.Popen(command, stdout=slot.log, stderr=subprocess.STDOUT,
                                        env=env, cwd=ROOT)
        slot.run, slot.started = run, time.time()
        print(f"[{time.strftime('%H:%M:%S')}] {run.setting}/{run.name} on {slot.device}",
              flush=True)

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
        print(f"[{time.strftime('%H:%M:%S')}] {run.setting}/{run.name} {status} after "
              f"{took:.0f} s", flush=True)
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

    def run_all(self) -> list[Run]:
        """Run what is not done yet; returns the runs left unrun (placeholders resolved)."""
        todo = [r for r in self.runs if not r.done]
        slots = [Slot(d) for d in self.devices]
        idle: float | None = None  # since when nothing could run
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
                busy = {(s.run.setting, s.run.name) for s in slots if s.run is not None}
                runnable = [r for r in todo if self.ready(r) and (r.setting, r.name) not in busy]
                if not runnable:
                    continue
                if time.time() + expected > self.deadline:
                    todo = []
                    break
                run = runnable[0]
                todo.remove(run)
                resolved = self.resolve(run)
                if resolved is None:
                    continue
                if resolved is not run:
                    self.runs[self.runs.index(run)] = resolved
                self.launch(slot, resolved)
            if not todo and not any(s.process for s in slots):
                break
            if not any(s.process for s in slots) and todo and not any(
                    self.ready(r) for r in todo):
                idle = idle or time.time()
                waiting = [s for s in self.settings if not self.store_ready(s)]
                if not waiting or time.time() - idle > STORE_WAIT:
                    print(f"cannot run {', '.join(f'{r.setting}/{r.name}' for r in todo)}: "
                          + (f"the stores of {waiting} did not become ready" if waiting
                             else "a run they wait for failed"), flush=True)
                    break
            else:
                idle = None
            time.sleep(0.5)
        return [r for r in self.runs if not r.done and r.policy != BEST_FIXED]


# -- reading the runs --------------------------------------------------------------------------
def summarise(run: Run, shares: dict[str, float] | None = None) -> dict[str, Any] | None:
    """The run's last held-out evaluation and its domain-average curve against tokens, on the
    test part (the report's own loaders, as ``report --compare`` draws them)."""
    from lightning_aquila.tracking.compare import held_out_curves
    from lightning_aquila.tracking.run_record import load_run

    if not run.metrics.is_file():
        return None
    record = load_run(run.dir)
    part = record.report_part()
    curves = held_out_curves(record, part)
    if not curves["average"]:
        return None
    last = {d: curves[d][-1][1] for d in record.domains()}
    worst = max(last, key=last.get)
    seconds = json.loads((run.dir / "done.json").read_text())["seconds"] if run.done else None
    shares = shares or dict.fromkeys(last, 1.0)
    return {
        "setting": run.setting, "policy": run.policy, "seed": run.seed, "part": part,
        "tokens": curves["average"][-1][0], "average": curves["average"][-1][1],
        "worst": last[worst], "worst_domain": worst, "per_domain": last,
        "token_weighted": sum(shares.get(d, 0) * last[d] for d in last) / max(
            sum(shares.get(d, 0) for d in last), 1e-300),
        "curve": curves["average"], "seconds": seconds, "done": run.done,
    }


def value_at(curve: Sequence[tuple[float, float]], tokens: float) -> float | None:
    """The curve's value at ``tokens`` (linear between evaluations); ``None`` outside it."""
    from lightning_aquila.tracking.compare import value_at as interpolated

    return interpolated(curve, tokens)


def tokens_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
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


def best_fixed(summaries: Sequence[dict[str, Any]]) -> tuple[str | None, dict[int, dict]]:
    """The finished fixed policy with the lowest mean final domain average over its seeds,
    and its run of each seed: the baseline every comparison is made against."""
    finished = [s for s in summaries if s["done"] and is_fixed(s["policy"])]
    best = min({s["policy"] for s in finished}, key=lambda p: (statistics.fmean(
        s["average"] for s in finished if s["policy"] == p), p), default=None)
    return best, {s["seed"]: s for s in finished if s["policy"] == best}


def paired(runs: Sequence[dict[str, Any]], policy: str
           ) -> tuple[str | None, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """The best fixed mixture of the finished ``runs``, and each finished run of ``policy``
    (by seed) with its comparison to the best fixed run of the same seed."""
    done = [s for s in runs if s["done"]]
    best, baseline = best_fixed(done)
    return best, [(s, compare(s, baseline[s["seed"]]))
                  for s in sorted(done, key=lambda s: s["seed"])
                  if s["policy"] == policy and s["seed"] in baseline]


def compare(summary: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """One run against the best fixed run of its seed: the paired final difference, the
    tokens to reach its final loss, and the regret (difference at equal tokens) at every
    evaluation and at the fractions :data:`REGRET_AT` of the run."""
    hit = tokens_to_reach(summary["curve"], base["average"])
    regret = [(t, v - there) for t, v in summary["curve"]
              if (there := value_at(base["curve"], t)) is not None]
    end = summary["tokens"]
    return {
        "delta": summary["average"] - base["average"],
        "worst_delta": summary["worst"] - base["worst"],
        "saving": None if hit is None else 1.0 - hit / base["tokens"],
        "regret": regret,
        "regret_at": {f: value_at(regret, f * end) if regret else None for f in REGRET_AT},
        "mean_regret": statistics.fmean(v for t, v in regret if t >= 0.1 * end)
        if any(t >= 0.1 * end for t, _ in regret) else None,
    }


def _spread(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _signed(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:+.{digits}f}"


def table(summaries: list[dict[str, Any]], header: str = "") -> str:
    """One setting's markdown tables: per policy over its finished seeds, then the regret
    against the best fixed mixture at fractions of the run, then the verdict on the goal."""
    runs = [s for s in summaries if s["done"]]
    best, _ = best_fixed(runs)
    parts = {s["part"] for s in runs}
    lines = [header] if header else []
    lines += [f"Best fixed mixture: {best or '-'} (lowest mean final domain average); losses "
              f"on the {'/'.join(sorted(parts)) or '-'} part"
              + (" (no test part: the dev losses the policies read)" if "val" in parts else ""),
              "",
              "| policy | seeds | domain average | paired Δ vs best fixed (mean; per seed) | "
              "seeds worse by > 0.01 | worst domain | worst Δ | token-weighted | tokens to "
              "best fixed's final (saved) | mean regret after 10% |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    order = known_policies()
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for s in runs:
        by_policy.setdefault(s["policy"], []).append(s)
    regrets = ["", "Regret against the best fixed mixture of the same seed at equal tokens "
               "(mean over seeds; negative: ahead):", "",
               "| policy | " + " | ".join(f"{f:.0%}" for f in REGRET_AT) + " |",
               "|---|" + "---:|" * len(REGRET_AT)]
    for policy in sorted(by_policy, key=order.index):
        mine = sorted(by_policy[policy], key=lambda s: s["seed"])
        _, pairs = paired(runs, policy)
        deltas = [c["delta"] for _, c in pairs]
        savings = [c["saving"] for _, c in pairs]
        reached = [v for v in savings if v is not None]
        reach = "-" if not pairs else (
            f"{len(reached)}/{len(pairs)} seeds ({statistics.fmean(reached):+.1%})" if reached
            else f"never (0/{len(pairs)})")
        per_seed = ", ".join(f"{c['delta']:+.3f}" for _, c in pairs)
        mean_regret = [c["mean_regret"] for _, c in pairs if c["mean_regret"] is not None]
        lines.append(
            f"| {policy} | {','.join(str(s['seed']) for s in mine)} | "
            f"{_spread([s['average'] for s in mine])} | "
            f"{_signed(statistics.fmean(deltas) if deltas else None)} ({per_seed or '-'}) | "
            f"{sum(d > WORSE_BY for d in deltas)}/{len(deltas)} | "
            f"{_spread([s['worst'] for s in mine])} | "
            f"{_signed(statistics.fmean(c['worst_delta'] for _, c in pairs) if pairs else None)}"
            f" | {_spread([s['token_weighted'] for s in mine])} | {reach} | "
            f"{_signed(statistics.fmean(mean_regret) if mean_regret else None)} |")
        if policy != best:
            cells = []
            for f in REGRET_AT:
                values = [c["regret_at"][f] for _, c in pairs if c["regret_at"][f] is not None]
                cells.append(_signed(statistics.fmean(values) if values else None))
            regrets.append(f"| {policy} | " + " | ".join(cells) + " |")
    references = sorted({f"{s['policy']}-s{s['seed']} <- {s['reference']}" for s in runs
                         if s.get("reference")})
    notes = ["", "DoReMi references: " + ", ".join(references)] if references else []
    return "\n".join(lines + regrets + notes)


def verdict(summaries: list[dict[str, Any]], policy: str) -> str:
    """Issue 25's goal for ``policy`` in one setting: paired mean ≤ 0, no seed worse by more
    than 0.01, the worst domain no worse on average; and the aim, 25% fewer tokens."""
    best, both = paired(summaries, policy)
    pairs = [c for _, c in both]
    if not pairs or best is None:
        return f"{policy}: no paired seeds with a best fixed mixture yet"
    mean = statistics.fmean(c["delta"] for c in pairs)
    worst_seed = max(c["delta"] for c in pairs)
    worst_domain = statistics.fmean(c["worst_delta"] for c in pairs)
    savings = [c["saving"] for c in pairs]
    must = mean <= 0 and worst_seed <= WORSE_BY and worst_domain <= 0
    aim = all(v is not None and v >= 0.25 for v in savings)
    return (f"{policy} vs {best} over {len(pairs)} seeds: paired mean {mean:+.4f}, worst seed "
            f"{worst_seed:+.4f}, worst domain {worst_domain:+.4f} -> must "
            f"{'MET' if must else 'MISSED'}; aim (25% fewer tokens in every seed) "
            f"{'MET' if aim else 'MISSED'}")


def gaps(everything: dict[str, list[dict[str, Any]]]) -> str:
    """Every policy's paired mean gap to each setting's best fixed mixture, side by side, and
    its worst over the settings it ran in: the number the default is chosen by (the policy
    that stays closest to the best fixed mixture wherever it is measured)."""
    cells: dict[str, dict[str, str]] = {}
    worst: dict[str, list[float]] = {}
    for name, summaries in everything.items():
        for policy in {s["policy"] for s in summaries if s["done"]}:
            deltas = [c["delta"] for _, c in paired(summaries, policy)[1]]
            if deltas:
                mean = statistics.fmean(deltas)
                cells.setdefault(policy, {})[name] = f"{mean:+.3f} ({len(deltas)})"
                worst.setdefault(policy, []).append(mean)
    names = list(everything)
    lines = ["Paired mean gap to each setting's best fixed mixture (seeds), and the worst:", "",
             "| policy | " + " | ".join(names) + " | worst |",
             "|---|" + "---:|" * (len(names) + 1)]
    for policy in sorted(cells, key=known_policies().index):
        row = [cells[policy].get(n, "not run") for n in names]
        lines.append(f"| {policy} | " + " | ".join(row)
                     + f" | {max(worst[policy]):+.3f} |")
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


def stopped(summaries: list[dict[str, Any]]) -> str:
    """The runs stopped before the end, each at its last evaluation against the fixed runs of
    its seed at the same tokens (finished or stopped: the best of them there, the lower
    envelope of the fixed mixtures): a partial result is still a comparison at equal
    tokens. With a finished best fixed mixture, also whether the run reached its final."""
    from lightning_aquila.tracking.compare import envelope_gap

    best, baseline = best_fixed(summaries)
    lines = [f"Stopped before the end, at their last evaluation (best fixed: {best or '-'}, "
             "same seed, same tokens):", "",
             "| run | tokens | domain average | best fixed there (policy) | gap | best "
             "fixed's final | reached it at |", "|---|---:|---:|---:|---:|---:|---:|"]
    order = known_policies()
    for s in sorted((s for s in summaries if not s["done"]),
                    key=lambda s: (s["seed"], order.index(s["policy"]))):
        fixed = {f["policy"]: f["curve"] for f in summaries
                 if f["seed"] == s["seed"] and is_fixed(f["policy"]) and f is not s}
        there = {p: v for p, c in fixed.items() if (v := value_at(c, s["tokens"])) is not None}
        gap = envelope_gap([(s["tokens"], s["average"])], list(fixed.values()))
        lowest = min(there, key=there.get) if there else None
        base = baseline.get(s["seed"])
        target = base["average"] if base else None
        hit = tokens_to_reach(s["curve"], target) if base else None
        lines.append(
            f"| {s['policy']}-s{s['seed']} | {s['tokens'] / 1e6:.1f}M | {s['average']:.3f} | "
            f"{'-' if lowest is None else f'{there[lowest]:.3f} ({lowest})'} | "
            f"{_signed(gap[0][1]) if gap else '-'} | "
            f"{'-' if target is None else f'{target:.3f}'} | "
            f"{'-' if base is None else 'not yet' if hit is None else f'{hit / 1e6:.1f}M'} |")
    return "\n".join(lines)


def reference_of(run: Run) -> str | None:
    """The run a DoReMi run steered toward: the folder of the ``reference`` its policy file
    names."""
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


def corpus_shares(store: str) -> dict[str, float]:
    from lightning_aquila.datamodules.store import ShardStore

    opened = ShardStore(store)
    tokens = {d: opened.info(d).tokens("train") for d in opened.domains}
    total = sum(tokens.values())
    return {d: n / total for d, n in tokens.items()}


def gather(out: Path, setting: str) -> list[dict[str, Any]]:
    """Every run of a setting with a held-out evaluation, finished or stopped."""
    folder = out / setting
    saved = folder / "setting.json"
    shares = json.loads(saved.read_text())["shares"] if saved.is_file() else None
    found = []
    for path in sorted(folder.glob("*-s*")):
        policy, _, seed = path.name.rpartition("-s")
        if policy in known_policies() and seed.isdigit():
            run = Run(setting, policy, int(seed), out)
            summary = summarise(run, shares)
            if summary is not None:
                summary["reference"] = reference_of(run)
                found.append(summary)
    return found


def with_earlier(found: list[dict[str, Any]], earlier: Sequence[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """A setting's runs found under ``--out`` and those of earlier sittings (their ``--json``
    rows) that were not run again: the run folders of a sitting on a lent GPU machine are
    gone with the machine, its raw rows are not."""
    have = {(s["policy"], s["seed"]) for s in found}
    return found + [s for s in earlier if (s["policy"], s["seed"]) not in have]


def load_earlier(paths: Sequence[Path]) -> dict[str, list[dict[str, Any]]]:
    """The summaries of earlier ``--json`` files by setting; a later file wins a repeated run."""
    merged: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for path in paths:
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise SystemExit(
                f"--earlier {path}: not a --json file of this script ({error})") from None
        for setting, summaries in rows.items():
            for s in summaries:
                merged.setdefault(setting, {})[(s["policy"], s["seed"])] = s
    return {setting: list(runs.values()) for setting, runs in merged.items()}


def report(out: Path, settings: Sequence[str],
           earlier: dict[str, list[dict[str, Any]]] | None = None
           ) -> dict[str, list[dict[str, Any]]]:
    """Print every setting's tables; returns the summaries by setting."""
    everything = {}
    for name in settings:
        summaries = with_earlier(gather(out, name), (earlier or {}).get(name, []))
        everything[name] = summaries
        saved = out / name / "setting.json"
        about = json.loads(saved.read_text()) if saved.is_file() else {}
        if about:
            header = (f"### {name}: {about['store']}, {about['epochs']} epochs = "
                      f"{about['max_steps'] * about['tokens_per_step'] / 1e6:.1f}M "
                      f"tokens ({about['max_steps']} steps)")
        else:
            tokens = max((s["tokens"] for s in summaries), default=0.0)
            header = f"### {name}: {tokens / 1e6:.1f}M tokens (runs of earlier sittings)"
        if not summaries:
            print(f"{header}\n\nno runs with a held-out evaluation yet\n", flush=True)
            continue
        if any(s["done"] for s in summaries):
            print(table(summaries, header + "\n"), "\n", sep="")
            adaptive = [p for p in known_policies() if not is_fixed(p)
                        and any(s["policy"] == p and s["done"] for s in summaries)]
            print("\n".join(verdict(summaries, p) for p in adaptive), "\n")
            print(per_seed(summaries), "\n")
        if not all(s["done"] for s in summaries):
            print(stopped(summaries), "\n")
    if len(everything) > 1:
        print(gaps(everything), "\n")
    return everything


def table_settings(out: Path, texts: Sequence[str], earlier: Sequence[str] = ()) -> list[str]:
    """The settings ``table`` reports: those named (``NAME`` or ``NAME=...``), else every one
    found under ``out`` or in the earlier sittings' rows."""
    return [t.partition("=")[0] for t in texts] or sorted(
        {p.parent.name for p in out.glob("*/setting.json")} | set(earlier))


# -- the command -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("command", choices=["run", "table"],
                        help="run: train what is not done yet, then print the tables; "
                             "table: only print them")
    parser.add_argument("--settings", nargs="+", default=[], metavar="NAME=STORE:EPOCHS",
                        help="each setting's name, shard store and budget in passes over its "
                             "training tokens (table: names, or all found under --out)")
    parser.add_argument("--wave", action="append", default=[], metavar="'POLICIES:SEEDS'",
                        help="policies (names of configs/benchmarks/mixing/*.yaml, or "
                             f"{BEST_FIXED}) and seeds, started in the order given")
    parser.add_argument("--out", type=Path, default=Path("runs/mixing"),
                        help="one folder per setting, one per run inside (POLICY-sSEED)")
    parser.add_argument("--gpus", nargs="+", default=["0"],
                        help="a slot per entry, one run on each at a time: CUDA device "
                             "indices (repeat one to share a GPU), or 'cpu'")
    parser.add_argument("--evaluations", type=int, default=25,
                        help="held-out evaluations per run (and policy updates)")
    parser.add_argument("--reference-seed", type=int, default=1,
                        help="the seed of the reference runs DoReMi policies read")
    parser.add_argument("--toy", action="store_true",
                        help="add configs/benchmarks/mixing/cpu-toy.yaml: tiny model on CPU")
    parser.add_argument("--overlay", type=Path, default=None,
                        help="a config given after base.yaml for every run (and read for the "
                             "batch geometry), instead of --toy's")
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds from now after which no run starts that would not end "
                             "in time (by the longest run so far)")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS",
                        help="write last.ckpt every STEPS steps and resume unfinished runs "
                             "from it; with --deadline, runs still going then are stopped")
    parser.add_argument("--wait-for-stores", action="store_true",
                        help="a setting's runs start once <store>.ready exists (for corpora "
                             "prepared while the first runs train)")
    parser.add_argument("--earlier", type=Path, action="append", default=[],
                        metavar="JSON",
                        help="also report the runs of an earlier sitting's --json file that "
                             "are not under --out (repeatable; a later file wins)")
    parser.add_argument("--json", type=Path, default=None,
                        help="also write every summary (curves included) to this file")
    parser.add_argument("--fit-args", nargs=argparse.REMAINDER, default=[],
                        help="everything after this goes to every `fit`")
    args = parser.parse_args(argv)
    earlier = load_earlier(args.earlier)
    if args.command == "run":
        settings = [Setting.parse(t) for t in args.settings]
        if not settings or not args.wave:
            parser.error("run needs --settings and at least one --wave")
        overlay = args.overlay or (CONFIGS / "cpu-toy.yaml" if args.toy else None)
        geometry = {s.name: describe(s, args.out, overlay, args.evaluations)
                    for s in settings if not args.wait_for_stores
                    or Path(f"{s.store}.ready").is_file()}
        waves = [parse_wave(w) for w in args.wave]
        runs = plan(settings, waves, args.out, args.reference_seed,
                    {name: g.max_steps * g.tokens_per_step for name, g in geometry.items()})
        deadline = time.time() + args.deadline if args.deadline else math.inf
        left = Scheduler(runs, args.gpus, {s.name: s for s in settings}, geometry, overlay,
                         list(args.fit_args), args.reference_seed, deadline,
                         args.checkpoint_every, args.evaluations,
                         args.wait_for_stores).run_all()
        if left:
            print(f"not run: {', '.join(f'{r.setting}/{r.name}' for r in left)}", flush=True)
        names = [s.name for s in settings]
    else:
        names = table_settings(args.out, args.settings, list(earlier))
    everything = report(args.out, names, earlier)
    if args.json:
        args.json.write_text(json.dumps(everything, indent=1), encoding="utf-8")
    return 0 if any(everything.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
