"""kernels='liger' and loss_impl='liger': Liger-Kernel's Triton kernels give the eager model's
losses, per-token losses and gradients.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET``, set in ``conftest.py`` where CUDA is absent, before anything imports
triton). The interpreter runs the fused loss and RoPE kernels; it cannot run liger-kernel
0.8.5's RMSNorm and SwiGLU kernels (they call ``.to`` on float arguments, which the
interpreter passes as Python floats: ``AttributeError: 'float' object has no attribute
'to'``), so those two are checked by the GPU-marked tests only.
"""

import sys

import pytest
import torch
from helpers.head_gradients import assert_head_gradient_scales_with_the_loss
from torch.utils.checkpoint import checkpoint

from lightning_aquila import AquilaLM
from lightning_aquila.model import AquilaConfig, AquilaModel
from lightning_aquila.model.model import Attention, apply_rope, rope_cos_sin
from lightning_aquila.strategies.activation_checkpoint import _op_context

pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (the liger extra)")
from lightning_aquila.model import liger

#: fp32: the same sums in another order (Liger's token chunks, its online softmax): measured
#: 9.5e-7 on the losses and at most 1.7e-6 of each gradient's largest entry.
FP32_ATOL = 1e-5
#: bf16: the kernels round where the eager ops round, but in other orders; a step's
#: gradients differ at bf16 resolution.
BF16_ATOL = 5e-2

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(b: int = 3, t: int = 20, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 8192, (b, t + 1), generator=g)
    labels = ids[:, 1:].clone()
    labels[0, :6] = -100  # a prompt-like ignored prefix
    labels[-1, -3:] = -100  # and padding at the end
    return ids[:, :-1], labels


def _pair(config: AquilaConfig, **options: str) -> tuple[AquilaModel, AquilaModel]:
    torch.manual_seed(0)
    eager = AquilaModel(config)
    fast = AquilaModel(config, **options)
    fast.load_state_dict(eager.state_dict())
    return eager, fast


def _assert_same_step(eager: AquilaModel, fast: AquilaModel, ids: torch.Tensor,
                      labels: torch.Tensor, atol: float) -> None:
    """Loss, per-token losses and every parameter's gradient (relative to its largest
    entry) of one forward and backward pass agree to ``atol``."""
    loss_e, tokens_e = eager(ids, labels=labels)
    loss_f, tokens_f = fast(ids, labels=labels)
    assert tokens_f.dtype == torch.float32 and tokens_f.shape == labels.shape
    assert abs(loss_f.item() - loss_e.item()) < atol
    assert (tokens_f - tokens_e).abs().max().item() < atol
    assert torch.equal(tokens_f[labels == -100], torch.zeros_like(tokens_f[labels == -100]))
    loss_e.backward()
    loss_f.backward()
    for (name, p_e), p_f in zip(eager.named_parameters(), fast.parameters(), strict=True):
        scale = p_e.grad.float().abs().max().item()
        assert (p_f.grad.float() - p_e.grad.float()).abs().max().item() <= atol * scale, name


def test_liger_loss_gives_the_standard_losses_per_token_losses_and_gradients_in_fp32():
    eager, fast = _pair(AquilaConfig.from_name("aquila2-tiny"), loss_impl="liger")
    _assert_same_step(eager, fast, *_batch(), atol=FP32_ATOL)


def test_liger_loss_under_bf16_autocast_matches_the_standard_head():
    """The fit path's precision (fp32 weights, bf16 autocast). The logits are the same bf16
    matmul, so the losses agree to fp32 rounding (measured: loss equal, per-token 1.9e-6);
    Liger rounds the logits' gradient to bf16 where the standard path's autograd does, in
    another order, so gradients agree at bf16 resolution (measured at most 1.4e-2 of a
    parameter's largest entry; the chunked head: 3.5e-3)."""
    eager, fast = _pair(AquilaConfig.from_name("aquila2-tiny"), loss_impl="liger")
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_e, tokens_e = eager(ids, labels=labels)
        loss_f, tokens_f = fast(ids, labels=labels)
    assert loss_f.dtype == torch.float32 and tokens_f.dtype == torch.float32
    assert abs(loss_f.item() - loss_e.item()) < 1e-3
    assert (tokens_f - tokens_e).abs().max().item() < 1e-3
    loss_e.backward()
    loss_f.backward()
    for (name, p_e), p_f in zip(eager.named_parameters(), fast.parameters(), strict=True):
        assert p_f.grad.dtype == torch.float32
        scale = p_e.grad.abs().max().item()
        assert (p_f.grad - p_e.grad).abs().max().item() <= BF16_ATOL * scale, name


