"""What sharding does to the model and to the data (CPU processes, gloo): Aquila's own
initialisation of a model built on the meta device, tensor parallel × FSDP2 on four ranks
(samples per data-parallel rank, loss against one process), and FSDP2's mixed precision on a
GPU when there is one."""

import math
import re

import pytest
import torch
from distributed_helpers.launch import cached_run, losses, run_training, tiny_init

STD, LAYERS = 0.02, 2  # aquila2-tiny
RESIDUAL_STD = STD / math.sqrt(2 * LAYERS)


def _clean(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")


def assert_aquila_init(stats: dict[str, dict]) -> None:
    """Each tensor as ``AquilaModel.init_weights`` leaves it: norms at one; every other weight
    N(0, 0.02), the residual-stream projections N(0, 0.02/sqrt(2·layers)); sample mean and
    standard deviation within five standard errors of those."""
    for name, s in stats.items():
        name = _clean(name)
        if re.search(r"norm\.weight$", name):
            assert (s["mean"], s["std"]) == (1.0, 0.0), name
            continue
        std = RESIDUAL_STD if name.endswith(("o_proj.weight", "down_proj.weight")) else STD
        n = s["numel"]
        assert abs(s["mean"]) < 5 * std / math.sqrt(n), name
        assert abs(s["std"] - std) < 5 * std / math.sqrt(2 * n), name


def _random_weights(stats: dict[str, dict]) -> list[str]:
    return [name for name in stats if not name.endswith("norm.weight")]


@pytest.fixture(scope="module")
def fsdp_meta(tmp_path_factory):
    """aquila_fsdp, model built on the meta device, activation checkpointing on."""
    return run_training(tmp_path_factory.mktemp("fsdp_meta"), "--strategy", "aquila_fsdp",
                        "--meta-init", "--activation-checkpointing", "--steps", "2",
                        devices=2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A two-domain shard store of random in-vocabulary tokens."""
    import numpy as np

    from lightning_aquila.datamodules.writer import DomainWriter

    url = str(tmp_path_factory.mktemp("store") / "store.zarr")
    rng = np.random.default_rng(0)
    for name in ("code", "web"):
        with DomainWriter(url, name, tokenizer={"hash": "synthetic"}, language="xx",
                          chunk_tokens=1024) as writer:
            writer.add_document("train", rng.integers(0, 8190, 6000).astype(np.uint32))
            writer.add_document("heldout", rng.integers(0, 8190, 400).astype(np.uint32))
            writer.add_source({"path": f"synthetic-{name}", "sha256": name})
            writer.commit()
    return url


@pytest.fixture(scope="module")
def tp_fsdp_dmu(tmp_path_factory, store):
    """2-way TP × 2-way FSDP on four ranks reading DomainDataModule; meta-device build."""
    return run_training(tmp_path_factory.mktemp("tp_fsdp_dmu"), "--tensor-parallel-size", "2",
                        "--store", store, "--global-batch", "2", "--steps", "2", "--meta-init",
                        "--activation-checkpointing", devices=4)


def test_meta_built_model_gets_aquilas_init_under_fsdp(fsdp_meta):
    assert_aquila_init(fsdp_meta[0]["init"])


def test_fsdp_shards_of_a_meta_built_model_are_independent_draws(fsdp_meta):
    for name in _random_weights(fsdp_meta[0]["init"]):
        heads = [record["init"][name]["local_head"] for record in fsdp_meta]
        assert heads[0] != heads[1], name


def test_meta_built_model_gets_aquilas_init_under_tensor_parallel_and_fsdp(tp_fsdp_dmu):
    assert_aquila_init(tp_fsdp_dmu[0]["init"])
    for name in _random_weights(tp_fsdp_dmu[0]["init"]):
        heads = [tuple(record["init"][name]["local_head"]) for record in tp_fsdp_dmu]
        assert len(set(heads)) == 4, name


def test_a_meta_built_model_starts_from_the_same_weights_whatever_the_layout(fsdp_meta,
                                                                            tp_fsdp_dmu):
    """FSDP2 over two ranks and TP 2 × FSDP2 2 over four draw the same full tensors (same
    seed), so runs of one configuration at different sizes can be compared step by step."""
    two, four = fsdp_meta[0]["init"], tp_fsdp_dmu[0]["init"]
    assert sorted(two) == sorted(four)
    for name in two:
        assert (two[name]["mean"], two[name]["std"]) == (four[name]["mean"], four[name]["std"])
    head = "lm_head.weight"
    assert two[head]["local_shape"] != four[head]["local_shape"]  # the layouts do differ


def test_tensor_parallel_peers_read_the_same_samples_and_data_parallel_ranks_differ(
        tp_fsdp_dmu):
    # Ranks 0,1 form the TP group of data-parallel rank 0; ranks 2,3 that of rank 1.
    assert [r["sampler_kwargs"] for r in tp_fsdp_dmu] == [
        {"num_replicas": 2, "rank": 0}, {"num_replicas": 2, "rank": 0},
        {"num_replicas": 2, "rank": 1}, {"num_replicas": 2, "rank": 1}]
    batches = [r["batches"] for r in tp_fsdp_dmu]
    assert len(batches[0]) == 2
    assert batches[0] == batches[1] and batches[2] == batches[3]
    assert all(a != b for a, b in zip(batches[0], batches[2]))


def test_tensor_parallel_with_fsdp_losses_match_one_process(tmp_path_factory):
    """The loss-match tolerance of test_strategies_loss_match (rel 1e-5, same reasons)."""
    init = tiny_init(tmp_path_factory)
    common = ("--init-from", init, "--steps", "5")
    single = cached_run(tmp_path_factory, "single", *common)
    tp_fsdp = cached_run(tmp_path_factory, "tp2_fsdp2", *common, "--tensor-parallel-size", "2",
                         devices=4)
    assert [r["mesh"] for r in tp_fsdp] == [{"data_parallel": 2, "tensor_parallel": 2}] * 4
    assert losses(tp_fsdp[0]) == pytest.approx(losses(single[0]), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_on_gpu_computes_in_bf16_over_fp32_sharded_weights(tmp_path):
    record = run_training(tmp_path, "--accelerator", "gpu", "--strategy", "aquila_fsdp",
                          "--meta-init", "--steps", "2")[0]
    assert {s["dtype"] for s in record["init"].values()} == {"torch.float32"}
    assert record["logits"]["dtype"] == "torch.bfloat16"
    assert_aquila_init(record["init"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fsdp_offload_keeps_the_shards_in_host_memory_while_training_on_gpu(tmp_path):
    record = run_training(tmp_path, "--accelerator", "gpu", "--strategy", "aquila_fsdp_offload",
                          "--steps", "2")[0]
    assert {s["device"] for s in record["init"].values()} == {"cpu"}
    assert len(record["losses"]) == 2
