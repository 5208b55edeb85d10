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


def test_the_driver_runs_two_settings_and_prints_their_tables(store, tmp_path, capsys):
    out = tmp_path / "runs"
    code = mixing.main(["run", "--toy", "--out", str(out), "--gpus", "cpu", "cpu",
                        "--evaluations", "4", "--json", str(tmp_path / "all.json"),
                        "--settings", f"short={store}:0.02", f"long={store}:0.04",
                        "--wave", "uniform effective-data:1"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    everything = json.loads((tmp_path / "all.json").read_text())
    for name, epochs in (("short", 0.02), ("long", 0.04)):
        about = json.loads((out / name / "setting.json").read_text())
        interval = round(round(epochs * about["train_tokens"] / (4 * 64)) / 4)
        assert about["eval_interval"] == interval and about["max_steps"] == 4 * interval
        assert sum(about["shares"].values()) == pytest.approx(1.0)
        found = sorted((s["policy"], s["seed"]) for s in everything[name])
        assert found == [("effective-data", 1), ("uniform", 1)]
        assert all(s["tokens"] == 4 * interval * 4 * 64 and s["part"] == "test"
                   for s in everything[name])
        assert f"### {name}:" in printed
    assert "| effective-data | 1 |" in printed and "Best fixed mixture: uniform" in printed
    events = [json.loads(line) for line in
              (out / "short/effective-data-s1/tsm/events.jsonl").open()]
    assert any(e["kind"] == "mixture" and "EffectiveDataMixture" in e.get("reason", "")
               for e in events)


def test_best_fixed_runs_wait_for_the_fixed_runs_then_become_the_best_ones(tmp_path):
    settings = {"s": mixing.Setting("s", "unused", 1)}
    runs = mixing.plan(list(settings.values()), [(["natural", "uniform"], [1], None),
                                                 (["@best-fixed"], [2], None)], tmp_path)
    scheduler = mixing.Scheduler(runs, ["cpu"], settings, {"s": mixing.Geometry(1, 1, 1, 1, 1)},
                                 overlay=None, extra=[])
    placeholder = runs[-1]
    assert not scheduler.ready(placeholder)
    for run, loss in zip(runs[:2], (3.0, 2.5)):  # uniform is the better fixed mixture
        write_run(run, loss)
    assert scheduler.ready(placeholder)
    assert scheduler.resolve(placeholder).name == "uniform-s2"
    write_run(mixing.Run("s", "uniform", 2, tmp_path), 2.4)
    assert scheduler.resolve(placeholder) is None  # done already


def write_run(run, loss: float) -> None:
    """A finished run's monitor files with one test evaluation of two domains."""
    (run.dir / "tsm").mkdir(parents=True, exist_ok=True)
    rows = [{"step": 10, "time": 1.0, "tsm/tokens_total": 1000.0},
            {"step": 10, "time": 1.0, "tsm/test_loss/a": loss, "tsm/test_loss/b": loss}]
    run.metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run.dir / "tsm" / "events.jsonl").write_text(json.dumps(
        {"kind": "session_start", "step": 0, "time": 0.0, "domains": ["a", "b"]}) + "\n")
    (run.dir / "done.json").write_text(json.dumps({"seconds": 1.0}))


def test_settings_and_waves_are_parsed_or_refused_naming_the_value():
    assert mixing.Setting.parse("a=/data/x.zarr:0.5") == mixing.Setting("a", "/data/x.zarr",
                                                                          0.5)
    assert mixing.Setting.parse("b=s3://bucket/x.zarr:3").store == "s3://bucket/x.zarr"
    for bad in ("a:/x.zarr", "a=/x.zarr", "a=/x.zarr:0", "=x:1"):
        with pytest.raises(SystemExit, match="NAME=STORE:EPOCHS"):
            mixing.Setting.parse(bad)
    assert mixing.parse_wave("uniform natural:1,2") == (["uniform", "natural"], [1, 2], None)
    assert mixing.parse_wave("uniform:3 in b-3ep,a") == (["uniform"], [3], ["b-3ep", "a"])
    with pytest.raises(SystemExit, match="expected"):
        mixing.parse_wave("uniform:3 in ")
    with pytest.raises(SystemExit, match="unknown policy"):
        mixing.parse_wave("stratified:1")
    with pytest.raises(SystemExit, match="expected"):
        mixing.parse_wave("uniform")


def test_fixed_policies_are_the_files_that_run_no_mixture_policy():
    assert [p for p in mixing.known_policies() if mixing.is_fixed(p)] == [
        "natural", "uniform", "temperature", "unimax"]


def test_the_plan_runs_waves_in_order_seed_by_seed_longest_setting_first(tmp_path):
    settings = [mixing.Setting("small", "x", 1), mixing.Setting("big", "y", 1)]
    runs = mixing.plan(settings, [(["uniform", "doremi"], [2, 3], None),
                                  (["@best-fixed"], [4], None), (["natural"], [5], ["small"])],
                       tmp_path, reference_seed=1, sizes={"small": 10, "big": 20})
    assert [(r.setting, r.name) for r in runs] == [
        ("big", "uniform-s2"), ("big", "uniform-s1"), ("big", "doremi-s2"),
        ("small", "uniform-s2"), ("small", "uniform-s1"), ("small", "doremi-s2"),
        ("big", "uniform-s3"), ("big", "doremi-s3"), ("small", "uniform-s3"),
        ("small", "doremi-s3"), ("big", "@best-fixed-s4"), ("small", "@best-fixed-s4"),
        ("small", "natural-s5")]
    with pytest.raises(SystemExit, match="no setting named"):
        mixing.plan(settings, [(["natural"], [1], ["tiny"])], tmp_path)


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(100, 5.0), (200, 4.0), (300, 3.0)]
    assert mixing.tokens_to_reach(curve, 3.5) == pytest.approx(250)
    assert mixing.tokens_to_reach(curve, 5.5) == 100
    assert mixing.tokens_to_reach(curve, 2.9) is None


