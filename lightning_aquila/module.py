"""AquilaLM: the LightningModule that trains an Aquila2 decoder on domain-tagged batches.

It returns per-sample losses with every step (the Step output contract) so the TSM can
account loss per domain without a second forward pass, in this module or anyone else's.
"""

from __future__ import annotations

import importlib.util
import math
from contextlib import nullcontext
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.distributed.tensor import DTensor
from torch.optim.lr_scheduler import LambdaLR

from lightning_aquila.export import TOKENIZER_KEY
from lightning_aquila.model import AquilaConfig, AquilaModel, import_hf
from lightning_aquila.model.float8 import FLOAT8_RECIPES
from lightning_aquila.model.model import ATTENTION_IMPLS, LOSS_IMPLS, check_choice
from lightning_aquila.squared_norms import squared_norms
from lightning_aquila.strategies.activation_checkpoint import activation_checkpointing_mode
from lightning_aquila.strategies.parallelize import prepare_model

__all__ = ["OPTIMIZERS", "AquilaLM", "warmup_cosine"]

#: ``optimizer``: ``adamw`` keeps its two moments in fp32 (8 bytes per parameter);
#: ``adamw8bit`` is torchao's ``AdamW8bit`` (its update compiled once:
#: ``lightning_aquila.adamw8bit``), moments quantised blockwise to 8 bits (about 2
#: bytes per parameter), which also shards under FSDP2 and tensor parallelism.
OPTIMIZERS = ("adamw", "adamw8bit")


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warmup from 0, cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class AquilaLM(LightningModule):
    """Next-token pretraining of an Aquila2 decoder.

    Args:
        preset: a name from ``AquilaConfig.from_name`` (``aquila2-7b``, ``aquila2-mini``, ...).
        config: overrides of ``AquilaConfig`` fields, e.g. ``{max_seq_len: 256}``.
        init_from: a Hugging Face Llama/Aquila2 directory to start from instead of random init;
            its config is the checkpoint's, but for ``max_seq_len``, ``rope_theta`` and
            ``rope_scaling`` from ``config`` (extending its context).
        tokenizer: the tokenizer the data must have been prepared with (checked by the DMU).
        learning_rate, min_lr_ratio, warmup_steps, decay_steps: linear warmup then cosine
            decay to ``min_lr_ratio · learning_rate`` at ``decay_steps`` (default: the
            trainer's ``max_steps``). Defaults follow Aquila2/Llama-2 pretraining.
        weight_decay, betas, eps: AdamW; norms and other 1-D parameters are not decayed.
        optimizer: ``adamw`` (``torch.optim.AdamW``, fp32 moments) or ``adamw8bit``
            (torchao's ``AdamW8bit`` with its update compiled once,
            ``lightning_aquila.adamw8bit``; the ``torchao`` extra: moments quantised to 8 bits
            in blocks of 256 values, 6 bytes per parameter less than ``adamw``; tensors under
            4,096 values keep fp32 moments). For models whose fp32 optimizer state does not
            fit the GPUs (docs/benchmarks.md, "Scaling"); not under DeepSpeed.
        activation_checkpointing: trade recompute in the backward pass for activation
            memory (``strategies/activation_checkpoint.py``, torchtitan's modes). ``false`` /
            ``"none"``: off. ``true`` / ``"full"``: every decoder block keeps only its input
            and recomputes its forward (about a third more FLOPs, least memory).
            ``"every_N"``: only every N-th block is checkpointed (torchtitan's numbering:
            ``every_2`` wraps blocks 1, 3, 5, ...), the rest keep their activations.
            ``"op"``: every block is checkpointed, but the outputs of its matmuls (all but
            every second one), attention and reduce-scatters are saved, so only cheap ops
            are recomputed. Every mode computes the function of no checkpointing (losses and
            gradients bit for bit in fp32 on the CPU, tests/test_activation_checkpointing.py);
            any other value is a ``ValueError`` here, before the model is built.
        compile: ``torch.compile`` each decoder block (``true`` or ``"blocks"``), or the whole
            model, output head and loss included (``"model"``: one graph, fewer kernels; with
            ``loss_impl="chunked"`` the chunk loop runs outside it, each chunk compiled, so
            inductor cannot keep all chunks' logits alive: ``model/head_loss.py``).
        attention: ``auto`` (cuDNN SDPA on CUDA, plain SDPA elsewhere), ``sdpa``, ``cudnn``
            or ``flash`` (flash-attn-4, the ``flash`` extra).
        loss_impl: ``standard`` (full logits, fp32 cross-entropy) or ``chunked`` (head and
            cross-entropy ``loss_chunk_size`` tokens at a time: full-vocabulary fp32 logits
            never exist, which frees several GiB for a larger micro-batch).
        fused_optimizer: AdamW's fused CUDA kernel (one launch for all parameters); default:
            on when the parameters are on CUDA, no GradScaler is in use and the strategy is
            not DeepSpeed (which brings its own optimizer handling).
        float8: ``tensorwise`` or ``rowwise``: the decoder blocks' projections run their
            matmuls in float8 (torchao ``Float8Linear``, the ``torchao`` extra; GPUs of compute
            capability 8.9+, emulated on the CPU). The output head, weights and optimizer
            state are unchanged, so checkpoints interchange with bf16 runs. Not with tensor
            parallelism.
    """

    def __init__(
        self,
        preset: str = "aquila2-tiny",
        config: dict[str, Any] | None = None,
        init_from: str | None = None,
        tokenizer: str | None = None,
        learning_rate: float = 3e-4,
        min_lr_ratio: float = 0.1,
        warmup_steps: int = 2000,
        decay_steps: int | None = None,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        optimizer: str = "adamw",
        activation_checkpointing: bool | str = False,
        compile: bool | Literal["blocks", "model"] = False,
        attention: str = "auto",
        loss_impl: str = "standard",
        loss_chunk_size: int = 4096,
        fused_optimizer: bool | None = None,
        float8: str | None = None,
    ) -> None:
        super().__init__()
        if compile not in (False, True, "blocks", "model"):
            raise ValueError(f"compile={compile!r} is not one of [False, True, 'blocks', "
                             "'model']")
        activation_checkpointing_mode(activation_checkpointing)
        check_choice("attention", attention, ATTENTION_IMPLS)
        check_choice("loss_impl", loss_impl, LOSS_IMPLS)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        if optimizer == "adamw8bit" and fused_optimizer:
            raise ValueError("fused_optimizer=True is torch.optim.AdamW's fused kernel; "
                             "optimizer='adamw8bit' has none (leave fused_optimizer unset)")
        if float8 is not None:
            check_choice("float8", float8, FLOAT8_RECIPES)
        torchao_user = ("optimizer='adamw8bit'" if optimizer == "adamw8bit"
                        else f"float8={float8!r}" if float8 is not None else None)
        if torchao_user and importlib.util.find_spec("torchao") is None:
            raise ImportError(f"{torchao_user} needs torchao "
                              "(`pip install 'lightning-aquila[torchao]'`)")
        if loss_chunk_size < 1:
            raise ValueError(f"loss_chunk_size must be a positive number of tokens, "
                             f"got {loss_chunk_size}")
        self.save_hyperparameters()
        self.config = AquilaConfig.from_name(preset, **(config or {}))
        self.tokenizer = tokenizer
        self.model: AquilaModel | None = None

    # -- model -------------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Builds the decoder here, not in ``__init__``, so sharding strategies can create it
        on the meta device and materialise only each rank's shard."""
        if self.model is not None:
            return
        hp = self.hparams
        kernels = {"attention": hp.attention, "loss_impl": hp.loss_impl,
                   "loss_chunk_size": hp.loss_chunk_size}
        if hp.init_from:
            self.model = import_hf(hp.init_from, context=hp.config, **kernels)
            self.config = self.model.config
        else:
            # Under ModelParallelStrategy build on meta: prepare_model materialises only each
            # rank's shard, so a 70B model never exists whole on one host.
            meta = self.device_mesh is not None
            with torch.device("meta") if meta else nullcontext():
                self.model = AquilaModel(self.config, **kernels)
        strategy = self._trainer.strategy if self._trainer is not None else None
        # the device matters only for sharding and float8 (read it only then, as not every
        # strategy knows it this early)
        uses_device = strategy is not None and (self.device_mesh is not None or hp.float8)
        prepare_model(self.model, mesh=self.device_mesh,
                      plan=getattr(strategy, "parallel_plan", None),  # AquilaParallelStrategy's
                      device=strategy.root_device if uses_device else None, float8=hp.float8,
                      activation_checkpointing=hp.activation_checkpointing, compile=hp.compile)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The resolved architecture (an init_from import included), so exports and tools
        # need neither the YAML nor the original Hugging Face directory.
        checkpoint["aquila_config"] = self.config.to_dict()
        # The store's tokenizer, so an export carries the one the model was trained with.
        from lightning_aquila.datamodules.tokenizer_check import datamodule_tokenizer

        record = datamodule_tokenizer(self._trainer)
        copy = record.json if record is not None else None
        if copy is not None:
            checkpoint[TOKENIZER_KEY] = copy

    # -- steps -------------------------------------------------------------------------------
    def _check_vocabulary(self, ids: torch.Tensor) -> None:
        """Token ids past the vocabulary would index out of the embedding. On the host the
        check is free and names the id; on a GPU an async assert avoids a sync every step.
        (The DMU also checks its stores against the vocabulary before training starts.)"""
        if ids.device.type != "cpu":
            torch._assert_async((ids.max() < self.config.vocab_size) & (ids.min() >= 0))
            return
        high, low = int(ids.max()), int(ids.min())
        if high >= self.config.vocab_size or low < 0:
            bad = high if high >= self.config.vocab_size else low
            raise ValueError(
                f"batch holds token id {bad}, outside the model's vocabulary "
                f"[0, {self.config.vocab_size}) of {self.config.name!r}; was the data prepared "
                "with another tokenizer?"
            )

    def _losses(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample loss sums, per-sample token counts, and the token-mean batch loss.
        The model computes the loss itself, so ``loss_impl`` and ``compile="model"`` cover it."""
        self._check_vocabulary(batch["input_ids"])
        loss, per_token = self.model(batch["input_ids"], labels=batch["labels"])
        counts = (batch["labels"] != -100).sum(1)  # per_token is 0 where the label is -100
        return per_token.sum(1), counts, loss

    def training_step(
        self, batch: dict[str, torch.Tensor], batch_idx: int
    ) -> dict[str, torch.Tensor]:
        sums, counts, loss = self._losses(batch)
        # On the progress bar only when there is one: Lightning turns progress-bar values
        # into Python numbers every step, a read that waits for all the GPU's queued work.
        self.log("train/loss", loss, prog_bar=self._trainer is not None
                 and self._trainer.progress_bar_callback is not None)
        return {"loss": loss, "sample_loss": (sums / counts.clamp(min=1)).detach()}

    def _domain_names(self, count: int) -> list[str]:
        mixture = getattr(getattr(self.trainer, "datamodule", None), "mixture", None)
        names = list(getattr(mixture, "domains", []))
        return names if len(names) >= count else [f"domain_{i}" for i in range(count)]

    def on_validation_epoch_start(self) -> None:
        self._val_sums: dict[int, torch.Tensor] = {}

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        sums, counts, _ = self._losses(batch)
        dev = batch["part"] != 1 if "part" in batch else torch.ones_like(batch["domain"],
                                                                          dtype=torch.bool)
        for domain in batch["domain"][dev].unique().tolist():  # val/loss: the dev part only
            picked = (batch["domain"] == domain) & dev
            pair = torch.stack([sums[picked].sum(), counts[picked].sum().to(sums.dtype)])
            self._val_sums[domain] = self._val_sums.get(domain, 0) + pair.detach()
        # the monitor's held-out loss reads these instead of running the batch again
        return {"sample_loss_sum": sums.detach(), "sample_tokens": counts}

    def on_validation_epoch_end(self) -> None:
        """Token-weighted loss per domain and overall, summed over ranks before dividing."""
        size = max(self._val_sums, default=-1) + 1
        table = torch.zeros(size, 2, device=self.device)
        for domain, pair in self._val_sums.items():
            table[domain] = pair
        if self.trainer.world_size > 1:
            table = self.trainer.strategy.reduce(table, reduce_op="sum")
        names = self._domain_names(size)
        for domain in range(size):
            if table[domain, 1] > 0:
                self.log(f"val/domain_loss/{names[domain]}", table[domain, 0] / table[domain, 1])
        if size:
            self.log("val/loss", table[:, 0].sum() / table[:, 1].sum().clamp(min=1),
                     prog_bar=True)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # DeepSpeed ZeRO-3 partitions parameters to empty tensors; ds_shape keeps the real one.
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) >= 2]
        no_decay = [p for p in params if len(getattr(p, "ds_shape", p.shape)) < 2]
        groups = [{"params": decay, "weight_decay": hp.weight_decay, "name": "decay"},
                  {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
        if hp.optimizer == "adamw8bit":
            optimizer = self._adamw8bit(groups)
        else:
            fused = hp.fused_optimizer
            if fused is None:
                fused = self._fused_optimizer_fits(params)
            optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate, betas=tuple(hp.betas),
                                          eps=hp.eps, fused=fused or None)
        decay_steps = hp.decay_steps or self.trainer.max_steps
        if decay_steps is None or decay_steps <= 0:
            raise ValueError("AquilaLM needs decay_steps or trainer.max_steps for its LR schedule")
        schedule = LambdaLR(optimizer, lambda step: warmup_cosine(
            step, hp.warmup_steps, decay_steps, hp.min_lr_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    def _adamw8bit(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        """torchao's 8-bit AdamW over ``groups``. DeepSpeed flattens and partitions the
        parameters and their optimizer state itself, so it is refused there."""
        if self._under_deepspeed():
            raise ValueError("optimizer='adamw8bit' is for single devices and the FSDP2/TP "
                             "strategies (aquila_fsdp, aquila_tp_fsdp); DeepSpeed partitions "
                             "its own optimizer state: use optimizer='adamw' there")
        from lightning_aquila.adamw8bit import AdamW8bit

        hp = self.hparams
        return AdamW8bit(groups, lr=hp.learning_rate, betas=tuple(hp.betas), eps=hp.eps)

    def _fused_optimizer_fits(self, params: list[torch.Tensor]) -> bool:
        """Fused AdamW by default only where it is known to work: CUDA parameters, no
        GradScaler (fp16) and not DeepSpeed, which wraps the optimizer its own way."""
        trainer = self._trainer
        if not params or any(p.device.type != "cuda" for p in params):
            return False
        if trainer is None:
            return True
        if self._under_deepspeed():
            return False
        return getattr(trainer.precision_plugin, "scaler", None) is None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any,
                       optimizer_closure: Any = None) -> None:
        """Lightning's step, then the gradients are freed at once. Lightning itself zeroes
        them only inside the next step's closure, after ``training_step`` and before
        ``backward``, so the last step's gradients (4 bytes per parameter in fp32) stay
        allocated through every forward pass, the activations' peak included. A plain loop
        frees them after ``step``; so does this. The monitor reads gradients in
        ``on_before_optimizer_step``, before this point; under gradient accumulation this
        runs once per optimizer step, after the last micro-batch, as zeroing should.
        DeepSpeed's engine owns its gradients and is left alone."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if not self._under_deepspeed():
            optimizer.zero_grad(set_to_none=True)

    def _under_deepspeed(self) -> bool:
        """Whether the attached trainer's strategy is DeepSpeed's (by name, so that
        deepspeed, an optional extra, is never imported to ask)."""
        trainer = self._trainer
        return trainer is not None and "deepspeed" in type(trainer.strategy).__name__.lower()

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales
        gradients in its own step (fused AdamW) because a GradScaler would have scaled them.
        Under bf16 there is no GradScaler and nothing to unscale, so clip norms here.

        The norm comes from ``squared_norms``: the TrainingStateMonitor took the same
        gradients' norms a moment ago (``on_before_optimizer_step``), so the clip reads no
        gradient to get it. For fused AdamW on plain (unsharded) parameters the clip needs no
        multiply pass either: the fused kernel divides each gradient by
        ``optimizer.grad_scale`` as it reads it, and writes the result back to ``.grad`` (the
        hook GradScaler uses), so the clip factor goes there; ``adamw8bit``
        (``lightning_aquila.adamw8bit``) likewise takes it as ``grad_divisor`` and divides
        inside its update, leaving ``.grad`` as it is. Other optimizers (unfused AdamW) get
        PyTorch's ``clip_grads_with_norm_``: the multiply alone. Either way the update is
        ``clip_grad_norm_``'s to rounding (docs/benchmarks.md). Sharded
        gradients (DTensor, Lightning's FSDPStrategy), a GradScaler (fp16), DeepSpeed and
        clipping by value take Lightning's path."""
        plugin = self.trainer.precision_plugin
        # FSDP1's flat gradient shards are plain tensors: a local norm would be wrong there
        if (getattr(plugin, "scaler", None) is not None or self._under_deepspeed()
                or isinstance(self.trainer.strategy, FSDPStrategy)):
            super().configure_gradient_clipping(optimizer, gradient_clip_val,
                                                gradient_clip_algorithm)
            return
        value = gradient_clip_val if gradient_clip_val is not None else (
            self.trainer.gradient_clip_val or 0.0)
        algorithm = GradClipAlgorithmType(
            gradient_clip_algorithm or self.trainer.gradient_clip_algorithm or "norm")
        # where the step divides every gradient by a factor it is given: fused AdamW's
        # grad_scale, lightning_aquila.adamw8bit.AdamW8bit's grad_divisor (else multiply)
        factor_attr = ("grad_scale" if getattr(optimizer, "_step_supports_amp_scaling", False)
                       else "grad_divisor" if hasattr(optimizer, "grad_divisor") else None)
        if factor_attr:
            setattr(optimizer, factor_attr, None)  # set anew every step, or not at all
        params = [p for group in optimizer.param_groups for p in group["params"]
                  if p.grad is not None]
        grads = [p.grad for p in params]
        if value and algorithm == GradClipAlgorithmType.NORM and grads and not any(
                isinstance(g, DTensor) for g in grads):
            norm = squared_norms(grads).sum().sqrt().float()
            # clip_grad_norm_'s factor, min(1, max_norm / (norm + 1e-6)), inverted for the
            # step to divide by (a non-finite norm gives non-finite updates, as it does there)
            if factor_attr:
                setattr(optimizer, factor_attr, torch.clamp((norm + 1e-6) / value, min=1.0))
            else:
                torch.nn.utils.clip_grads_with_norm_(params, value, norm)
            return
        # by value, sharded or nothing to clip: the precision plugin's clip, minus mixed
        # precision's refusal for fused optimizers (there is no GradScaler here)
        Precision.clip_gradients(plugin, optimizer, value, algorithm)
