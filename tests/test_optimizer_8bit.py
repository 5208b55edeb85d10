"""``optimizer: adamw8bit`` (torchao's AdamW8bit, its update compiled once): it trains, keeps
8-bit moments, matches torchao's own bitwise, and a checkpoint resumes to the uninterrupted
run's losses, on one device (single-file checkpoint through ``AtomicCheckpointIO``, as
``lightning-aquila fit`` saves it) and under tensor parallel × FSDP2 on four CPU processes
(sharded checkpoint), the 34B scaling layout.

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
    assert type(optimizer).__module__ == "lightning_aquila.adamw8bit"  # compiled once
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


def _parameters_and_groups() -> tuple[list[torch.nn.Parameter], list[dict]]:
    """Quantised (>= 4,096 values) and plain-moment tensors, fp32 and bf16, two groups."""
    torch.manual_seed(0)
    shapes = [(64, 64), (128, 64), (64, 128), (64,), (96, 64)]
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in shapes]
    params.append(torch.nn.Parameter(torch.randn(64, 128, dtype=torch.bfloat16)))
    decay = [p for p in params if p.dim() >= 2]
    return params, [{"params": decay, "weight_decay": 0.1},
                    {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def _run(optimizer_class: type, steps: int) -> tuple[list[torch.Tensor], torch.optim.Optimizer]:
    params, groups = _parameters_and_groups()
    optimizer = optimizer_class(groups, lr=1e-2, betas=(0.9, 0.95), block_size=64,
                                bf16_stochastic_round=True)
    generator = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        params[1].grad = None if step == 1 else params[1].grad  # a parameter without one
        optimizer.step()
    return [p.detach().clone() for p in params], optimizer


def test_adamw8bit_builds_its_compiled_update_once_and_matches_torchao_bitwise(monkeypatch):
    """torchao builds a ``torch.compile`` wrapper per parameter per step (its host time is
    what a 7B step waits on); ours builds one, and the parameters and moments after four
    steps are bitwise torchao's. Both run eagerly: the counting ``torch.compile`` returns the
    function itself."""
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    from lightning_aquila.adamw8bit import AdamW8bit

    built: list[dict] = []

    def counting_compile(fn, **options):
        built.append(options)
        return fn

    monkeypatch.setattr(torch, "compile", counting_compile)
    ours, optimizer = _run(AdamW8bit, steps=4)
    assert built == [{"fullgraph": True, "dynamic": False}]
    built.clear()
    theirs, reference = _run(TorchaoAdamW8bit, steps=4)
    assert len(built) == 4 * 6 - 1  # the check that tells the two apart
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    for p_ours, p_theirs in zip(optimizer.state, reference.state, strict=True):
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = optimizer.state[p_ours][key], reference.state[p_theirs][key]
            assert type(a) is type(b)
            assert torch.equal(a.dequantize() if hasattr(a, "dequantize") else a,
                               b.dequantize() if hasattr(b, "dequantize") else b)
    assert type(optimizer.state[optimizer.param_groups[0]["params"][0]]["exp_avg"]).__name__ \
        == "OptimState8bit"


def test_adamw8bit_divides_the_gradients_by_grad_divisor_inside_its_update(monkeypatch):
    """``grad_divisor`` (the clip factor AquilaLM sets) gives the update of gradients divided
    beforehand, bitwise in fp32, and leaves ``.grad`` undivided; ``None`` divides nothing."""
    from lightning_aquila.adamw8bit import AdamW8bit

    monkeypatch.setattr(torch, "compile", lambda fn, **options: fn)
    results = []
    for divide_inside in (True, False):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 96)), torch.nn.Parameter(torch.randn(32))]
        # eps of the gradients' order: Adam's update then depends on their scale
        optimizer = AdamW8bit(params, lr=1e-2, eps=0.5, block_size=64)
        generator = torch.Generator().manual_seed(1)
        for step in range(3):
            divisor = torch.tensor(4.0 + step)
            grads = [torch.randn(p.shape, generator=generator) for p in params]
            for p, grad in zip(params, grads, strict=True):
                p.grad = grad.clone() if divide_inside else grad / divisor
            optimizer.grad_divisor = divisor if divide_inside else None
            optimizer.step()
            if divide_inside:
                assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))


def test_aquila_lm_clips_adamw8bit_inside_its_update(tmp_path, monkeypatch):
    """With ``optimizer='adamw8bit'`` AquilaLM's clip by norm goes into the update as
    ``grad_divisor`` (no multiply pass), ``norm / max_norm`` of the step's gradients; the
    parameters after three clipped steps are those of torchao's own AdamW8bit after the
    multiply pass (``clip_grads_with_norm_``, what an optimizer without ``grad_divisor`` gets)
    up to the 8-bit moments' rounding (a gradient one ulp apart can move a moment one code,
    about lr/127 of the update). eps is of the clipped gradients' order so that the update depends
    on their scale: unclipped, it would move by about half a step (1.5e-3)."""
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    import lightning_aquila.adamw8bit

    class GradNorm(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.norm = torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in pl_module.parameters()
                             if p.grad is not None])).item()

    monkeypatch.setattr(torch, "compile", torch.compile)  # restored after the test
    eager_torchao_optimizer()
    params = {}
    for inside in (True, False):
        if not inside:  # what AquilaLM builds for optimizer='adamw8bit'
            monkeypatch.setattr(lightning_aquila.adamw8bit, "AdamW8bit", TorchaoAdamW8bit)
        torch.manual_seed(0)
        lm = AquilaLM(preset="aquila2-tiny", learning_rate=3e-3, warmup_steps=1,
                      decay_steps=100, optimizer="adamw8bit", eps=1e-6)
        norm = GradNorm()
        trainer = Trainer(accelerator="cpu", devices=1, max_steps=3, limit_val_batches=0,
                          logger=False, enable_progress_bar=False, enable_model_summary=False,
                          enable_checkpointing=False, default_root_dir=tmp_path,
                          gradient_clip_val=1e-3, callbacks=[norm])
        trainer.fit(lm, CountingData())
        divisor = getattr(trainer.optimizers[0], "grad_divisor", None)
        if inside:  # the last step's clip factor
            assert divisor.item() == pytest.approx(norm.norm / 1e-3, rel=1e-4)
            assert divisor.item() > 10
        else:
            assert divisor is None
        params[inside] = [p.detach().clone() for p in lm.parameters()]
    moved = max((a - b).abs().max().item() for a, b in zip(params[True], params[False]))
    assert moved <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_adamw8bit_matches_torchao_on_the_gpu():
    """Compiled, on CUDA, bf16 parameters: ours (its update compiled once) against torchao's
    AdamW8bit, bitwise after four steps; a clip factor as ``grad_divisor`` against gradients
    divided beforehand, to bf16 rounding (one unit in the last place of a parameter, and
    lr/10 for the moments' 8-bit rounding: undivided, they move by about lr a step)."""
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    from lightning_aquila.adamw8bit import AdamW8bit

    def run(optimizer_class, divisor: float | None, divide_first: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        params = [torch.nn.Parameter(0.02 * torch.randn(s, device="cuda").bfloat16())
                  for s in ((256, 512), (512,), (1024, 256))]
        optimizer = optimizer_class(params, lr=1e-2, eps=0.5)
        generator = torch.Generator(device="cuda").manual_seed(1)
        for _ in range(4):
            for p in params:
                grad = torch.randn(p.shape, device="cuda", generator=generator)
                p.grad = (grad / divisor if divide_first else grad).to(p.dtype)
            if divisor is not None and not divide_first:
                optimizer.grad_divisor = torch.tensor(divisor, device="cuda")
            optimizer.step()
        return [p.detach().float() for p in params]

    ours, theirs = run(AdamW8bit, None, False), run(TorchaoAdamW8bit, None, False)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    inside, first = run(AdamW8bit, 8.0, False), run(AdamW8bit, 8.0, True)
    for a, b in zip(inside, first, strict=True):
        torch.testing.assert_close(a, b, rtol=2**-7, atol=1e-3)


def test_adamw8bit_refuses_the_fused_kernel_it_does_not_have():
    with pytest.raises(ValueError, match="adamw8bit' has none"):
        AquilaLM(preset="aquila2-tiny", optimizer="adamw8bit", fused_optimizer=True)


def test_an_unknown_optimizer_names_the_known_ones():
    with pytest.raises(ValueError, match=r"optimizer='sgd' is not one of \['adamw', "
                                         r"'adamw8bit'\]"):
        AquilaLM(preset="aquila2-tiny", optimizer="sgd")
