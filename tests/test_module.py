"""AquilaLM: the step-output contract, per-domain validation, optimiser and schedule."""

import math

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_aquila import AquilaLM
from lightning_aquila.model.head_loss import token_losses
from lightning_aquila.module import warmup_cosine


class CountingSequences(Dataset):
    """Windows of an arithmetic sequence mod 97 per domain: learnable within a few steps."""

    def __init__(self, n: int, seq_len: int, num_domains: int = 2, offset: int = 0):
        self.n, self.seq_len, self.num_domains, self.offset = n, seq_len, num_domains, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        domain = i % self.num_domains
        start = (i * 7 + self.offset) % 97
        window = (torch.arange(start, start + self.seq_len + 1) * (domain + 1)) % 97 + 100 * domain
        return {"input_ids": window[:-1], "labels": window[1:], "domain": torch.tensor(domain)}


class CountingData(LightningDataModule):
    def __init__(self, seq_len=32, batch_size=8):
        super().__init__()
        self.seq_len, self.batch_size = seq_len, batch_size

    def train_dataloader(self):
        return DataLoader(CountingSequences(4096, self.seq_len), batch_size=self.batch_size)

    def val_dataloader(self):
        return DataLoader(CountingSequences(16, self.seq_len, offset=3), batch_size=5)


def _batch(b=4, t=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8000, (b, t + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone(),
            "domain": torch.arange(b) % 2}


def _built(**kwargs) -> AquilaLM:
    torch.manual_seed(0)
    lm = AquilaLM(preset="aquila2-tiny", **kwargs)
    lm.configure_model()
    return lm


def test_training_step_returns_loss_and_detached_per_sample_loss():
    lm = _built()
    batch = _batch()
    out = lm.training_step(batch, 0)
    assert out["loss"].requires_grad and out["loss"].ndim == 0
    assert out["sample_loss"].shape == (4,) and not out["sample_loss"].requires_grad
    # every token counts, so the batch loss is the mean of the per-sample means
    torch.testing.assert_close(out["sample_loss"].mean(), out["loss"].detach())


def test_ignored_labels_do_not_count_in_sample_loss():
    lm = _built()
    batch = _batch()
    batch["labels"][0, 8:] = -100
    out = lm.training_step(batch, 0)
    logits = lm(batch["input_ids"])
    expected = torch.nn.functional.cross_entropy(logits[0, :8], batch["labels"][0, :8])
    torch.testing.assert_close(out["sample_loss"][0], expected.detach())
    per_token, mask = token_losses(logits, batch["labels"])
    torch.testing.assert_close(out["loss"], (per_token * mask).sum() / mask.sum())


def test_initial_loss_is_near_uniform_over_the_vocabulary():
    out = _built().training_step(_batch(), 0)
    assert out["loss"].item() == pytest.approx(math.log(8192), rel=0.02)


def test_token_ids_past_the_vocabulary_are_rejected_naming_the_id():
    lm = _built()
    batch = _batch()
    batch["input_ids"][1, 3] = 8192
    with pytest.raises(ValueError, match=r"token id 8192.*vocabulary \[0, 8192\)"):
        lm.training_step(batch, 0)


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
    assert warmup_cosine(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert warmup_cosine(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(500, 10, 110, 0.1) == pytest.approx(0.1)


def test_norms_are_not_weight_decayed():
    lm = _built(weight_decay=0.1)
    lm.trainer = Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    optimizer = lm.configure_optimizers()["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in no_decay["params"])
    norms = sum(1 for n, _ in lm.model.named_parameters() if "norm" in n)
    assert len(no_decay["params"]) == norms


def _trainer(tmp_path, **kwargs):
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, default_root_dir=tmp_path,
                    enable_checkpointing=False)
    return Trainer(**{**defaults, **kwargs})


def test_short_fit_drives_the_loss_down(tmp_path):
    torch.manual_seed(0)
    lm = AquilaLM(preset="aquila2-tiny", learning_rate=3e-3, warmup_steps=5)
    trainer = _trainer(tmp_path, max_steps=60, limit_val_batches=0)
    trainer.fit(lm, CountingData())
    assert trainer.callback_metrics["train/loss"].item() < 0.3 * math.log(8192)


def test_validation_logs_token_weighted_loss_per_domain(tmp_path):
    lm = _built()
    data = CountingData()
    trainer = _trainer(tmp_path)
    metrics = trainer.validate(lm, data, verbose=False)[0]
    sums, counts = torch.zeros(2), torch.zeros(2)
    lm.eval()
    with torch.no_grad():
        for batch in data.val_dataloader():
            per_token, mask = token_losses(lm(batch["input_ids"]), batch["labels"])
            for d in range(2):
                sums[d] += (per_token * mask)[batch["domain"] == d].sum()
                counts[d] += mask[batch["domain"] == d].sum()
    for d in range(2):
        expected = (sums[d] / counts[d]).item()
        assert metrics[f"val/domain_loss/domain_{d}"] == pytest.approx(expected, rel=1e-5)
    assert metrics["val/loss"] == pytest.approx((sums.sum() / counts.sum()).item(), rel=1e-5)


def test_learning_rate_follows_the_schedule_during_fit(tmp_path):
    lm = AquilaLM(preset="aquila2-tiny", learning_rate=1e-3, warmup_steps=4, decay_steps=12,
                  min_lr_ratio=0.1)
    trainer = _trainer(tmp_path, max_steps=12, limit_val_batches=0)
    trainer.fit(lm, CountingData())
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-4)


def test_checkpoint_carries_the_resolved_config_and_exports_to_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from lightning_aquila.cli.tools import export_hf_command as export_main

    lm = AquilaLM(preset="aquila2-tiny", config={"rope_theta": 20000.0}, warmup_steps=1)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(lm, CountingData())
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    ckpt = torch.load(tmp_path / "model.ckpt", weights_only=False)
    assert ckpt["aquila_config"]["rope_theta"] == 20000.0
    assert export_main([str(tmp_path / "model.ckpt"), "--output", str(tmp_path / "hf"),
                        "--dtype", "fp32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = _batch()["input_ids"]
    lm.eval()
    with torch.no_grad():
        assert (hf(ids).logits - lm(ids)).abs().max().item() < 1e-4


class _GradNormAfterStep(Callback):
    """The gradient norm (and largest entry) the optimizer stepped with, after clipping: read
    by a post-step hook of the optimizer, as AquilaLM frees the gradients once its step is
    done."""

    def __init__(self):
        self.norms, self.largest = [], []

    def on_train_start(self, trainer, pl_module):
        trainer.optimizers[0].register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"]
                 if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(g) for g in grads])).item())
        self.largest.append(max(g.abs().max().item() for g in grads))