def test_liger_loss_gradient_scales_with_the_incoming_gradient():
    """Gradient accumulation divides the loss before backward; Liger's precomputed
    gradients must follow that factor."""
    _, fast = _pair(AquilaConfig.from_name("aquila2-tiny"), loss_impl="liger")
    assert_head_gradient_scales_with_the_loss(fast, *_batch())


def test_liger_loss_without_gradients_gives_the_same_losses():
    """Validation steps run under no_grad: the kernel computes no gradients there."""
    eager, fast = _pair(AquilaConfig.from_name("aquila2-tiny"), loss_impl="liger")
    ids, labels = _batch()
    with torch.no_grad():
        (_, tokens_e), (loss_f, tokens_f) = eager(ids, labels), fast(ids, labels)
    assert not loss_f.requires_grad
    assert (tokens_f - tokens_e).abs().max().item() < FP32_ATOL


def test_liger_sample_loss_of_the_training_step_equals_the_standard_one():
    """The Step output contract: the TSM's per-sample losses survive Liger's fused head."""
    ids, labels = _batch()
    batch = {"input_ids": ids, "labels": labels, "domain": torch.tensor([0, 1, 0])}
    outs = []
    for impl in ("standard", "liger"):
        torch.manual_seed(0)
        lm = AquilaLM(preset="aquila2-tiny", loss_impl=impl)
        lm.configure_model()
        outs.append(lm.training_step(batch, 0))
    assert outs[1]["sample_loss"].shape == (3,) and not outs[1]["sample_loss"].requires_grad
    assert (outs[1]["sample_loss"] - outs[0]["sample_loss"]).abs().max().item() < FP32_ATOL


