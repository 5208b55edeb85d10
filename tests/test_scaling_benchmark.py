"""The scaling driver (benchmarks/scaling.py) end to end at toy scale on CPU: the real
``lightning-aquila fit`` path under tensor parallel 2 × FSDP2 2 on four gloo processes, the
table it prints, and the loss curve held against the same configuration at a smaller
data-parallel size; and the memory estimate, on presets built on the meta device."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("scaling_benchmark", REPO / "benchmarks/scaling.py")
scaling = importlib.util.module_from_spec(spec)
sys.modules["scaling_benchmark"] = scaling  # dataclasses look their module up there
spec.loader.exec_module(scaling)

#: 10 steps: the policy's first update is at step 10; a global batch of 4 windows (2 per
#: micro-batch): one micro-batch per step on four processes, two on two.
TOY = ["run", "--toy", "--config", "7b-tp2-dp4", "--steps", "10", "--global-batch", "4"]
RUN = "7b-tp2-dp4-gb4"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Two small domains of the bundled corpus."""
    from lightning_aquila.datamodules.prepare import prepare

    url = str(tmp_path_factory.mktemp("scaling") / "corpus.zarr")
    for domain, name in (("en_legal", "common_licenses"), ("code_c", "brotli")):
        prepare(str(REPO / "corpus" / domain / f"{name}.jsonl"), domain, url, progress=False)
    return url


def driver(*args: str) -> str:
    """``scaling.main(args)``, which must succeed; what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert scaling.main(list(args)) == 0
    return printed.getvalue()


@pytest.fixture(scope="module")
def four(tmp_path_factory, store) -> tuple[Path, str]:
    """The toy run on four processes, TP 2 × DP 2: its folder's parent and the table."""
    out = tmp_path_factory.mktemp("runs")
    return out, driver(*TOY, "--store", store, "--gpus", "4", "--out", str(out))


def test_a_tp2_dp2_run_reads_throughput_mfu_and_the_loss_curve_from_the_monitor(four):
    out, printed = four
    result = json.loads((out / f"{RUN}-4gpu" / "scaling.json").read_text())
    assert (result["tp"], result["dp"], result["micro_batch"], result["accumulate"]) == (2, 2, 2, 1)
    assert result["tokens_per_sec_per_gpu"] > 0 and result["mfu"] > 0
    assert result["peak_memory_gib"] is None  # the allocator's peak is CUDA's
    assert sorted(result["losses"], key=int) == [str(s) for s in range(1, 11)]
    assert all(math.isfinite(v) for v in result["losses"].values())
    events = [json.loads(line) for line in (out / f"{RUN}-4gpu/tsm/events.jsonl").open()]
    updates = [e for e in events if e["kind"] == "mixture" and e["step"] == 10]
    assert updates and updates[0]["reason"].startswith("BanditMixture")  # the default policy
    layout = (out / f"{RUN}-4gpu" / "layout.yaml").read_text()
    assert "tensor_parallel_size: 2" in layout and "accumulate_grad_batches: 1" in layout
    assert f"| {RUN}-4gpu | cpu | 4 | 2 × 2 | 2 × 1 |" in printed


def test_at_a_smaller_data_parallel_size_the_loss_curve_is_the_same_step_for_step(four, store):
    """TP 2 × DP 1 accumulating two micro-batches: the same global batches (the DMU's
    sequence), the same initial weights (the meta-device init is layout-free), fp32, and the
    policy's update at step 10 takes the same weights: only summation order differs."""
    out, _ = four
    printed = driver(*TOY, "--store", store, "--gpus", "2", "--out", str(out))
    assert f"| {RUN}-2gpu | cpu | 2 | 2 × 1 | 2 × 2 |" in printed
    row = next(line for line in printed.splitlines() if line.startswith(f"| {RUN}-4gpu"))
    assert "vs DP 1, 10 steps" in row and "2: " in row  # efficiency against the 2-process run
    compared = driver("compare", str(out / f"{RUN}-4gpu"), str(out / f"{RUN}-2gpu"),
                      "--tolerance", "1e-5")
    assert "10 common steps (1-10)" in compared


def test_compare_reports_the_largest_gap_and_where_it_is():
    a = {1: 10.0, 2: 9.0, 3: 8.0, 4: 7.5}
    b = {1: 10.0, 2: 9.5, 3: 8.1, 5: 7.0}
    diff = scaling.compare_curves(a, b)
    assert (diff["steps"], diff["max_abs_diff"], diff["at_step"]) == (3, 0.5, 2)
    assert diff["mean_abs_diff"] == pytest.approx(0.2)


def test_each_configuration_is_the_layout_its_comments_describe():
    layouts = {name: scaling.layout_of(scaling.merged(
        scaling.read_yaml(scaling.CONFIGS / "base.yaml"),
        scaling.read_yaml(scaling.CONFIGS / f"{name}.yaml")))
        for name in ("7b-fsdp", "7b-tp2-dp4", "34b-tp4-dp2", "34b-tp8")}
    summary = {name: (lay.preset, lay.gpus, lay.tp, lay.dp, lay.micro_batch, lay.seq_len,
                      lay.global_batch, lay.activation_checkpointing)
               for name, lay in layouts.items()}
    assert summary == {
        "7b-fsdp": ("aquila2-7b", 8, 1, 8, 1, 4096, 8, False),
        "7b-tp2-dp4": ("aquila2-7b", 8, 2, 4, 2, 4096, 8, False),
        "34b-tp4-dp2": ("aquila2-34b", 8, 4, 2, 2, 4096, 4, True),
        "34b-tp8": ("aquila2-34b", 8, 8, 1, 4, 4096, 4, True),
    }


