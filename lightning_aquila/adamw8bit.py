"""``optimizer: adamw8bit``: torchao's ``AdamW8bit`` with its per-parameter update compiled
once per optimizer instead of once per parameter per step.

torchao (0.17, 0.18) calls ``torch.compile(single_param_adam, ...)`` inside its loop over the
parameters, so every parameter of every step builds a new compile wrapper before dynamo finds
the cached graph: about 210 µs of host time per parameter on this project's CPU machine
(``benchmarks/optimizer_host.py``; reported upstream as pytorch/ao#2500). A 7B model has 291
parameter tensors, and on one GPU its optimizer is host-bound (docs/benchmarks.md, "Fit
path"): the GPU idles while the host builds wrappers. Here the wrapper is built once; the
update, the state and the checkpoint format are torchao's (the same function, the same
``OptimState8bit`` moments), and the results are bitwise those of ``torchao.optim.AdamW8bit``
(``tests/test_optimizer_8bit.py``).

It also takes a clip factor into the update (``grad_divisor``, as fused AdamW takes
``grad_scale``): AquilaLM's clip by norm then costs no multiply pass over the gradients (at
7B, 349 small launches queued between the backward and the optimizer, docs/benchmarks.md).

Import this module only where torchao is installed (the ``torchao`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torchao.optim
from torch._dynamo.utils import disable_cache_limit
from torchao.optim.adam import single_param_adam

__all__ = ["AdamW8bit"]


def _divided_adam(p: torch.Tensor, grad: torch.Tensor, divisor: torch.Tensor | None,
                  *args: Any) -> None:
    """torchao's update of one parameter, its gradient divided by ``divisor`` first (in
    fp32, fused into the update's kernel: ``.grad`` itself is left as it is)."""
    if divisor is not None:
        grad = grad.float() / divisor
    single_param_adam(p, grad, *args)


class AdamW8bit(torchao.optim.AdamW8bit):
    """``torchao.optim.AdamW8bit`` whose ``step`` calls one compiled update for all its
    parameters (the constructor's arguments are torchao's).

    ``grad_divisor``: ``None``, or a 0-dim tensor on the parameters' device that every
    gradient is divided by inside the update, until it is set again (``AquilaLM`` sets it
    before every step: its clip factor, ``max(1, norm / max_norm)``, for unsharded
    gradients; sharded ones it clips Lightning's way).
    """

    grad_divisor: torch.Tensor | None = None
    _update: Callable[..., None] | None = None  # built on the first step; not pickled

    def _compiled_update(self) -> Callable[..., None]:
        if self._update is None:
            self._update = torch.compile(_divided_adam, fullgraph=True, dynamic=False)
        return self._update

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        update, divisor = self._compiled_update(), self.grad_divisor
        # one static-shape graph per distinct parameter shape and group: a fixed number for a
        # given model, more than dynamo's default cache limit for a large one (as in torchao)
        with disable_cache_limit():
            for group in self.param_groups:
                if not isinstance(group["lr"], torch.Tensor):
                    raise RuntimeError(
                        f"AdamW8bit needs the learning rate as a tensor; got {group['lr']!r} "
                        "(change it with param_groups[i]['lr'].fill_(value))")
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    if p.grad.is_sparse:
                        raise RuntimeError("AdamW8bit does not support sparse gradients")
                    state = self.state[p]
                    if not state:
                        state["step"] = torch.tensor(0.0)
                        state["exp_avg"] = self._new_buffer(p, True)
                        state["exp_avg_sq"] = self._new_buffer(p, False)
                        if group["amsgrad"]:
                            state["max_exp_avg_sq"] = self._new_buffer(p, False)
                    state["step"] += 1
                    # p.detach(): a DTensor parameter without its .grad (torchao does the
                    # same, for FSDP2 under torch.compile); the gradient goes separately
                    update(p.detach(), p.grad, divisor, state["step"], state["exp_avg"],
                           state["exp_avg_sq"], state.get("max_exp_avg_sq"), group["lr"],
                           group["betas"][0], group["betas"][1], group["weight_decay"],
                           group["eps"], self.is_adamw,
                           self.bf16_stochastic_round and p.dtype is torch.bfloat16)
        return loss