def test_fused_adamw_clips_gradients_under_bf16_mixed(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip for fused AdamW; under bf16 there
    is no GradScaler, so AquilaLM clips, inside the fused step (``grad_scale``): the updates
    are those of unfused AdamW after Lightning's ``clip_grad_norm_``, and the gradients left
    in ``.grad`` are clipped in both."""
    params = {}
    for fused in (True, False):
        torch.manual_seed(0)
        lm = AquilaLM(preset="aquila2-tiny", warmup_steps=1, fused_optimizer=fused)
        norms = _GradNormAfterStep()
        trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, precision="bf16-mixed",
                           gradient_clip_val=1e-3, callbacks=[norms])
        trainer.fit(lm, CountingData())
        optimizer = trainer.optimizers[0]
        assert bool(optimizer.defaults["fused"]) is fused
        if fused:  # the clip went into the fused step (the kernel writes .grad back)
            assert optimizer.grad_scale.item() > 10
        assert len(norms.norms) == 3 and max(norms.norms) <= 1e-3 * (1 + 1e-4)
        params[fused] = [p.detach().clone() for p in lm.parameters()]
    for got, want in zip(params[True], params[False], strict=True):
        assert (got - want).abs().max().item() <= 1e-6


class _NormPasses(Callback):
    """Counts ``aten._foreach_norm`` calls from each step's backward to its end (the monitor's
    gradient norm, the clip, the optimizer step), through a dispatch mode: every caller's."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = []

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func.overloadpacket == torch.ops.aten._foreach_norm:
                    counts[-1] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Count()

    def on_after_backward(self, trainer, pl_module):
        self.counts.append(0)
        self.mode.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.mode.__exit__(None, None, None)


