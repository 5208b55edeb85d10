"""benchmarks/fit_throughput.py runs end to end on CPU (the GPU session only measures)."""

import dataclasses
import sys
from pathlib import Path

import pytest
from helpers.benchmark_script import load_benchmark

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    return load_benchmark("fit_throughput.py")


def _step_memory():
    sys.path.insert(0, str(REPO / "benchmarks"))
    import step_memory

    return step_memory


def test_fit_benchmark_smoke_runs_plain_and_fit_rows_and_skips_missing_kernels(capsys):
    rows = _benchmark().main(["--device", "cpu", "--tiny",
                              "--rows", "aquila-plain,fit-best,fit-flash,fit-float8"])
    by_name = {row["row"]: row for row in rows}
    assert by_name["aquila-plain"]["tokens_per_sec"] > 0
    assert by_name["fit-best"]["tokens_per_sec"] > 0 and by_name["fit-best"]["tsm_ate"]
    assert by_name["fit-best"]["loss_impl"] == "chunked"
    flash = by_name["fit-flash"]
    assert "tokens_per_sec" in flash or "flash-attn-4" in flash["skipped"]
    float8 = by_name["fit-float8"]  # emulated on the CPU: it runs, slowly
    assert float8.get("tokens_per_sec", 0) > 0 or "torchao" in float8.get("skipped", "")
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


def test_memory_adds_untimed_steps_whose_phases_the_cpu_reports_as_not_measured(tmp_path):
    """``--memory DIR`` on the CPU: the rows run their extra steps and say that phases are not
    measured there (no CUDA allocator), instead of failing; the timed steps are the same."""
    rows = _benchmark().main(["--device", "cpu", "--tiny", "--rows", "aquila-plain,fit-best",
                              "--memory", str(tmp_path), "--memory-steps", "2"])
    for row in rows:
        assert row["memory"] == {"steps": 2, "measured": False,
                                 "reason": "no CUDA device: phases are not measured on the CPU"}
        assert len(row["losses"]) == 2 and row["peak_mem_GiB"] is None
    assert list(tmp_path.iterdir()) == []  # no snapshot without a CUDA allocator


def test_step_memory_marks_phases_in_order_and_refuses_unknown_ones(tmp_path):
    memory = _step_memory().StepMemory(tmp_path, "row", first=1, count=1, cuda=False)
    memory.phase("forward")  # before its first step: ignored
    memory.step(0)
    assert memory.summary is None
    memory.step(1)
    memory.phase("forward")
    with pytest.raises(ValueError, match="phase 'loss' is not one of"):
        memory.phase("loss")
    memory.step(2)
    assert memory.summary["measured"] is False and memory.steps == 1


def test_activation_checkpointing_and_adamw8bit_reach_plain_and_fit_rows():
    """The long-sequence and 7B rows' settings, on the tiny shape: every row runs with them
    and records them, the litgpt peer included (adamw8bit needs torchao, the peer litgpt;
    without them the rows say so)."""
    rows = _benchmark().main(["--device", "cpu", "--tiny",
                              "--rows", "litgpt,aquila-plain,fit-best,fit-best-no-clip",
                              "--activation-checkpointing", "full", "--optimizer", "adamw8bit"])
    for row in rows:
        if "skipped" in row:
            assert "torchao" in row["skipped"] or "litgpt is not installed" in row["skipped"]
            continue
        assert row["tokens_per_sec"] > 0
        assert row["activation_checkpointing"] == "full" and row["optimizer"] == "adamw8bit"
        if row["row"].startswith("fit-"):  # the no-clip row is the 7B sitting's clip check
            assert row["gradient_clip_val"] == (None if row["row"].endswith("no-clip") else 1.0)


def test_an_unknown_activation_checkpointing_mode_is_refused_before_any_row_runs(capsys):
    with pytest.raises(SystemExit):
        _benchmark().parse_args(["--activation-checkpointing", "most"])
    assert "activation_checkpointing='most' is not one of" in capsys.readouterr().err


