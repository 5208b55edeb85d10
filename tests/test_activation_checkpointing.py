"""``AquilaLM(activation_checkpointing=...)``: full, every N-th block and op-level selective
checkpointing train exactly like no checkpointing, wrap the blocks they say, and recompute
only what they say (counted with a dispatch mode on the CPU)."""

import importlib.util
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
import yaml
from helpers.batches import arithmetic_batch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_aquila import AquilaLM
from lightning_aquila.strategies.activation_checkpoint import (
    activation_checkpointing_mode,
    checkpointed_blocks,
    op_save_list,
)

LAYERS = 4  # aquila2-tiny has 2; 4 tells every_2 from full and from blocks 0, 2
MATMULS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _built(mode, **options) -> AquilaLM:
    torch.manual_seed(0)
    lm = AquilaLM(preset="aquila2-tiny", config={"num_layers": LAYERS},
                  activation_checkpointing=mode, **options)
    lm.configure_model()
    return lm


def _first_gradients_and_losses(mode, steps: int = 4, **options):
    """The gradients of the first backward, and the losses of ``steps`` AdamW steps."""
    lm = _built(mode, **options)
    optimizer = torch.optim.AdamW(lm.model.parameters(), lr=3e-3)
    losses, first = [], None
    for step in range(steps):
        loss = lm.training_step(arithmetic_batch(step, 4), step)["loss"]
        optimizer.zero_grad()
        loss.backward()
        if first is None:
            first = {name: p.grad.clone() for name, p in lm.model.named_parameters()}
        optimizer.step()
        losses.append(loss.item())
    return first, losses


@cache
def _no_checkpointing():
    """The reference run, once per session (it is a pure function of the seed)."""
    return _first_gradients_and_losses(False)


def _assert_same_training(mode, tolerance: float = 1e-6, **options) -> None:
    """Losses within ``tolerance`` relative, every gradient within ``tolerance`` of its largest
    entry (fp32; eager, measured: 0, bit for bit, torch 2.13 CPU: the recompute runs the same
    kernels on the same inputs)."""
    want_grads, want_losses = _no_checkpointing()
    got_grads, got_losses = _first_gradients_and_losses(mode, **options)
    assert want_losses[-1] < want_losses[0] - 0.5  # training moved: the comparison means something
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(want_losses),
                               rtol=tolerance, atol=0)
    names = [n.replace("_checkpoint_wrapped_module.", "") for n in got_grads]
    assert names == list(want_grads)
    for name, got in zip(names, got_grads.values()):
        want = want_grads[name]
        assert (got - want).abs().max().item() <= tolerance * want.abs().max().item(), name