def summary(policy: str, seed: int, average: float, worst: float, curve, done=True) -> dict:
    return {"setting": "s", "policy": policy, "seed": seed, "part": "test",
            "tokens": curve[-1][0], "average": average, "worst": worst, "worst_domain": "x",
            "per_domain": {}, "token_weighted": average, "curve": curve, "seconds": 60.0,
            "done": done}


def test_the_table_compares_each_seed_with_the_best_fixed_mixture():
    runs = [
        summary("natural", 1, 3.2, 4.0, [(100, 3.6), (200, 3.2)]),
        summary("uniform", 1, 3.0, 3.5, [(100, 3.4), (200, 3.0)]),
        summary("uniform", 2, 3.1, 3.6, [(100, 3.5), (200, 3.1)]),
        summary("effective-data", 1, 2.9, 3.4, [(100, 3.0), (200, 2.9)]),  # 3.0 at 100: -50%
        summary("effective-data", 2, 3.13, 3.5, [(100, 3.6), (200, 3.13)]),  # +0.03: worse
    ]
    text = mixing.table(runs)
    assert "Best fixed mixture: uniform" in text
    assert ("| effective-data | 1,2 | 3.015 ± 0.163 | -0.035 (-0.100, +0.030) | 1/2 | "
            "3.450 ± 0.071 | -0.100 |") in text
    assert "1/2 seeds (+50.0%)" in text
    verdict = mixing.verdict(runs, "effective-data")
    assert "paired mean -0.0350, worst seed +0.0300" in verdict and "must MISSED" in verdict
    regret = mixing.compare(runs[3], runs[1])["regret"]
    assert regret == [(100, pytest.approx(-0.4)), (200, pytest.approx(-0.1))]


def test_the_gaps_table_puts_each_setting_s_paired_gap_side_by_side_with_the_worst():
    one = [summary("uniform", 1, 3.0, 3.5, [(200, 3.0)]),
           summary("natural", 1, 3.2, 3.9, [(200, 3.2)]),
           summary("effective-data", 1, 3.01, 3.5, [(200, 3.01)])]
    two = [summary("uniform", 1, 3.3, 3.8, [(200, 3.3)]),
           summary("natural", 1, 3.1, 3.6, [(200, 3.1)]),
           summary("natural", 2, 3.2, 3.7, [(200, 3.2)]),
           summary("effective-data", 1, 3.05, 3.5, [(200, 3.05)]),
           summary("effective-data", 2, 3.22, 3.5, [(200, 3.22)]),
           summary("doremi", 1, 3.0, 3.5, [(200, 3.0)])]
    text = mixing.gaps({"one": one, "two": two})
    assert "| policy | one | two | worst |" in text
    assert "| natural | +0.200 (1) | +0.000 (2) | +0.200 |" in text  # natural is two's best
    assert "| uniform | +0.000 (1) | +0.200 (1) | +0.200 |" in text
    assert "| effective-data | +0.010 (1) | -0.015 (2) | +0.010 |" in text
    assert "| doremi | not run | -0.100 (1) | -0.100 |" in text


