"""``make quickstart`` as a recipe: which commands it runs, in which order, and what a second
``make quickstart`` runs again. The ``lightning-aquila`` it calls is a recorder (a shell
script that logs each call's arguments one by one, so their boundaries are checked too, and
creates the run folder), so this takes a second; the fit itself is tested in test_cli (the
quickstart config)."""

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
printf '%s\\037' "$@" >> "{log}"
echo >> "{log}"
case "$*" in
  fit*) [ -n "$FAIL_FIT" ] && exit 1 ;;
esac
while [ $# -gt 0 ]; do
  [ "$1" = --trainer.default_root_dir ] && mkdir -p "$2"
  shift
done
exit 0
"""


def make_quickstart(tmp_path: Path, **env: str) -> tuple[int, list[list[str]]]:
    """Run ``make quickstart`` with the recorder as ``$(BIN)/lightning-aquila`` and the run
    folder in ``tmp_path``; its exit code and each recorded call's argument list."""
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
    return done.returncode, [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]


def test_make_quickstart_prepares_the_corpus_trains_one_run_and_reports_it(tmp_path):
    run = tmp_path / "runs" / "quickstart"
    store = run / "corpus.zarr"
    code, calls = make_quickstart(tmp_path)
    assert code == 0
    prepares = calls[:len(DOMAINS)]
    assert sorted(c[c.index("--domain") + 1] for c in prepares) == DOMAINS
    for call in prepares:
        domain = call[call.index("--domain") + 1]
        assert call == ["prepare", "--input", f"corpus/{domain}/*.jsonl", "--domain", domain,
                        "--output", str(store), "--held-out-fraction", "0.1", "--quiet"]
    assert calls[len(DOMAINS):] == [
        ["inspect", str(store)],
        ["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(run),
         "--data.init_args.store", str(store), "--ckpt_path", "last"],
        ["report", str(run)],
    ]


def test_a_second_make_quickstart_resumes_the_run(tmp_path):
    assert make_quickstart(tmp_path)[0] == 0
    code, calls = make_quickstart(tmp_path)
    assert code == 0
    fits = [c for c in calls if c[0] == "fit"]
    assert len(fits) == 1 and fits[0][-2:] == ["--ckpt_path", "last"]


def test_a_failed_fit_stops_make_quickstart_before_the_report(tmp_path):
    code, calls = make_quickstart(tmp_path, FAIL_FIT="1")
    assert code != 0 and calls[-1][0] == "fit"