class _OpCounter(TorchDispatchMode):
    """Counts the calls of some ops that reach the dispatcher while it is active."""

    def __init__(self, *ops) -> None:
        super().__init__()
        self.counts = dict.fromkeys(ops, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.counts:
            self.counts[func] += 1
        return func(*args, **(kwargs or {}))


def _backward_counts(mode) -> dict:
    """How often the backward of one step calls ``aten.mm`` and the CPU's SDPA forward."""
    lm = _built(mode)
    loss = lm.training_step(arithmetic_batch(0, 4), 0)["loss"]
    with _OpCounter(torch.ops.aten.mm.default, SDPA_CPU) as counter:
        loss.backward()
    return {"mm": counter.counts[torch.ops.aten.mm.default], "sdpa": counter.counts[SDPA_CPU]}


@pytest.mark.parametrize("mode", ["full", "every_2", "op"])
def test_each_mode_trains_like_no_checkpointing(mode):
    _assert_same_training(mode)


@pytest.mark.parametrize(("mode", "wrapped"), [
    (False, []), ("none", []), (True, [0, 1, 2, 3]), ("full", [0, 1, 2, 3]),
    ("op", [0, 1, 2, 3]), ("every_1", [0, 1, 2, 3]), ("every_2", [1, 3]), ("every_3", [2]),
    ("every_5", []),
])
def test_each_mode_wraps_the_blocks_it_names(mode, wrapped):
    """torchtitan's numbering: every_N wraps the N-th, 2N-th, ... block (indices N-1, 2N-1)."""
    lm = _built(mode)
    got = [i for i, block in enumerate(lm.model.layers) if isinstance(block, CheckpointWrapper)]
    assert got == wrapped == checkpointed_blocks(mode, LAYERS)


@pytest.mark.parametrize("mode", ["every_2", "op"])
def test_selective_modes_keep_the_state_dict_keys(mode):
    assert list(_built(mode).state_dict()) == list(_built(False).state_dict())


def test_recompute_is_what_each_mode_says():
    """The backward of one step without checkpointing runs two matmuls per forward matmul
    (29 forward: 7 per block and the head). Full checkpointing recomputes 6 of each block's 7
    and its attention: not the down projection, whose output no backward needs (non-reentrant
    checkpointing stops recomputing once it has what backward needs). every_2 does that for
    blocks 1 and 3 only. op recomputes 3 of 7 (k, o and up, the even-numbered ones) and no
    attention: the saved outputs are read back, not recomputed."""
    plain = _backward_counts(False)
    assert plain == {"mm": 2 * (MATMULS_PER_BLOCK * LAYERS + 1), "sdpa": 0}
    assert _backward_counts("full") == {"mm": plain["mm"] + 6 * LAYERS, "sdpa": LAYERS}
    assert _backward_counts("every_2") == {"mm": plain["mm"] + 6 * 2, "sdpa": 2}
    assert _backward_counts("op") == {"mm": plain["mm"] + 3 * LAYERS, "sdpa": 0}


def test_op_mode_saves_torchtitans_list_and_the_cpus_attention():
    aten = torch.ops.aten
    assert op_save_list() == {
        aten.mm.default, aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_cudnn_attention.default, SDPA_CPU,
        torch.ops._c10d_functional.reduce_scatter_tensor.default, aten.max.default}


@pytest.mark.parametrize("value", ["every_0", "evry_2", "opp", "every_02", "Full", "every_",
                                   1, 0])
def test_another_value_is_refused_naming_it_and_the_allowed_forms(value):
    with pytest.raises(ValueError, match=rf"activation_checkpointing={value!r} is not one of "
                                         r"false, 'none', true, 'full', 'every_N' \(N >= 1\), "
                                         r"'op'$"):
        AquilaLM(preset="aquila2-tiny", activation_checkpointing=value)


@pytest.mark.parametrize(("value", "mode"), [(False, "none"), (None, "none"), ("none", "none"),
                                             (True, "full"), ("full", "full"), ("op", "op"),
                                             ("every_12", "every_12")])
def test_booleans_keep_their_meaning_and_strings_are_canonical(value, mode):
    assert activation_checkpointing_mode(value) == mode


def test_a_shipped_yaml_with_true_still_builds_with_every_block_checkpointed(monkeypatch):
    from test_configs import print_config

    monkeypatch.setattr(sys, "argv", ["lightning-aquila"])
    model = print_config("configs/aquila2-34b-tp-fsdp.yaml")["model"]
    assert model["activation_checkpointing"] is True
    lm = AquilaLM(**{**model, "preset": "aquila2-tiny", "betas": tuple(model["betas"])})
    lm.configure_model()
    assert all(isinstance(block, CheckpointWrapper) for block in lm.model.layers)


@pytest.mark.parametrize("mode", ["op", "every_2"])
def test_the_cli_takes_a_mode_string(mode, tmp_path, monkeypatch):
    from test_configs import print_config

    monkeypatch.setattr(sys, "argv", ["lightning-aquila"])
    overlay = tmp_path / "ac.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"activation_checkpointing": mode}}))
    printed = print_config("configs/quickstart.yaml", str(overlay))
    assert printed["model"]["activation_checkpointing"] == mode


def _strategies_benchmark():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "strategies.py"
    spec = importlib.util.spec_from_file_location("strategies_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("argv", "mode"), [
    ([], "none"), (["--activation-checkpointing"], "full"),
    (["--activation-checkpointing", "--compile"], "full"),
    (["--activation-checkpointing", "op"], "op"),
    (["--activation-checkpointing", "every_2"], "every_2"),
])
def test_the_strategies_benchmark_flag_records_the_mode(argv, mode):
    """The flag alone is full checkpointing, as before; a value names the mode, and the mode
    string is what the benchmark's JSON row records."""
    assert _strategies_benchmark().build_parser().parse_args(argv).activation_checkpointing == mode


def test_the_strategies_benchmark_refuses_a_misspelt_mode(capsys):
    with pytest.raises(SystemExit):
        _strategies_benchmark().build_parser().parse_args(["--activation-checkpointing", "opp"])
    assert "activation_checkpointing='opp' is not one of" in capsys.readouterr().err


@pytest.mark.slow  # inductor's CPU codegen takes minutes on two cores
def test_op_mode_under_whole_model_compile_trains_like_eager_no_checkpointing():
    """compile='model' traces the op policy into the one graph. Against eager without
    checkpointing, fp32: losses within 1e-5 relative, gradients within 1e-5 of their largest
    entry, the bounds of the compile test in test_module.py (measured, torch 2.13 CPU: 1.2e-7
    and 5.7e-7: inductor's fused kernels round differently, not the checkpointing)."""
    _assert_same_training("op", tolerance=1e-5, compile="model")
