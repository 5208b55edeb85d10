"""``optimizer: adamw8bit`` (torchao's AdamW8bit): it trains, keeps 8-bit moments, and a
checkpoint resumes to the uninterrupted run's losses, on one device (single-file checkpoint
through ``AtomicCheckpointIO``, as ``lightning-aquila fit`` saves it) and under tensor
parallel × FSDP2 on four CPU processes (sharded checkpoint), the 34B scaling layout.

torchao compiles its update once per parameter shape, which takes minutes on two CPU cores;
these tests run the same update eagerly (``torch.compile`` is the identity in them).
"""

import math

import pytest
import torch
from distributed_helpers.launch import losses, run_training
from distributed_helpers.train import eager_torchao_optimizer
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from test_module import CountingData

from lightning_aquila import AquilaLM
from lightning_aquila.checkpoint import AtomicCheckpointIO

pytest.importorskip("torchao", reason="optimizer='adamw8bit' needs the torchao extra")


class StepLosses(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses[trainer.global_step] = outputs["loss"].item()


def fit(tmp_path, steps: int, resume: str | None = None) -> tuple[Trainer, dict[int, float]]:
    """``steps`` steps of four-batch epochs, a checkpoint (through ``AtomicCheckpointIO``, as
    ``lightning-aquila fit`` saves one) every four: at the end of an epoch."""
    torch.manual_seed(0)
    lm = AquilaLM(preset="aquila2-tiny", learning_rate=3e-3, warmup_steps=2,
                  decay_steps=100, optimizer="adamw8bit")
    recorder = StepLosses()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", every_n_train_steps=4,
                                  save_top_k=-1, filename="step{step}",
                                  auto_insert_metric_name=False)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, limit_train_batches=4,
                      limit_val_batches=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path,
                      plugins=[AtomicCheckpointIO()], callbacks=[recorder, checkpoints])
    trainer.fit(lm, CountingData(), ckpt_path=resume)
    return trainer, recorder.losses


def test_adamw8bit_trains_with_8_bit_moments_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "compile", torch.compile)  # restored after the test
    eager_torchao_optimizer()
    trainer, whole = fit(tmp_path / "whole", steps=8)
    assert whole[8] < whole[1] - 0.5 and whole[1] == pytest.approx(math.log(8192), abs=0.2)

    optimizer = trainer.optimizers[0]
    embedding = trainer.lightning_module.model.embed_tokens.weight
    moment = optimizer.state[embedding]["exp_avg"]
    assert type(moment).__name__ == "OptimState8bit"
    assert moment.codes.dtype == torch.uint8 and moment.codes.numel() == embedding.numel()
    assert moment.scale.numel() == embedding.numel() // 256  # one fp32 scale per block

    checkpoint = tmp_path / "whole" / "checkpoints" / "step4.ckpt"
    resumed, after = fit(tmp_path / "resumed", steps=8, resume=str(checkpoint))
    assert sorted(after) == [5, 6, 7, 8]
    assert [after[s] for s in (5, 6, 7, 8)] == [whole[s] for s in (5, 6, 7, 8)]
    state = resumed.optimizers[0].state[resumed.lightning_module.model.embed_tokens.weight]
    assert type(state["exp_avg"]).__name__ == "OptimState8bit"


def test_adamw8bit_resumes_a_sharded_tensor_parallel_fsdp_checkpoint(tmp_path):
    common = ("--tensor-parallel-size", "2", "--optimizer", "adamw8bit", "--steps", "4",
              "--steps-per-epoch", "2")
    first = run_training(tmp_path / "first", *common, "--checkpoint-every", "2", devices=4)
    resumed = run_training(tmp_path / "resumed", *common, "--resume",
                           str(tmp_path / "first" / "checkpoints" / "step2.ckpt"), devices=4)
    curve = losses(first[0])
    assert curve[-1] < curve[0] - 0.5
    assert losses(resumed[0]) == curve[2:]
    for record in (*first, *resumed):  # every rank's shards of the large weights are 8-bit
        assert record["optimizer_state_types"] == ["OptimState8bit", "Tensor"]
        assert record["mesh"] == {"data_parallel": 2, "tensor_parallel": 2}


def test_adamw8bit_refuses_the_fused_kernel_it_does_not_have():
    with pytest.raises(ValueError, match="adamw8bit' has none"):
        AquilaLM(preset="aquila2-tiny", optimizer="adamw8bit", fused_optimizer=True)


def test_an_unknown_optimizer_names_the_known_ones():
    with pytest.raises(ValueError, match=r"optimizer='sgd' is not one of \['adamw', "
                                         r"'adamw8bit'\]"):
        AquilaLM(preset="aquila2-tiny", optimizer="sgd")
