"""Sharded checkpoints under ``aquila_fsdp`` and ``aquila_tp`` (two CPU processes): save,
resume, consolidate into one file, export to Hugging Face and import back.

Each strategy trains 4 steps (2 per epoch, so the step-2 checkpoint falls on an epoch end and
a resumed run reads the same windows the uninterrupted one did), saving a sharded checkpoint
every 2 steps; a second run resumes from step 2.
"""

import pytest
import torch
from distributed_helpers.launch import losses, run_training, tiny_init

from lightning_aquila import import_hf
from lightning_aquila.cli.tools import consolidate_command as consolidate_main

STRATEGIES = ["aquila_fsdp", "aquila_tp"]


class Flows:
    """Per strategy, on first use: a 4-step run saving sharded checkpoints at steps 2 and 4,
    and a run resumed from step 2."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory, self.done = factory, {}

    def __getitem__(self, strategy: str) -> dict:
        if strategy not in self.done:
            base = self.factory.mktemp(strategy)
            init = tiny_init(self.factory)
            common = ("--init-from", init, "--steps", "4", "--steps-per-epoch", "2",
                      "--strategy", strategy)
            first = run_training(base / "first", *common, "--checkpoint-every", "2", devices=2)
            checkpoints = base / "first" / "checkpoints"
            resumed = run_training(base / "resumed", *common, "--resume",
                                   str(checkpoints / "step2.ckpt"), devices=2)
            self.done[strategy] = {"base": base, "init": init, "first": first,
                                   "resumed": resumed, "checkpoints": checkpoints}
        return self.done[strategy]


@pytest.fixture(scope="module")
def flows(tmp_path_factory):
    return Flows(tmp_path_factory)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resuming_a_sharded_checkpoint_continues_the_loss_exactly(flows, strategy):
    flow = flows[strategy]
    first, resumed = flow["first"][0]["losses"], flow["resumed"][0]["losses"]
    assert sorted(resumed, key=int) == ["3", "4"]
    assert [resumed[s] for s in ("3", "4")] == [first[s] for s in ("3", "4")]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_checkpoint_is_a_directory_with_one_shard_per_rank(flows, strategy):
    flow = flows[strategy]
    path = flow["checkpoints"] / "step4.ckpt"
    assert sorted(p.name for p in path.iterdir()) == [".metadata", "__0_0.distcp",
                                                      "__1_0.distcp", "checksums.json",
                                                      "meta.pt"]
    # Written under a temporary name and renamed: nothing else is left beside it.
    assert sorted(p.name for p in flow["checkpoints"].iterdir()) == ["step2.ckpt", "step4.ckpt"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_consolidate_then_export_hf_round_trips_the_trained_weights(flows, strategy):
    flow = flows[strategy]
    output, hf_dir = flow["base"] / "consolidated.ckpt", flow["base"] / "hf"
    assert consolidate_main([str(flow["checkpoints"] / "step4.ckpt"), "--output", str(output),
                             "--hf-dir", str(hf_dir), "--dtype", "fp32"]) == 0
    trained = torch.load(flow["base"] / "first" / "final_state.pt", weights_only=True)
    consolidated = torch.load(output, weights_only=False)
    imported = import_hf(hf_dir).state_dict()
    assert sorted(imported) == sorted(trained)
    for name, tensor in trained.items():
        assert torch.equal(consolidated["state_dict"][f"model.{name}"], tensor), name
        assert torch.equal(imported[name], tensor), name


def test_consolidated_tensor_parallel_checkpoint_resumes_on_a_single_device(flows):
    """Full weights from TP shards, optimizer state re-keyed from names to indices."""
    flow = flows["aquila_tp"]
    output = flow["base"] / "consolidated_step2.ckpt"
    consolidate_main([str(flow["checkpoints"] / "step2.ckpt"), "--output", str(output)])
    single = run_training(flow["base"] / "single", "--init-from", flow["init"], "--steps", "4",
                          "--steps-per-epoch", "2", "--resume", str(output))
    first = losses(flow["first"][0])
    # A different process count sums in a different order: the loss-match tolerance.
    assert losses(single[0]) == pytest.approx(first[2:], rel=1e-5)