def test_the_table_joins_an_earlier_sitting_s_rows_and_a_run_done_again_replaces_its_row(
        tmp_path, capsys):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"s": [
        summary("uniform", 1, 3.0, 3.5, [(200, 3.0)]),
        summary("effective-data", 1, 3.5, 3.9, [(200, 3.5)]),  # replaced by newer.json
    ]}))
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps({"s": [summary("effective-data", 1, 3.02, 3.4, [(200, 3.02)])],
                                 "t": [summary("natural", 2, 4.0, 4.5, [(300, 4.0)])]}))
    code = mixing.main(["table", "--out", str(tmp_path / "none"),
                        "--earlier", str(old), "--earlier", str(newer)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "### s: 0.0M tokens (runs of earlier sittings)" in printed and "### t:" in printed
    assert "| effective-data | 1 | 3.020 | +0.020 (+0.020) |" in printed
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(SystemExit, match=r"--earlier .*bad\.json: not a --json file"):
        mixing.main(["table", "--out", str(tmp_path / "none"), "--earlier", str(bad)])


def test_a_run_stopped_between_sittings_resumes_from_its_last_checkpoint(store, tmp_path):
    """--checkpoint-every: a run cut short (here by a smaller max_steps, as a deadline would)
    is resumed by the next sitting from last.ckpt, not restarted, and counted once."""
    out = tmp_path / "runs"
    args = ["run", "--toy", "--out", str(out), "--settings", f"toy={store}:0.03",
            "--wave", "uniform:1", "--gpus", "cpu", "--checkpoint-every", "10"]
    assert mixing.main([*args, "--fit-args", "--trainer.max_steps", "30"]) == 0
    run = mixing.Run("toy", "uniform", 1, out)
    assert run.last_checkpoint.is_file()
    (run.dir / "done.json").unlink()  # as if the deadline had stopped it after step 30
    run.add_sitting(12.5)
    assert mixing.main(args) == 0
    events = [json.loads(line) for line in (run.dir / "tsm/events.jsonl").open()]
    assert [e["step"] for e in events if e["kind"] == "session_start"] == [0, 30]
    steps = json.loads((out / "toy" / "setting.json").read_text())["max_steps"]
    summary = mixing.summarise(run)
    assert summary["tokens"] == steps * 4 * 64
    assert summary["seconds"] > 12.5  # both sittings' wall time


def test_a_doremi_run_waits_for_its_reference_and_names_it(store, tmp_path):
    settings = {"toy": mixing.Setting("toy", store, 0.03)}
    toy = mixing.CONFIGS / "cpu-toy.yaml"
    geometry = {"toy": mixing.Geometry.of(settings["toy"], toy, 4)}
    runs = mixing.plan(list(settings.values()), [(["doremi-natural-ref"], [2], None)], tmp_path)
    scheduler = mixing.Scheduler(runs, ["cpu"], settings, geometry, overlay=toy, extra=[])
    reference, doremi = runs
    assert reference.name == "natural-s1" and not scheduler.ready(doremi)
    reference.dir.mkdir(parents=True)
    (reference.dir / "done.json").write_text("{}")
    assert scheduler.ready(doremi)
    mixing.policy_config(doremi, geometry["toy"], 1)
    assert mixing.reference_of(doremi) == "natural-s1"
    text = (doremi.dir / "policy.yaml").read_text()
    assert f"update_every: {geometry['toy'].eval_interval}" in text and "${" not in text


def test_a_run_stopped_at_a_deadline_is_compared_at_equal_tokens():
    natural = summary("natural", 1, 2.0, 3.0, [(100, 4.0), (200, 3.0), (300, 2.0)])
    uniform = summary("uniform", 1, 2.5, 3.5, [(100, 4.0), (200, 3.2), (300, 2.5)])
    doremi = summary("doremi", 1, 2.9, 3.9, [(100, 3.5), (250, 2.9)], done=False)
    assert mixing.value_at(natural["curve"], 250) == pytest.approx(2.5)
    assert mixing.value_at(natural["curve"], 350) is None
    text = mixing.table([natural, uniform, doremi])
    assert "| doremi" not in text
    stopped = mixing.stopped([natural, uniform, doremi])
    assert "best fixed: natural" in stopped
    assert "| doremi-s1 | 0.0M | 2.900 | 2.500 (natural) | +0.400 | 2.000 | not yet |" in stopped
    # all stopped: each against the best fixed run there, none finished to reach
    runs = [{**natural, "done": False}, {**uniform, "done": False}, doremi]
    assert "| doremi-s1 | 0.0M | 2.900 | 2.500 (natural) | +0.400 | - | - |" in mixing.stopped(
        runs)


@pytest.mark.parametrize("policy", mixing.known_policies())
def test_every_policy_file_filled_by_the_driver_is_a_valid_config(policy, store, tmp_path):
    import contextlib
    import io

    import yaml

    from lightning_aquila.cli import main as run_cli

    setting = mixing.Setting("toy", store, 0.05)
    geometry = mixing.Geometry.of(setting, mixing.CONFIGS / "cpu-toy.yaml", 4)
    filled = mixing.policy_config(mixing.Run("toy", policy, 1, tmp_path), geometry, 1)
    assert "${" not in filled.read_text()
    args = ["fit", "--config", str(mixing.CONFIGS / "base.yaml"), "--config",
            str(mixing.CONFIGS / "cpu-toy.yaml"), "--config", str(filled), "--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        run_cli(args)
    assert done.value.code in (0, None)
    printed = yaml.safe_load(out.getvalue())
    for callback in printed["trainer"]["callbacks"] or []:
        policy_args = callback.get("init_args", {}).get("policy") or {}
        if "update_every" in policy_args.get("init_args", {}):
            assert policy_args["init_args"]["update_every"] in (geometry.eval_interval, 10)
