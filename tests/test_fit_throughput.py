"""benchmarks/fit_throughput.py runs end to end on CPU (the GPU session only measures)."""

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location(
        "fit_throughput", REPO / "benchmarks" / "fit_throughput.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fit_throughput"] = module
    spec.loader.exec_module(module)
    return module


def test_fit_benchmark_smoke_runs_plain_and_fit_rows_and_skips_missing_kernels(capsys):
    rows = _benchmark().main(["--device", "cpu", "--tiny",
                              "--rows", "aquila-plain,fit-best,fit-flash,fit-float8,"
                              "fit-liger-all"])
    by_name = {row["row"]: row for row in rows}
    assert by_name["aquila-plain"]["tokens_per_sec"] > 0
    assert by_name["fit-best"]["tokens_per_sec"] > 0 and by_name["fit-best"]["tsm_ate"]
    assert by_name["fit-best"]["loss_impl"] == "chunked"
    flash = by_name["fit-flash"]
    assert "tokens_per_sec" in flash or "flash-attn-4" in flash["skipped"]
    float8 = by_name["fit-float8"]  # emulated on the CPU: it runs, slowly
    assert float8.get("tokens_per_sec", 0) > 0 or "torchao" in float8.get("skipped", "")
    liger = by_name["fit-liger-all"]  # Triton kernels: a GPU row
    assert "liger" in liger["skipped"]
    assert "| fit-best |" in capsys.readouterr().out


def test_profile_adds_untimed_steps_with_a_trace_and_a_summary_per_row(tmp_path):
    rows = _benchmark().main(["--device", "cpu", "--tiny", "--rows", "aquila-plain,fit-best",
                              "--profile", str(tmp_path), "--profile-steps", "2"])
    for row in rows:
        summary = row["profile"]
        assert summary["steps"] == 2 and summary["wall_ms_per_step"] > 0
        assert summary["gpu_idle_fraction"] is None  # no GPU kernels on the CPU
        assert (tmp_path / f"{row['row']}.trace.json.gz").stat().st_size > 0
        assert row["loss_first"] is not None  # the timed steps' losses, not the profiled ones