def test_all_labels_ignored_give_zero_liger_loss_and_zero_gradient():
    x = torch.randn(2, 4, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    loss, per_token = liger.linear_cross_entropy(x, weight, torch.full((2, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(per_token, torch.zeros(2, 4))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def test_liger_rope_rotates_q_and_k_as_apply_rope_forward_and_backward():
    """Rotate-half tables (T, D) and (B, T, H, D) heads, grouped-query k; fp32."""
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, 16, requires_grad=True)
    k = torch.randn(2, 9, 2, 16, requires_grad=True)
    cos, sin = rope_cos_sin(9, 16, 10000.0, q.device, q.dtype)
    q_e, k_e = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    # Liger rotates in place: give it copies, as the projections' outputs are in the model
    q_c, k_c = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    q_f, k_f = liger.rope(q_c * 1, k_c * 1, cos, sin)
    torch.testing.assert_close(q_f, q_e, rtol=0, atol=1e-6)
    torch.testing.assert_close(k_f, k_e, rtol=0, atol=1e-6)
    weights = torch.randn_like(q_e), torch.randn_like(k_e)
    ((q_e * weights[0]).sum() + (k_e * weights[1]).sum()).backward()
    ((q_f * weights[0]).sum() + (k_f * weights[1]).sum()).backward()
    torch.testing.assert_close(q_c.grad, q.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(k_c.grad, k.grad, rtol=0, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal")
def test_liger_kernels_on_cpu_tensors_are_refused_naming_the_option(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = AquilaModel(AquilaConfig.from_name("aquila2-tiny"), kernels="liger")
    with pytest.raises(RuntimeError, match=r"kernels='liger' runs Triton kernels on CUDA"):
        model(*_batch())
    model = AquilaModel(AquilaConfig.from_name("aquila2-tiny"), loss_impl="liger")
    with pytest.raises(RuntimeError, match=r"loss_impl='liger' runs Triton kernels on CUDA"):
        model(*_batch())


def test_kernels_option_is_validated_and_names_the_extra_when_liger_is_missing(monkeypatch):
    with pytest.raises(ValueError, match=r"kernels='triton' is not one of \['torch', 'liger'\]"):
        AquilaLM(preset="aquila2-tiny", kernels="triton")
    # a Python without liger-kernel: the import of our Liger module fails
    monkeypatch.delitem(sys.modules, "lightning_aquila.model.liger")
    monkeypatch.delattr(sys.modules["lightning_aquila.model"], "liger")
    for name in [n for n in sys.modules if n.split(".")[0] == "liger_kernel"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"loss_impl='liger' needs liger-kernel .*\[liger\]"):
        AquilaModel(AquilaConfig.from_name("aquila2-tiny"), loss_impl="liger")


def test_liger_rope_recomputes_exactly_under_full_checkpointing_but_not_under_op_mode():
    """Why ``kernels='liger'`` is refused with ``activation_checkpointing='op'``: that mode
    keeps the projections' outputs, which Liger's RoPE rotates in place unseen by autograd,
    so the recompute rotates them twice (measured: input gradient off by 0.13). A full
    recompute runs the projections again and is exact."""
    config = AquilaConfig.from_name("aquila2-tiny")
    torch.manual_seed(0)
    eager, fast = Attention(config, "sdpa"), Attention(config, "sdpa", kernels="liger")
    fast.load_state_dict(eager.state_dict())
    x = torch.randn(2, 9, config.hidden_size)
    cos, sin = rope_cos_sin(9, config.head_dim, config.rope_theta, x.device, x.dtype)

    def input_gradient(module: Attention, mode: str = "none") -> torch.Tensor:
        leaf = x.clone().requires_grad_()
        if mode == "none":
            out = module(leaf, cos, sin)
        else:
            out = checkpoint(module, leaf, cos, sin, use_reentrant=False,
                             **({"context_fn": _op_context} if mode == "op" else {}))
        out.square().sum().backward()
        return leaf.grad

    reference = input_gradient(eager)
    assert torch.equal(input_gradient(fast), reference)
    assert torch.equal(input_gradient(fast, "full"), reference)
    assert (input_gradient(fast, "op") - reference).abs().max().item() > 1e-2


def test_liger_kernels_are_refused_with_op_activation_checkpointing():
    with pytest.raises(ValueError, match=r"kernels='liger' does not combine with "
                                         r"activation_checkpointing='op'"):
        AquilaLM(preset="aquila2-tiny", kernels="liger", activation_checkpointing="op")
    AquilaLM(preset="aquila2-tiny", kernels="liger", activation_checkpointing="full")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{"kernels": "liger"}, {"loss_impl": "liger"},
                                     {"kernels": "liger", "loss_impl": "liger"}])
@pytest.mark.gpu
@needs_gpu
def test_liger_paths_equal_the_eager_model_on_the_gpu(options, dtype):
    """Every Liger kernel (RMSNorm, SwiGLU, RoPE, fused loss) against the eager model, at the
    benchmark's head dim (128) and grouped-query ratio (4:1), in bf16-true and fp32."""
    config = AquilaConfig.from_name("aquila2-tiny", hidden_size=512, num_heads=4,
                                    num_kv_heads=1, intermediate_size=1024)
    eager, fast = _pair(config, **options)
    eager, fast = eager.cuda().to(dtype), fast.cuda().to(dtype)
    ids, labels = (t.cuda() for t in _batch(2, 128))
    _assert_same_step(eager, fast, ids, labels,
                      atol=FP32_ATOL if dtype == torch.float32 else BF16_ATOL)


@pytest.mark.gpu
@needs_gpu
def test_liger_paths_under_bf16_autocast_and_whole_model_compile_on_the_gpu():
    """The fit path's setting: fp32 weights, bf16 autocast, ``torch.compile`` of the whole
    model with the fused loss left out of the graph."""
    config = AquilaConfig.from_name("aquila2-tiny", hidden_size=512, num_heads=4,
                                    num_kv_heads=1, intermediate_size=1024)
    eager, fast = _pair(config, kernels="liger", loss_impl="liger")
    eager, fast = eager.cuda(), fast.cuda()
    compiled = torch.compile(fast)
    ids, labels = (t.cuda() for t in _batch(2, 128))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss_e, tokens_e = eager(ids, labels=labels)
        loss_f, tokens_f = compiled(ids, labels=labels)
    assert (tokens_f - tokens_e).abs().max().item() < BF16_ATOL
    loss_e.backward()
    loss_f.backward()
    for (name, p_e), p_f in zip(eager.named_parameters(), fast.parameters(), strict=True):
        scale = p_e.grad.abs().max().item()
        assert (p_f.grad - p_e.grad).abs().max().item() <= BF16_ATOL * scale, name
