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

from lightning_aquila.cli import run_cli


@pytest.fixture(autouse=True)
def bare_argv(monkeypatch):
    """LightningCLI warns when given args while sys.argv holds pytest's."""
    monkeypatch.setattr(sys, "argv", ["lightning-aquila"])


REPO = Path(__file__).resolve().parents[1]
FIT_CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*.yaml"))
#: Overlays, given after the quickstart config as their comments say.
OVERLAYS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").glob("*/*.yaml"))


def print_config(*configs: str) -> dict:
    args = ["fit", *[a for c in configs for a in ("--config", str(REPO / c))], "--print_config"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        run_cli(args)
    assert done.value.code in (0, None)
    return yaml.safe_load(out.getvalue())


def test_the_configs_are_found():
    assert "configs/quickstart.yaml" in FIT_CONFIGS and len(FIT_CONFIGS) >= 7
    assert len(OVERLAYS) >= 4


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


def test_a_typo_in_a_config_is_an_error_naming_the_key(tmp_path, capsys):
    config = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    config["model"]["learning_rte"] = config["model"].pop("learning_rate")
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as done:
        run_cli(["fit", "--config", str(path), "--print_config"])
    assert done.value.code != 0
    assert "learning_rte" in capsys.readouterr().err
