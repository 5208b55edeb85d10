"""Every shipped YAML config parses through ``lightning-aquila fit --print_config`` (the parser
checks every class path, argument name and type without building anything), and a typo in
one fails naming the key."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import yaml

from lightning_aquila.cli.trainer import run_cli


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """LightningCLI warns when given args while sys.argv holds pytest's."""
    monkeypatch.setattr(sys, "argv", ["lightning-aquila"])


REPO = Path(__file__).resolve().parents[1]


def is_overlay(path: Path) -> bool:
    """An overlay is given after another config (it has no model of its own)."""
    return "model" not in (yaml.safe_load(path.read_text()) or {})


FIT_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.yaml")
                     if not is_overlay(p))
#: Overlays, given after the quickstart config as their comments say. The mixing benchmark's
#: policy files are templates the driver fills (``${eval_interval}``): tests/
#: test_mixing_benchmark.py prints each filled one.
OVERLAYS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")
                  if is_overlay(p) and "${" not in p.read_text())


def print_config(*configs: str) -> dict:
    args = ["fit", *[a for c in configs for a in ("--config", str(REPO / c))], "--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        run_cli(args)
    assert done.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_the_configs_are_found():
    assert "configs/quickstart.yaml" in FIT_CONFIGS and len(FIT_CONFIGS) >= 7
    assert "configs/quickstart-reference.yaml" in OVERLAYS and len(OVERLAYS) >= 5


@pytest.mark.parametrize("path", FIT_CONFIGS)
def test_each_fit_config_prints(path):
    written = yaml.safe_load((REPO / path).read_text())
    printed = print_config(path)
    assert printed["model"]["preset"] == written["model"]["preset"]
    strategy = written.get("trainer", {}).get("strategy")
    if isinstance(strategy, str):
        assert printed["trainer"]["strategy"] == strategy
    assert printed["data"]["class_path"] == written["data"]["class_path"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_each_overlay_prints_on_top_of_the_quickstart(path):
    overlay = yaml.safe_load((REPO / path).read_text())
    printed = print_config("configs/quickstart.yaml", path)
    logger = overlay.get("trainer", {}).get("logger")
    if logger:
        assert printed["trainer"]["logger"]["class_path"] == logger["class_path"]
    callbacks = overlay.get("trainer", {}).get("callbacks")
    if callbacks:  # merged by position or replaced: either way the overlay's classes, in order
        def names(entries):
            return [c["class_path"].rsplit(".", 1)[1] for c in entries]

        assert names(printed["trainer"]["callbacks"]) == names(callbacks)


def test_a_typo_in_a_config_is_an_error_naming_the_key(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    config["model"]["learning_rte"] = config["model"].pop("learning_rate")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as done:
        run_cli(["fit", "--config", str(path), "--print_config"])
    assert done.value.code != 0
    assert "learning_rte" in capsys.readouterr().err


def test_the_quickstart_reference_run_is_the_quickstart_on_the_uniform_mixture_with_no_policy():
    main = print_config("configs/quickstart.yaml")
    reference = print_config("configs/quickstart.yaml", "configs/quickstart-reference.yaml")
    assert reference["model"] == main["model"]
    assert reference["seed_everything"] == main["seed_everything"]
    for key in ("accelerator", "devices", "precision", "max_steps", "val_check_interval",
                "check_val_every_n_epoch", "limit_val_batches", "gradient_clip_val"):
        assert reference["trainer"][key] == main["trainer"][key], key
    data = {k: v for k, v in main["data"]["init_args"].items() if k != "weights"}
    assert {k: v for k, v in reference["data"]["init_args"].items() if k != "weights"} == data
    assert reference["data"]["init_args"]["weights"] == "uniform"
    kinds = [c["class_path"].rsplit(".", 1)[1] for c in reference["trainer"]["callbacks"]]
    assert kinds == ["TrainingStateMonitor", "ModelCheckpoint"]  # no engine, no policy
    assert reference["trainer"]["callbacks"][0]["init_args"]["val_loss"]
    assert reference["trainer"]["callbacks"][1]["init_args"]["save_last"]  # --ckpt_path last


def test_the_quickstart_plans_with_effective_data_from_unimax_with_the_monitor_and_rollback_on():
    main = print_config("configs/quickstart.yaml")
    engine = main["trainer"]["callbacks"][-1]  # last: one flag changes its policy
    assert engine["class_path"].endswith("AdaptiveTrainingEngine")
    policy = engine["init_args"]["policy"]
    assert policy["class_path"].endswith("EffectiveDataMixture") and engine["init_args"]["rollback"]
    assert policy["init_args"]["update_every"] == main["trainer"]["val_check_interval"]
    assert main["trainer"]["callbacks"][0]["class_path"].endswith("TrainingStateMonitor")
    assert main["data"]["init_args"]["weights"] == "unimax:4"


def test_the_doremi_recipe_reads_what_the_reference_run_writes():
    reference = print_config("configs/quickstart.yaml", "configs/quickstart-reference.yaml")
    written = Path(reference["trainer"]["default_root_dir"]) / "tsm" / "metrics.jsonl"
    recipe = (REPO / "configs/quickstart-reference.yaml").read_text()
    assert f"--trainer.callbacks.init_args.policy.reference {written}" in recipe
