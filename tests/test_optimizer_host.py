"""benchmarks/optimizer_host.py: its two layouts describe the same model (ours and litgpt's
tensor split of one preset), and it runs on the CPU (the GPU sitting only measures)."""

import json
import sys

import pytest
import torch
from helpers.benchmark_script import load_benchmark

from lightning_aquila.model import AquilaConfig

pytest.importorskip("torchao", reason="the benchmark times torchao's AdamW8bit")


def _benchmark():
    return load_benchmark("optimizer_host.py")


@pytest.mark.parametrize("preset", ["aquila2-7b", "aquila2-1b"])
def test_both_layouts_hold_the_preset_s_parameters(preset):
    """The 7B's 291 tensors in our layout and 227 in litgpt's (fused qkv and fc), the same
    parameter count in both; decay on matrices only in ours, on everything in litgpt's."""
    bench, config = _benchmark(), AquilaConfig.from_name(preset)
    ours, theirs = bench.aquila_layout(config), bench.litgpt_layout(config)
    for layout in (ours, theirs):
        assert sum(torch.Size(shape).numel() for shape, _ in layout) == config.num_params
    assert len(ours) == 9 * config.num_layers + 3 and len(theirs) == 7 * config.num_layers + 3
    assert {decay for shape, decay in ours if len(shape) == 1} == {0.0}
    assert {decay for _, decay in theirs} == {0.1}


def test_the_benchmark_prints_and_writes_a_row_per_layout_and_optimizer(tmp_path, monkeypatch,
                                                                        capsys):
    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)  # eager: seconds, not minutes
    out = tmp_path / "rows.jsonl"
    monkeypatch.setattr(sys, "argv", ["optimizer_host.py", "--preset", "aquila2-tiny",
                                      "--shrink", "4", "--steps", "1", "--warmup", "1",
                                      "--device", "cpu", "--out", str(out)])
    _benchmark().main()
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["layout"], r["impl"]) for r in rows] == [
        ("aquila", "torchao"), ("aquila", "aquila"), ("litgpt", "torchao"), ("litgpt", "aquila")]
    assert all(r["host_ms"] > 0 and r["wall_ms"] >= r["host_ms"] for r in rows)
    table = [line.split(" | ")[0] for line in capsys.readouterr().out.splitlines()]
    assert table.count("| aquila") == 2 and table.count("| litgpt") == 2