@pytest.mark.parametrize("name", ["7b-fsdp", "7b-tp2-dp4", "34b-tp4-dp2", "34b-tp8"])
def test_each_configuration_parses_on_top_of_the_base(name, monkeypatch):
    from test_configs import print_config

    monkeypatch.setattr(sys, "argv", ["lightning-aquila"])
    printed = print_config("configs/scaling/base.yaml", f"configs/scaling/{name}.yaml")
    assert printed["data"]["init_args"]["seq_len"] == 4096
    callbacks = [c["class_path"].rsplit(".", 1)[-1] for c in printed["trainer"]["callbacks"]]
    assert callbacks == ["TrainingStateMonitor", "AdaptiveTrainingEngine"]


# -- memory ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "published"), [("aquila2-7b", 7_295_537_152),
                                                   ("aquila2-34b", 33_693_554_688)])
def test_presets_built_on_the_meta_device_count_their_parameters_exactly(preset, published):
    from lightning_aquila import AquilaConfig

    config = AquilaConfig.from_name(preset)
    assert sum(scaling.local_parameter_numels(config, 1, 1).values()) == published
    # Over TP 4 x DP 2 every GPU holds an eighth, but for FSDP2's padding of uneven shards
    shards = scaling.local_parameter_numels(config, 4, 2)
    assert 0 <= 8 * sum(shards.values()) - published < 8 * len(shards) * config.hidden_size
    # the norms stay whole under TP; the column- and row-parallel weights are split
    assert shards["layers.0.attention_norm.weight"] == config.hidden_size // 2
    assert shards["layers.0.attention.q_proj.weight"] == config.hidden_size ** 2 // 8
    assert shards["layers.0.mlp.down_proj.weight"] == (
        config.hidden_size * config.intermediate_size // 8)


def test_adamw8bit_state_is_a_quarter_of_adamws_for_large_tensors():
    assert scaling.adamw8bit_bytes(1 << 20) == 2 * (1 << 20) + 2 * 4 * (1 << 12)
    assert scaling.adamw8bit_bytes(4095) == 8 * 4095  # small tensors keep fp32 moments


def test_the_estimate_is_within_ten_percent_of_the_measured_fsdp_runs():
    """The two aquila_fsdp rows of 2026-11-23 (benchmarks/results/strategies_history_2026-11.md,
    raw rows below): aquila2-1b, sequence
    2,048, bf16, no activation checkpointing, 8 windows on one H100 and 4 per GPU on two
    H200s; peak memory from torch.cuda.max_memory_allocated."""
    measured = []
    for path in ("strategies_h100_2026-11-23.jsonl", "strategies_h200x2_2026-11-23.jsonl"):
        for line in (REPO / "benchmarks" / "results" / path).read_text().splitlines():
            row = json.loads(line)
            if row["strategy"] == "aquila_fsdp":
                measured.append(row)
    assert [r["devices"] for r in measured] == [1, 2]
    for row in measured:
        layout = scaling.Layout(preset=row["preset"], gpus=row["devices"], tp=1,
                                micro_batch=row["micro_batch"], seq_len=row["seq_len"],
                                global_batch=row["global_batch"])
        estimate = scaling.estimate_memory(layout)["total"] / scaling.GiB
        assert estimate == pytest.approx(row["peak_mem_GiB"], rel=0.1)


def test_selective_checkpointing_is_estimated_block_by_block():
    """every_2 keeps the input of the blocks it checkpoints and everything of the others (and
    one block while it is recomputed); op is not modelled: counted as no checkpointing."""
    from dataclasses import replace

    from lightning_aquila import AquilaConfig

    layout = scaling.Layout(preset="aquila2-7b", gpus=4, tp=1, micro_batch=1, seq_len=4096,
                            global_batch=4)
    config = AquilaConfig.from_name("aquila2-7b", max_seq_len=4096)
    per, half = scaling.activation_bytes_per_token(config, 1), config.num_layers // 2

    def activations(mode):
        return scaling.estimate_memory(replace(layout, activation_checkpointing=mode))[
            "activations"]

    assert activations("every_2") == pytest.approx(4096 * (
        half * per["block_input"] + (half + 1) * per["block"] + per["final_norm"]))
    assert activations(True) == activations("full") == pytest.approx(4096 * (
        config.num_layers * per["block_input"] + per["block"] + per["final_norm"]))
    assert activations("op") == activations(False) == activations("none")
    assert [scaling.as_activation_checkpointing(t) for t in ("true", "off", "op", "every_2")] \
        == [True, False, "op", "every_2"]


def test_the_memory_table_in_the_docs_is_what_the_estimate_prints():
    docs = (REPO / "docs" / "scaling.md").read_text()
    assert scaling.memory_table(scaling.planned_layouts()) in docs