def test_the_monitor_and_the_fused_clip_read_the_gradients_once_per_step(tmp_path):
    """The TrainingStateMonitor takes the gradient norm (its non-finite check, every step) and
    AquilaLM's clip needs it again at once: one pass over the gradients serves both, and the
    clip still holds the norm to its limit."""
    from lightning_aquila.callbacks import TrainingStateMonitor

    torch.manual_seed(0)
    lm = AquilaLM(preset="aquila2-tiny", warmup_steps=1, fused_optimizer=True)
    passes, norms = _NormPasses(), _GradNormAfterStep()
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, precision="bf16-mixed",
                       gradient_clip_val=1e-3,
                       callbacks=[TrainingStateMonitor(grad_norm_every_n_steps=1), passes,
                                  norms])
    trainer.fit(lm, CountingData())
    assert passes.counts == [1, 1, 1]
    assert max(norms.norms) <= 1e-3 * (1 + 1e-4)


def test_the_monitor_and_an_unfused_clip_read_the_gradients_once_per_step(tmp_path):
    """Optimizers that take no clip factor into their step (unfused AdamW) clip by one
    multiply, with the norm the monitor already took: one pass to get it, not two."""
    from lightning_aquila.callbacks import TrainingStateMonitor

    torch.manual_seed(0)
    lm = AquilaLM(preset="aquila2-tiny", warmup_steps=1, fused_optimizer=False)
    passes, norms = _NormPasses(), _GradNormAfterStep()
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, gradient_clip_val=1e-3,
                       callbacks=[TrainingStateMonitor(grad_norm_every_n_steps=1), passes,
                                  norms])
    trainer.fit(lm, CountingData())
    assert passes.counts == [1, 1, 1]
    assert max(norms.norms) == pytest.approx(1e-3, rel=1e-4)


def _clipping_at(limit: float) -> tuple[AquilaLM, list[torch.nn.Parameter]]:
    """An AquilaLM whose trainer clips at ``limit``, and its parameters (no gradients yet)."""
    lm = _built()
    lm.trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False,
                         accelerator="cpu", gradient_clip_val=limit)
    return lm, list(lm.model.parameters())


@pytest.mark.parametrize("limit", [1e-3, 1e6])
def test_the_unfused_clip_gives_clip_grad_norm_s_gradients(limit):
    """Against ``torch.nn.utils.clip_grad_norm_`` on float64 copies of the same gradients:
    clipped (a small limit) and left alone (a large one), fp32 and bf16 gradients mixed."""
    lm, params = _clipping_at(limit)
    generator = torch.Generator().manual_seed(1)
    for i, p in enumerate(params):
        if i % 3 == 0:
            p.data = p.data.bfloat16()
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
    copies = [p.detach().double() for p in params]  # in float64: the reference's own norm
    for copy, p in zip(copies, params):               # is not rounded to bf16
        copy.grad = p.grad.double()
    torch.nn.utils.clip_grad_norm_(copies, limit)
    want = [copy.grad.to(p.dtype) for copy, p in zip(copies, params)]
    optimizer = torch.optim.AdamW(params, fused=False)
    lm.configure_gradient_clipping(optimizer, limit, "norm")
    for p, expected in zip(params, want):
        tolerance = 1e-2 if p.grad.dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(p.grad, expected, rtol=tolerance, atol=tolerance * limit)


@pytest.mark.parametrize("limit", [1e-3, 1e6])
@pytest.mark.parametrize("optimizer_name", ["fused_adamw", "adamw8bit"])
def test_the_clip_factor_handed_to_the_step_is_clip_grad_norm_s(limit, optimizer_name):
    """Where the step divides the gradients itself (fused AdamW's ``grad_scale``, adamw8bit's
    ``grad_divisor``) the clip hands it ``clip_grad_norm_``'s factor inverted: the norm over
    the limit where the norm is larger, exactly 1 where it is not (a factor under 1 would
    scale small gradients up), and leaves ``.grad`` untouched (no multiply pass)."""
    lm, params = _clipping_at(limit)
    generator = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    grads = [p.grad.clone() for p in params]
    norm = torch.linalg.vector_norm(torch.cat([g.double().flatten() for g in grads])).item()
    if optimizer_name == "fused_adamw":
        optimizer, attribute = torch.optim.AdamW(params, fused=True), "grad_scale"
    else:
        pytest.importorskip("torchao", reason="optimizer='adamw8bit' needs the torchao extra")
        from lightning_aquila.adamw8bit import AdamW8bit

        optimizer, attribute = AdamW8bit(params), "grad_divisor"
    lm.configure_gradient_clipping(optimizer, limit, "norm")
    factor = getattr(optimizer, attribute)
    assert norm > 1e-3 and norm < 1e6
    assert factor.item() == pytest.approx(max(1.0, norm / limit), rel=1e-5)
    if limit > norm:
        assert factor.item() == 1.0
    assert all(torch.equal(p.grad, g) for p, g in zip(params, grads, strict=True))


