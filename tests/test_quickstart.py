"""``make quickstart`` as a recipe: which commands it runs, in which order, and what a second
``make quickstart`` runs again. The ``lightning-aquila`` it calls is a recorder (a shell
script that logs its arguments and creates the run folder), so this takes a second; the fit
itself is tested in test_cli (the quickstart config)."""

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
  fit*) [ -n "$FAIL_FIT" ] && exit 1 ;;
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


def test_make_quickstart_prepares_the_corpus_trains_one_run_and_reports_it(tmp_path):
    run = tmp_path / "runs" / "quickstart"
    store = run / "corpus.zarr"
    code, calls = make_quickstart(tmp_path)
    assert code == 0
    prepares = calls[:len(DOMAINS)]
    assert sorted(c.split("--domain ")[1].split()[0] for c in prepares) == DOMAINS
    assert all(f"--output {store} " in c for c in prepares)
    assert calls[len(DOMAINS):] == [
        f"inspect {store}",
        f"fit --config configs/quickstart.yaml --trainer.default_root_dir {run} "
        f"--data.init_args.store {store} --ckpt_path last",
        f"report {run}",
    ]


def test_a_second_make_quickstart_resumes_the_run(tmp_path):
    assert make_quickstart(tmp_path)[0] == 0
    code, calls = make_quickstart(tmp_path)
    assert code == 0
    fits = [c for c in calls if c.startswith("fit ")]
    assert len(fits) == 1 and fits[0].endswith("--ckpt_path last")


def test_a_failed_fit_stops_make_quickstart_before_the_report(tmp_path):
    code, calls = make_quickstart(tmp_path, FAIL_FIT="1")
    assert code != 0 and calls[-1].startswith("fit ")