def test_fit_rows_take_the_store_tokenizers_special_ids_when_the_preset_has_aquila2s(
        monkeypatch):
    """The benchmark's store is tokenized with the bundled tokenizer (bos 8190), while the
    1B preset carries Aquila2's ids (bos 100006): the fit rows must take the store's ids, or
    the run's tokenizer check refuses every fit row (as it did on the GPU on 2026-12-07). A
    tiny shape with Aquila2's vocabulary stands in for the 1B preset."""
    from lightning_aquila.model import config as model_config

    aquila_ids = model_config.AquilaConfig.from_name("aquila2-1b")
    tiny = dataclasses.replace(
        model_config.PRESETS["aquila2-tiny"], name="aquila2-tiny-aquila-vocab",
        vocab_size=aquila_ids.vocab_size, bos_token_id=aquila_ids.bos_token_id,
        eos_token_id=aquila_ids.eos_token_id)
    monkeypatch.setitem(model_config.PRESETS, tiny.name, tiny)
    rows = _benchmark().main(["--device", "cpu", "--tiny", "--preset", tiny.name,
                              "--rows", "fit-best"])
    assert rows[0].get("tokens_per_sec", 0) > 0, rows[0]
    assert rows[0]["preset"] == tiny.name


def test_every_row_the_gpu_scripts_ask_for_exists():
    """A row name the benchmark does not know stops its whole process before any row runs,
    which on the GPU costs the call: every ``--rows`` list in benchmarks/device_perf.sh must
    name known rows (rows were renamed and removed before)."""
    import re

    benchmark = _benchmark()
    known = {*benchmark.PLAIN_ROWS, *benchmark.FIT_ROWS}
    script = (REPO / "benchmarks" / "device_perf.sh").read_text()
    lists = re.findall(r"--rows ([A-Za-z0-9,-]+)", script)
    assert len(lists) >= 10
    unknown = {name for names in lists for name in names.split(",")} - known
    assert not unknown, f"device_perf.sh asks for unknown rows {sorted(unknown)}"


def test_kernel_diff_names_the_kernels_whose_gpu_time_differs_most(tmp_path, capsys):
    """``step_profile.py --diff``: per-step GPU time by kernel in two traces; inductor's kernel
    numbers and PyTorch's multi-tensor templates collapse into comparable names, and host
    events are not counted."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import json

    import step_profile

    def kernel(name, dur, cat="kernel"):
        return {"ph": "X", "cat": cat, "name": name, "ts": 0, "dur": dur}

    adam = ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::"
            "(anonymous namespace)::FusedOptimizerTensorListMetadata<4>, at::native::(anonymous "
            "namespace)::FusedAdamMathFunctor<float, 4, ...>>")
    norm = adam.replace("FusedAdamMathFunctor", "LpNormFunctor")
    base = [kernel("triton_red_fused_mean_3", 2000), kernel(adam, 6000),
            kernel("cudaLaunchKernel", 9000, cat="cuda_runtime")]
    other = [kernel("triton_red_fused_mean_7", 2000), kernel(adam, 7000),
             kernel(norm, 1000), kernel(norm, 1000)]
    paths = []
    for name, events in (("base", base), ("other", other)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"traceEvents": events}))
    times = step_profile.kernel_times(paths[1], steps=2)
    assert times == {"triton_red_fused_mean": (1.0, 0.5),
                     "multi_tensor_apply_kernel<FusedAdamMathFunctor>": (3.5, 0.5),
                     "multi_tensor_apply_kernel<LpNormFunctor>": (1.0, 1.0)}
    step_profile.print_kernel_diff(*paths, steps=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[2] == "| (all, overlaps counted twice) | 4.00 | 5.50 | +1.50 | |"
    assert lines[3] == ("| `multi_tensor_apply_kernel<LpNormFunctor>` | 0.00 | 1.00 | +1.00 "
                        "| 0 / 1 |")
    assert lines[4].startswith("| `multi_tensor_apply_kernel<FusedAdamMathFunctor>` | 3.00 | "
                               "3.50 | +0.50 |")
    assert lines[-1].startswith("| `triton_red_fused_mean` | 1.00 | 1.00 | +0.00 |")
