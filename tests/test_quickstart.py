"""``make quickstart`` as a recipe: which commands it runs, in which order, and what a second
``make quickstart`` runs again. The ``lightning-aquila`` it calls is a recorder (a shell
script that logs its arguments and creates the run folder), so this takes a second; the fits
themselves are tested in test_cli (the quickstart config) and test_configs (its reference)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOMAINS = sorted(p.name for p in (REPO / "corpus").iterdir() if p.is_dir())

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

RECORDER = """#!/bin/sh
echo "$*" >> "{log}"
case "$*" in
  *quickstart-reference.yaml*) [ -n "$FAIL_REFERENCE" ] && exit 1 ;;
esac
while [ $# -gt 0 ]; do
  [ "$1" = --trainer.default_root_dir ] && mkdir -p "$2"
  shift
done
exit 0
"""


def make_quickstart(tmp_path: Path, **env: str) -> tuple[int, list[str]]:
    """Run ``make quickstart`` with the recorder as ``$(BIN)/lightning-aquila`` and the run
    folder in ``tmp_path``; its exit code and the recorded commands."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    installed = tmp_path / "installed"  # the venv stamp, newer than pyproject.toml
    if not bin_dir.exists():
        bin_dir.mkdir()
        (bin_dir / "lightning-aquila").write_text(RECORDER.format(log=log))
        (bin_dir / "lightning-aquila").chmod(0o755)
        installed.touch()
    log.write_text("")
    done = subprocess.run(
        ["make", "-C", str(REPO), "--no-print-directory", "quickstart", f"BIN={bin_dir}",
         f"STAMP={installed}", f"RUN_DIR={tmp_path / 'runs' / 'quickstart'}"],
        env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    return done.returncode, log.read_text().splitlines()


def test_make_quickstart_trains_the_reference_then_doremi_on_it_then_reports_both(tmp_path):
    run, reference = tmp_path / "runs" / "quickstart", tmp_path / "runs" / "quickstart-reference"
    store = run / "corpus.zarr"
    code, calls = make_quickstart(tmp_path)
    assert code == 0
    prepares = calls[:len(DOMAINS)]
    assert sorted(c.split("--domain ")[1].split()[0] for c in prepares) == DOMAINS
    assert all(f"--output {store} " in c for c in prepares)
    assert calls[len(DOMAINS):] == [
        f"inspect {store}",
        f"fit --config configs/quickstart.yaml --config configs/quickstart-reference.yaml "
        f"--trainer.default_root_dir {reference} --data.init_args.store {store} "
        "--ckpt_path last",
        f"fit --config configs/quickstart.yaml --trainer.default_root_dir {run} "
        f"--data.init_args.store {store} --trainer.callbacks.init_args.policy.init_args."
        f"reference {reference}/tsm/metrics.jsonl --ckpt_path last",
        f"report {run}",
        f"report --compare {reference} {run} --labels uniform (reference) DoReMi "
        f"--output {run}/compare.png",
    ]


def test_a_second_make_quickstart_skips_the_finished_reference_and_resumes_the_run(tmp_path):
    assert make_quickstart(tmp_path)[0] == 0
    code, calls = make_quickstart(tmp_path)
    assert code == 0
    fits = [c for c in calls if c.startswith("fit ")]
    assert len(fits) == 1 and "quickstart-reference.yaml" not in fits[0]
    assert fits[0].endswith("--ckpt_path last")


def test_a_failed_reference_run_stops_make_quickstart_and_runs_again_next_time(tmp_path):
    code, calls = make_quickstart(tmp_path, FAIL_REFERENCE="1")
    assert code != 0
    assert "quickstart-reference.yaml" in calls[-1]  # nothing after the failed fit
    code, calls = make_quickstart(tmp_path)
    assert code == 0
    fits = [c for c in calls if c.startswith("fit ")]
    assert len(fits) == 2 and "quickstart-reference.yaml" in fits[0]