def test_clipping_by_value_under_fused_adamw_clips_the_gradients(tmp_path):
    lm = AquilaLM(preset="aquila2-tiny", warmup_steps=1, fused_optimizer=True)
    grads = _GradNormAfterStep()
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, precision="bf16-mixed",
                       gradient_clip_val=1e-4, gradient_clip_algorithm="value",
                       callbacks=[grads])
    trainer.fit(lm, CountingData())
    assert trainer.optimizers[0].grad_scale is None
    assert len(grads.largest) == 2 and max(grads.largest) <= 1e-4


def test_fused_adamw_is_off_by_default_on_cpu():
    lm = _built()
    lm.trainer = Trainer(max_steps=10, logger=False, enable_checkpointing=False)
    assert not lm.configure_optimizers()["optimizer"].defaults["fused"]


def test_unknown_compile_mode_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"compile='graph' is not one of \[False, True, "
                                         r"'blocks', 'model'\]"):
        AquilaLM(preset="aquila2-tiny", compile="graph")


@pytest.mark.slow  # inductor's CPU codegen takes ~2 minutes on two cores
@pytest.mark.parametrize("loss_impl", ["standard", "chunked"])
def test_whole_model_compile_gives_the_eager_loss_and_gradients(loss_impl):
    """compile='model' (one graph, head and loss included) against eager, fp32: same loss
    and sample losses to 1e-5, same gradients to 1e-5 of each gradient's largest entry."""
    batch = _batch()
    steps = []
    for compile in (False, "model"):
        lm = _built(compile=compile, loss_impl=loss_impl, loss_chunk_size=24)
        out = lm.training_step(batch, 0)
        out["loss"].backward()
        steps.append((out, [p.grad for p in lm.model.parameters()]))
    (eager, eager_grads), (compiled, compiled_grads) = steps
    assert compiled["loss"].item() == pytest.approx(eager["loss"].item(), abs=1e-5)
    assert (compiled["sample_loss"] - eager["sample_loss"]).abs().max().item() < 1e-5
    for got, want in zip(compiled_grads, eager_grads):
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item())


class _GradBytesBeforeBackward(Callback):
    """Bytes of gradients allocated when each backward pass begins (after the forward, the
    activations' peak)."""

    def __init__(self):
        self.bytes = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.bytes.append(sum(p.grad.nbytes for p in pl_module.parameters()
                              if p.grad is not None))


def test_gradients_are_freed_when_the_optimizer_step_ends(tmp_path):
    """Lightning zeroes gradients only after the next training_step; AquilaLM frees them after
    its step, so no forward pass (the activations' peak) carries the last step's gradients."""
    lm = AquilaLM(preset="aquila2-tiny", warmup_steps=1)
    witness = _GradBytesBeforeBackward()
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[witness])
    trainer.fit(lm, CountingData())
    assert witness.bytes == [0, 0, 0]
    assert all(p.grad is None for p in lm.parameters())


def test_gradient_accumulation_still_sums_micro_batches(tmp_path):
    """Freed after the optimizer step, not after each micro-batch: two accumulated batches of
    4 give the weights of one batch of 8 (the same windows; the loss is a token mean), to
    rounding (measured 1.0e-6); gradients dropped between micro-batches would move weights by
    the order of an update (lr 3e-4)."""
    weights = []
    for batch_size, accumulate in ((8, 1), (4, 2)):
        torch.manual_seed(0)
        lm = AquilaLM(preset="aquila2-tiny", warmup_steps=1)
        trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0,
                           accumulate_grad_batches=accumulate)
        trainer.fit(lm, CountingData(batch_size=batch_size))
        weights.append([p.detach().clone() for p in lm.parameters()])
    for got, want in zip(*weights, strict=True):
        assert (got - want).abs().max().item() <= 1e-5
