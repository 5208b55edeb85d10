"""The mixing benchmark's driver (benchmarks/mixing.py) end to end at toy scale on CPU, so the
benchmark configs and the driver cannot rot, and its arithmetic on constructed runs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from helpers.corpus import prepare_bundled_corpus

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("mixing_benchmark", REPO / "benchmarks/mixing.py")
mixing = importlib.util.module_from_spec(spec)
sys.modules["mixing_benchmark"] = mixing  # dataclasses look their module up there
spec.loader.exec_module(mixing)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Three small domains of the bundled corpus, of different sizes."""
    return prepare_bundled_corpus(tmp_path_factory.mktemp("mixing"), {
        "en_legal": "common_licenses", "en_prose": "alice_in_wonderland", "code_c": "brotli"})


def test_the_driver_runs_two_policies_and_prints_their_table(store, tmp_path, capsys):
    out = tmp_path / "runs"
    code = mixing.main(["run", "--toy", "--store", store, "--out", str(out),
                        "--policies", "uniform", "aioli", "--seeds", "1", "--gpus", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    summaries = json.loads((out / "summary.json").read_text())
    assert sorted((s["policy"], s["seed"]) for s in summaries) == [("aioli", 1), ("uniform", 1)]
    assert all(s["tokens"] == 50 * 4 * 64 for s in summaries)  # cpu-toy: 50 steps x 4 x 64
    assert "| uniform | 1 |" in printed and "| aioli | 1 |" in printed
    events = [json.loads(line) for line in (out / "aioli-s1/tsm/events.jsonl").open()]
    probes = [e for e in events if e["kind"] == "mixture" and e.get("step") == 25]
    assert probes and max(probes[0]["weights"].values()) == pytest.approx(0.75)


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert mixing.tokens_to_reach(curve, 3.5) == pytest.approx(250)
    assert mixing.tokens_to_reach(curve, 5.5) == 100
    assert mixing.tokens_to_reach(curve, 2.9) is None


def summary(policy: str, seed: int, average: float, worst: float, curve) -> dict:
    return {"policy": policy, "seed": seed, "tokens": curve[-1][0], "average": average,
            "worst": worst, "worst_domain": "x", "token_weighted": average, "curve": curve,
            "seconds": 60.0, "done": True}


def test_the_table_measures_tokens_against_the_best_static_policy_of_each_seed():
    runs = [
        summary("natural", 1, 3.2, 4.0, [(100, 3.6), (200, 3.2)]),
        summary("uniform", 1, 3.0, 3.5, [(100, 3.4), (200, 3.0)]),
        summary("aioli", 1, 2.9, 3.4, [(100, 3.0), (200, 2.9)]),  # reaches 3.0 at 100: -50%
    ]
    text = mixing.table(runs)
    assert "Best static policy: uniform" in text
    aioli = next(line for line in text.splitlines() if line.startswith("| aioli"))
    assert "0.0M (+50.0%), 1/1 seeds reach it" in aioli
    assert "| 1/1 |" in aioli  # worst domain 3.4 <= uniform's 3.5


def test_select_picks_the_lowest_mean_over_the_selection_seeds_and_needs_them_all():
    curve = [(100, 3.0)]
    runs = [summary("doremi", 1, 2.30, 4.0, curve), summary("doremi", 2, 2.20, 4.0, curve),
            summary("aioli", 1, 2.26, 4.0, curve), summary("aioli", 2, 2.26, 4.0, curve),
            summary("aioli", 3, 1.00, 4.0, curve)]  # seed 3 is not a selection seed
    assert mixing.select(runs, ["aioli", "doremi"], [1, 2]) == "doremi"  # 2.25 < 2.26
    runs[1]["done"] = False  # a run a deadline stopped does not count
    with pytest.raises(SystemExit, match="not finished: doremi-s2"):
        mixing.select(runs, ["aioli", "doremi"], [1, 2])


def test_the_plan_refuses_the_reference_seed_and_unknown_policies(tmp_path):
    with pytest.raises(SystemExit, match="seed 0"):
        mixing.plan(["doremi"], [0, 1], tmp_path)
    with pytest.raises(SystemExit, match="stratified"):
        mixing.plan(["stratified"], [1], tmp_path)
    runs, references = mixing.plan(["uniform", "doremi"], [1, 2], tmp_path)
    assert [r.name for r in runs] == ["reference", "uniform-s1", "doremi-s1", "uniform-s2",
                                      "doremi-s2"]
    assert {p: r.name for p, r in references.items()} == {"uniform": "reference"}
    # a seed's own uniform run as the reference: it runs first, and only once
    runs, references = mixing.plan(["uniform", "doremi"], [1, 2], tmp_path, reference_seed=1)
    assert [r.name for r in runs] == ["uniform-s1", "doremi-s1", "uniform-s2", "doremi-s2"]
    assert references["uniform"].name == "uniform-s1"
    assert mixing.plan(["uniform", "bandit"], [1], tmp_path)[1] == {}  # no DoReMi, no reference


def test_a_policy_file_can_name_the_baseline_its_reference_run_trains_on(tmp_path):
    """``${reference:natural}``: the natural run of the reference seed runs first, and the
    policy file gets its metrics; plain ``${reference}`` still means the uniform run."""
    assert mixing.reference_policy("doremi") == "uniform"
    assert mixing.reference_policy("doremi-natural-ref") == "natural"
    assert mixing.reference_policy("natural") is None
    runs, references = mixing.plan(["natural", "doremi", "doremi-natural-ref"], [1], tmp_path,
                                   reference_seed=1)
    assert [r.name for r in runs] == ["natural-s1", "uniform-s1", "doremi-s1",
                                      "doremi-natural-ref-s1"]
    metrics = {p: r.metrics for p, r in references.items()}
    doremi = next(r for r in runs if r.policy == "doremi-natural-ref")
    mixing.policy_config(doremi, metrics, toy=False)
    assert mixing.reference_of(doremi) == "natural-s1"
    scheduler = mixing.Scheduler(runs, ["cpu"], "unused", toy=True, extra=[])
    (references["natural"].dir).mkdir(parents=True)
    (references["natural"].dir / "done.json").write_text("{}")
    assert scheduler.ready(doremi, references)  # its natural reference is done...
    assert not scheduler.ready(runs[2], references)  # ...doremi's uniform one is not


def test_a_run_stopped_between_sittings_resumes_from_its_last_checkpoint(store, tmp_path):
    """--checkpoint-every: a run cut short (here by a smaller max_steps, as a deadline would)
    is resumed by the next sitting from last.ckpt, not restarted, and counted once."""
    out = tmp_path / "runs"
    args = ["run", "--toy", "--store", store, "--out", str(out), "--policies", "uniform",
            "--seeds", "1", "--gpus", "cpu", "--checkpoint-every", "10"]
    assert mixing.main([*args, "--fit-args", "--trainer.max_steps", "30"]) == 0
    run = mixing.Run("uniform", 1, out)
    assert run.last_checkpoint.is_file()
    (run.dir / "done.json").unlink()  # as if the deadline had stopped it after step 30
    run.add_sitting(12.5)
    assert mixing.main(args) == 0
    events = [json.loads(line) for line in (run.dir / "tsm/events.jsonl").open()]
    assert [e["step"] for e in events if e["kind"] == "session_start"] == [0, 30]
    summary = json.loads((out / "summary.json").read_text())[0]
    assert summary["tokens"] == 50 * 4 * 64
    assert summary["seconds"] > 12.5  # both sittings' wall time


def test_the_scheduler_stops_runs_at_the_deadline_when_they_can_resume(store, tmp_path):
    out = tmp_path / "runs"
    run = mixing.Run("uniform", 1, out)
    scheduler = mixing.Scheduler([run], ["cpu"], store, toy=True, extra=[],
                                 deadline=mixing.time.time() + 1.0, checkpoint_every=10)
    assert scheduler.run_all({}) == [run]  # stopped, not finished
    assert not run.done and len(json.loads((run.dir / "sittings.json").read_text())) == 1


def test_the_table_names_each_doremi_runs_reference(tmp_path):
    """Under --reference-seed a DoReMi run steers toward its own seed's uniform run: the
    table says which reference each DoReMi row used."""
    for reference_seed in (0, 1):
        out = tmp_path / f"ref{reference_seed}"
        runs, references = mixing.plan(["uniform", "doremi"], [1], out, reference_seed)
        doremi = next(r for r in runs if r.policy == "doremi")
        mixing.policy_config(doremi, {"uniform": references["uniform"].metrics}, toy=False)
        assert mixing.reference_of(doremi) == references["uniform"].name
    assert mixing.reference_of(mixing.Run("uniform", 1, out)) is None  # no policy file
    row = {"policy": "doremi", "seed": 1, "average": 3.0, "worst": 4.0, "token_weighted": 3.1,
           "tokens": 100, "curve": [(100, 3.0)], "seconds": 1.0, "done": True,
           "reference": "uniform-s1"}
    assert "DoReMi references: doremi-s1 <- uniform-s1" in mixing.table([row])


def test_a_run_stopped_at_a_deadline_is_compared_at_equal_tokens():
    """A run the last sitting stopped is left out of the table, and reported at its last
    evaluation against the best static run of its seed at the same tokens."""
    natural = summary("natural", 1, 2.0, 3.0, [(100, 4.0), (200, 3.0), (300, 2.0)])
    uniform = summary("uniform", 1, 2.5, 3.5, [(100, 4.0), (200, 3.2), (300, 2.5)])
    doremi = {**summary("doremi", 1, 2.9, 3.9, [(100, 3.5), (250, 2.9)]), "done": False}
    assert mixing.value_at(natural["curve"], 250) == pytest.approx(2.5)
    assert mixing.value_at(natural["curve"], 350) is None
    text = mixing.table([natural, uniform, doremi])
    assert "| doremi" not in text
    stopped = mixing.stopped([natural, uniform, doremi])
    assert "best static: natural" in stopped
    assert "| doremi-s1 | 0.0M | 2.900 | 2.500 | 2.000 | not yet |" in stopped
