"""A short AquilaLM run under a named strategy, recording what the strategy tests check.

Launched by ``tests/test_strategies*.py`` as ``python tests/distributed_helpers/train.py
--out DIR --strategy NAME --devices N ...``; Lightning's launcher starts the other ranks by
running the same command again. Every rank writes ``DIR/rank<r>.json``:

* ``losses``: step -> the global training loss (mean over ranks) of that step;
* ``batches``: the ``input_ids`` of every training batch this rank consumed;
* ``sampler_kwargs``, ``mesh``: what the strategy told the data and how the mesh was cut;
* ``init``: per parameter, the mean and standard deviation of the full tensor right after
  setup, and a fingerprint of this rank's local shard;
* ``optimizer_state_types``: the tensor types of this rank's local AdamW first moments at the
  end (``OptimState8bit`` among them under ``--optimizer adamw8bit``);

and rank 0 writes ``DIR/final_state.pt``, the full (consolidated in memory) model state at
the end of training.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_aquila import AquilaLM
from lightning_aquila.strategies import AquilaParallelStrategy

TOKENS = 64  # a small alphabet keeps the counting patterns learnable in a few steps


class RandomWindows(Dataset):
    """Fixed random token windows, the same on every rank and in every run: counting from a
    random start with a random stride, so the loss falls quickly and a wrong gradient shows."""

    def __init__(self, count: int, seq_len: int, seed: int = 1234) -> None:
        generator = torch.Generator().manual_seed(seed)
        start = torch.randint(0, TOKENS, (count, 1), generator=generator)
        stride = torch.randint(1, 8, (count, 1), generator=generator)
        self.windows = (start + stride * torch.arange(seq_len + 1)) % TOKENS

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        window = self.windows[index]
        return {"input_ids": window[:-1], "labels": window[1:],
                "domain": torch.tensor(index % 3)}


class RandomWindowData(LightningDataModule):
    """``global_batch`` windows per step, split over the data-parallel ranks in order, so the
    union of a step's per-rank batches is the single-process batch of that step."""

    def __init__(self, global_batch: int, seq_len: int, steps_per_epoch: int) -> None:
        super().__init__()
        self.global_batch, self.seq_len = global_batch, seq_len
        self.dataset = RandomWindows(global_batch * steps_per_epoch, seq_len)

    def train_dataloader(self) -> DataLoader:
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        replicas, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        # Contiguous blocks, not DistributedSampler's interleaving: rank r of step s takes
        # windows [s·G + r·G/R, s·G + (r+1)·G/R).
        per_rank = self.global_batch // replicas
        order = [s * self.global_batch + rank * per_rank + j
                 for s in range(len(self.dataset) // self.global_batch) for j in range(per_rank)]
        return DataLoader(torch.utils.data.Subset(self.dataset, order), batch_size=per_rank)

    def val_dataloader(self) -> DataLoader:
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        held_out = RandomWindows(8, self.seq_len, seed=99)
        sampler = DistributedSampler(held_out, shuffle=False, **kwargs) if kwargs else None
        return DataLoader(held_out, batch_size=2, sampler=sampler)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a DTensor, also when its shard is offloaded to host memory."""
    if not isinstance(tensor, DTensor):
        return tensor
    mesh = tensor.device_mesh
    local = tensor.to_local().to(mesh.device_type)
    return DTensor.from_local(local, mesh, tensor.placements, run_check=False,
                              shape=tensor.shape, stride=tensor.stride()).full_tensor()


class Recorder(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out
        self.record: dict[str, Any] = {"losses": {}, "batches": []}

    def on_fit_start(self, trainer: Trainer, pl_module: AquilaLM) -> None:
        strategy = trainer.strategy
        kwargs = getattr(strategy, "distributed_sampler_kwargs", None) or {}
        self.record["sampler_kwargs"] = dict(kwargs)
        if isinstance(strategy, AquilaParallelStrategy):
            self.record["mesh"] = {"data_parallel": strategy.data_parallel_size,
                                   "tensor_parallel": strategy.tensor_parallel_size}
        stats = {}
        for name, param in pl_module.model.named_parameters():
            full = gathered(param.detach())
            local = param.to_local() if isinstance(param, DTensor) else param
            stats[name] = {"mean": full.double().mean().item(), "std": full.double().std().item(),
                           "numel": full.numel(), "shape": list(full.shape),
                           "local_shape": list(local.shape), "dtype": str(local.dtype),
                           "device": local.device.type,
                           "local_head": local.flatten()[:8].tolist()}
        self.record["init"] = stats
        with torch.no_grad():
            logits = pl_module.model(torch.zeros(1, 8, dtype=torch.long, device=pl_module.device))
        self.record["logits"] = {
            "placements": [str(p) for p in logits.placements] if isinstance(logits, DTensor)
            else None,
            "local_shape": list(logits.to_local().shape if isinstance(logits, DTensor)
                                else logits.shape),
            "dtype": str(logits.dtype),
        }

    def on_train_batch_end(self, trainer: Trainer, pl_module: AquilaLM, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.record["losses"][trainer.global_step] = loss.item()
        self.record["batches"].append(batch["input_ids"].tolist())

    def on_validation_end(self, trainer: Trainer, pl_module: AquilaLM) -> None:
        self.record["val_loss"] = trainer.callback_metrics["val/loss"].item()

    def on_train_end(self, trainer: Trainer, pl_module: AquilaLM) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        moments = [state["exp_avg"] for state in trainer.optimizers[0].state.values()
                   if "exp_avg" in state]
        self.record["optimizer_state_types"] = sorted({
            type(m.to_local() if isinstance(m, DTensor) else m).__name__ for m in moments})
        state = get_model_state_dict(
            pl_module.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if trainer.is_global_zero:
            torch.save(state, self.out / "final_state.pt")
        path = self.out / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record))


class MetaInitAquilaLM(AquilaLM):
    """Builds the decoder on the meta device, as large models must be built."""

    def configure_model(self) -> None:
        if self.model is None:
            with torch.device("meta"):
                super().configure_model()


def eager_torchao_optimizer() -> None:
    """torchao's 8-bit AdamW compiles its update once per parameter shape, which takes
    minutes on two CPU cores; the tests run the same update eagerly (``torch.compile`` is the
    identity here: nothing else in these runs compiles)."""
    torch.compile = lambda fn=None, **kwargs: fn if fn is not None else (lambda f: f)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--strategy", default="auto")
    parser.add_argument("--tensor-parallel-size", type=int, default=None,
                        help="AquilaParallelStrategy with this TP size (FSDP2 over the rest)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--init-from", default=None)
    parser.add_argument("--meta-init", action="store_true")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--store", default=None, help="a shard store: use DomainDataModule")
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--optimizer", default="adamw")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.optimizer == "adamw8bit":
        eager_torchao_optimizer()

    seed_everything(7, verbose=False)
    strategy: Any = args.strategy
    if args.tensor_parallel_size:
        strategy = AquilaParallelStrategy(tensor_parallel_size=args.tensor_parallel_size)
    module_cls = MetaInitAquilaLM if args.meta_init else AquilaLM
    model = module_cls(preset="aquila2-tiny", init_from=args.init_from, learning_rate=3e-3,
                       warmup_steps=1, decay_steps=100, optimizer=args.optimizer,
                       activation_checkpointing=args.activation_checkpointing)
    if args.store:
        from lightning_aquila.datamodules import DomainDataModule

        data: LightningDataModule = DomainDataModule(
            args.store, seq_len=args.seq_len, batch_size=args.global_batch, weights="uniform",
            val_windows_per_domain=0, verify="none")
    else:
        data = RandomWindowData(args.global_batch, args.seq_len,
                                args.steps_per_epoch or args.steps)
    callbacks: list[Callback] = [Recorder(args.out)]
    if args.checkpoint_every:
        callbacks.append(ModelCheckpoint(dirpath=args.out / "checkpoints",
                                         filename="step{step}", auto_insert_metric_name=False,
                                         every_n_train_steps=args.checkpoint_every,
                                         save_top_k=-1))
    trainer = Trainer(
        accelerator=args.accelerator, devices=args.devices, strategy=strategy,
        precision=args.precision, max_steps=args.steps,
        gradient_clip_val=0.5, logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=bool(args.checkpoint_every),
        num_sanity_val_steps=0, val_check_interval=args.steps, check_val_every_n_epoch=None,
        use_distributed_sampler=False,
        default_root_dir=args.out, callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    # Left to the interpreter's exit, gloo's threads once aborted a finished 2-process run
    # (exit -6, benchmarks/strategies.py): every rank leaves its group first.
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    main()
