"""Two CPU processes (gloo) under ``ddp``, ``aquila_fsdp`` and ``aquila_tp`` train the tiny
preset exactly as one process does with the same global batch.

Every run starts from the same weights (a seeded aquila2-tiny through ``init_from``) and
reads the same 8 windows per step: split 4 + 4 over two data-parallel ranks, or all 8 on both
tensor-parallel ranks. fp32 throughout, AdamW at lr 3e-3, gradients clipped at a global norm
of 0.5 (the first step's norm is 1.1, so the clip acts on sharded gradients too).

Tolerance: ``rel=1e-5`` on each step's loss (about 9e-5 nats). The runs differ only in
summation order (gradient all-reduce/reduce-scatter; TP's split matmuls, partial sums and
sharded log-sum-exp), so fp32 rounding (~1e-7 relative per operation), carried through five
AdamW steps, is all that may separate them: measured ≤ 1e-6 nats (1.2e-7 relative). Training
on half the batch instead, as a rank that misses the gradient reduction would, moves the
losses by 1.5e-2 to 2.4e-1 nats: two to three orders of magnitude above the tolerance.
"""

import pytest
from distributed_helpers.launch import cached_run, losses, tiny_init

STEPS = 5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    init = tiny_init(tmp_path_factory)
    common = ("--init-from", init, "--steps", str(STEPS))
    return {
        "single": cached_run(tmp_path_factory, "single", *common),
        **{strategy: cached_run(tmp_path_factory, strategy, *common, "--strategy", strategy,
                                devices=2)
           for strategy in ("ddp", "aquila_fsdp", "aquila_tp")},
    }


def test_reference_loss_falls_over_the_steps(runs):
    reference = losses(runs["single"][0])
    assert len(reference) == STEPS
    assert reference[-1] < reference[0] - 0.5


@pytest.mark.parametrize("strategy", ["ddp", "aquila_fsdp", "aquila_tp"])
def test_two_process_losses_match_one_process(runs, strategy):
    assert losses(runs[strategy][0]) == pytest.approx(losses(runs["single"][0]), rel=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "aquila_fsdp", "aquila_tp"])
def test_two_process_held_out_loss_matches_one_process(runs, strategy):
    assert runs[strategy][0]["val_loss"] == pytest.approx(runs["single"][0]["val_loss"],
                                                          rel=1e-5)


def test_tensor_parallel_logits_stay_sharded_on_the_vocabulary(runs):
    for record in runs["aquila_tp"]:
        assert record["logits"]["placements"] == ["S(2)"]
        assert record["logits"]["local_shape"] == [1, 8, 8192 // 2]


def test_tensor_parallel_splits_heads_mlp_embedding_and_head(runs):
    init = runs["aquila_tp"][0]["init"]
    local = {name: stats["local_shape"] for name, stats in init.items()}
    assert local["embed_tokens.weight"] == [4096, 64]  # vocabulary rows
    assert local["lm_head.weight"] == [4096, 64]
    assert local["layers.0.attention.q_proj.weight"] == [32, 64]  # 2 of 4 heads
    assert local["layers.0.attention.k_proj.weight"] == [16, 64]  # 1 of 2 kv heads
    assert local["layers.0.attention.o_proj.weight"] == [64, 32]
    assert local["layers.0.mlp.gate_proj.weight"] == [88, 64]
    assert local["layers.0.mlp.down_proj.weight"] == [64, 88]
    assert local["layers.0.attention_norm.weight"] == [64]  # replicated


def test_fsdp_ranks_are_two_data_parallel_ranks(runs):
    assert [r["sampler_kwargs"] for r in runs["aquila_fsdp"]] == [
        {"num_replicas": 2, "rank": 0}, {"num_replicas": 2, "rank": 1}]
    assert [r["mesh"] for r in runs["aquila_fsdp"]] == [
        {"data_parallel": 2, "tensor_parallel": 1}] * 2


def test_tensor_parallel_ranks_are_one_data_parallel_rank(runs):
    assert [r["sampler_kwargs"] for r in runs["aquila_tp"]] == [
        {"num_replicas": 1, "rank": 0}] * 2
    assert runs["aquila_tp"][0]["batches"] == runs["aquila_tp"][1]["batches"]
