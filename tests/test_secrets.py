"""The Neptune API token is read from the environment only and written nowhere.

A real ``lightning-aquila fit`` (subprocess, aquila2-tiny, the monitor and the engine, our
``NeptuneLogger`` on the real client in offline mode, checkpoints) runs with a sentinel token
in ``NEPTUNE_API_TOKEN``, then ``lightning-aquila report`` and ``--print_config``; every byte
of the run directory (saved config, logs, checkpoints, TSM run files, report, the client's
offline queue) and the printed config are searched for the token.
"""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path

import pytest
import yaml
from crash_helpers import harness

from lightning_aquila.loggers import NeptuneLogger

SENTINEL = "npt-sentinel-7d1e93b0c4a2"  # a fake token: only its absence is tested


@pytest.fixture(scope="module")
def secret_store(corpus_store: str) -> str:
    return corpus_store


def neptune_config(run: Path, store: str) -> Path:
    """The crash harness's fit config, shortened, with the Neptune logger (offline: a team
    with a token and a project set can still choose not to upload)."""
    path = harness.fit_config(run, store)
    config = yaml.safe_load(path.read_text())
    config["trainer"]["max_steps"] = 6
    config["trainer"]["logger"] = {
        "class_path": "lightning_aquila.loggers.NeptuneLogger",
        "init_args": {"mode": "offline", "name": "secrets", "save_dir": str(run),
                      "data_directory": str(run / "neptune"), "tags": ["secrets-test"]}}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def files_holding(root: Path, secret: str) -> list[Path]:
    return [p for p in sorted(root.rglob("*")) if p.is_file() and secret.encode() in p.read_bytes()]


def test_the_token_is_not_an_argument_of_the_logger():
    """Only the environment can give it: no config or command line carries it."""
    parameters = inspect.signature(NeptuneLogger).parameters
    assert not [name for name in parameters if "token" in name or "key" in name]


def test_the_neptune_token_is_written_nowhere_in_the_run_directory(secret_store, tmp_path):
    run = tmp_path / "run"
    config = neptune_config(run, secret_store)
    env = harness.environment(NEPTUNE_API_TOKEN=SENTINEL, NEPTUNE_PROJECT="team/aquila")
    harness.finish(run, harness.start(run, harness.fit_command(config), env))
    report = subprocess.run([str(harness.CLI), "report", str(run)], env=env, cwd=run,
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    printed = subprocess.run([str(harness.CLI), "fit", "--config", str(config),
                              "--print_config"], env=env, capture_output=True, text=True,
                             timeout=300)
    assert printed.returncode == 0, printed.stderr
    assert "NeptuneLogger" in printed.stdout and SENTINEL not in printed.stdout

    # what a run directory holds, so the search below covers real files of every kind
    names = {p.name for p in run.rglob("*") if p.is_file()}
    assert {"config.yaml", "last.ckpt", "metrics.jsonl", "events.jsonl", "report.html",
            "report.png", "launches.log"} <= names, sorted(names)
    queue = list((run / "neptune" / "offline").rglob("data-*.log"))
    assert queue and all(q.stat().st_size > 0 for q in queue)  # the client did write the run
    assert files_holding(run, SENTINEL) == []
    assert files_holding(run, "NEPTUNE_API_TOKEN") == []
