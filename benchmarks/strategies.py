"""Throughput, MFU, peak memory and the loss curve of AquilaLM under each named strategy.

A short run of the ``aquila2-1b`` preset (1.1B parameters, vocab 100,008) on synthetic token
windows (seq 2048, bf16-mixed): ``--warmup`` untimed steps, then ``--steps`` timed ones. The
global batch (``--global-batch`` windows per optimizer step) and the windows in it are the
same under every strategy, so the per-step losses of one strategy can be held against the
single-GPU curve. Prints one table row and appends one JSON line to ``--out``.

MFU = tokens/s per GPU · (6·N + 12·L·H·T) / ``--peak-tflops`` (989: H100/H200 dense bf16),
with ``AquilaConfig.flops_per_token``. Needs torch, lightning and this repository only (no
zarr, neptune, jsonargparse); deepspeed for ``aquila_zero*``.

Usage (from the repository root; every command appends to the same results file):

1×H100 (``nvidia-h100-x1``)::

    export PYTHONPATH=$PWD OUT=benchmarks/results/strategies_h100.jsonl INIT=/tmp/aquila2-1b-init
    python benchmarks/strategies.py --write-init $INIT
    python benchmarks/strategies.py --strategy single      --devices 1 --init-from $INIT --out $OUT
    python benchmarks/strategies.py --strategy aquila_fsdp  --devices 1 --init-from $INIT --out $OUT
    python benchmarks/strategies.py --strategy aquila_zero2 --devices 1 --init-from $INIT --out $OUT
    python benchmarks/strategies.py --strategy aquila_zero3 --devices 1 --out $OUT

2×H200 (``nvidia-h200-x2``; the single-GPU row is the baseline on the same GPU type)::

    export PYTHONPATH=$PWD OUT=benchmarks/results/strategies_h200x2.jsonl INIT=/tmp/aquila2-1b-init
    python benchmarks/strategies.py --write-init $INIT
    python benchmarks/strategies.py --strategy single      --devices 1 --init-from $INIT --out $OUT
    python benchmarks/strategies.py --strategy ddp         --devices 2 --init-from $INIT --out $OUT
    python benchmarks/strategies.py --strategy aquila_fsdp  --devices 2 --init-from $INIT --out $OUT
    python benchmarks/strategies.py --strategy aquila_tp    --devices 2 --init-from $INIT --out $OUT
    python benchmarks/strategies.py --strategy aquila_zero3 --devices 2 --out $OUT

``--init-from`` starts every run from the same seeded weights, so the losses at fixed steps
can be compared step for step (bf16 noise aside). ZeRO-3 builds the model partitioned and
initialises it in place (``init_from`` under ``zero.Init`` is untested), so its curve starts
from a different draw of the same initialisation: compare its shape, not its digits. Timed
numbers do not depend on the weights.

Lightning's launcher starts the second process by running the same command again. Under
torchrun instead (Lightning detects it; ``--devices`` must equal ``--nproc-per-node``)::

    torchrun --standalone --nproc-per-node 2 benchmarks/strategies.py \\
        --strategy aquila_tp --devices 2 --out $OUT

DeepSpeed is source-only on PyPI: build its pure-Python wheel where there is network
(``pip wheel --no-deps deepspeed -w wheels/``), carry ``wheels/`` to the GPU machine and
``pip install --no-deps wheels/deepspeed-*.whl`` there (its ops compile just-in-time with the
machine's nvcc and ninja; ``pip install hjson ninja py-cpuinfo pydantic msgpack`` if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer, seed_everything
from torch.utils.data import DataLoader, Dataset, Subset

from lightning_aquila import AquilaConfig, AquilaLM
from lightning_aquila.model.model import LOSS_IMPLS
from lightning_aquila.strategies import STRATEGIES
from lightning_aquila.strategies.activation_checkpoint import activation_checkpointing_mode

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere
from step_profile import StepProfiler, elapsed, mark, print_profiles

#: strategies whose data-parallel size on one node is 1 (all its GPUs split each layer)
_TENSOR_PARALLEL = {"aquila_tp", "aquila_tp_fsdp"}


class CountingWindows(Dataset):
    """Window ``i``: counting from a random start with a random stride, over the first
    ``alphabet`` token ids; seeded by ``i`` alone. Learnable, so the loss curve has a slope
    along which two strategies can be compared."""

    def __init__(self, count: int, seq_len: int, alphabet: int) -> None:
        self.count, self.seq_len, self.alphabet = count, seq_len, alphabet

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        start = torch.randint(0, self.alphabet, (1,), generator=generator)
        stride = torch.randint(1, 16, (1,), generator=generator)
        window = (start + stride * torch.arange(self.seq_len + 1)) % self.alphabet
        return {"input_ids": window[:-1], "labels": window[1:], "domain": torch.tensor(0)}


class GlobalBatchData(LightningDataModule):
    """Optimizer step ``s`` takes windows ``[s·G, (s+1)·G)`` whatever the strategy: each
    data-parallel rank a contiguous block of them, in micro-batches."""

    def __init__(self, global_batch: int, micro_batch: int, steps: int, seq_len: int,
                 alphabet: int) -> None:
        super().__init__()
        self.global_batch, self.micro_batch = global_batch, micro_batch
        self.dataset = CountingWindows(global_batch * steps, seq_len, alphabet)
        self.steps = steps

    def train_dataloader(self) -> DataLoader:
        kwargs = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        replicas, rank = kwargs.get("num_replicas", 1), kwargs.get("rank", 0)
        per_rank = self.global_batch // replicas
        order = [s * self.global_batch + rank * per_rank + j
                 for s in range(self.steps) for j in range(per_rank)]
        return DataLoader(Subset(self.dataset, order), batch_size=self.micro_batch,
                          num_workers=2, pin_memory=True)


class Meter(Callback):
    """Per optimizer step: the global loss; over the timed steps, wall time and peak memory.
    Nothing in the timed steps waits for the GPU (a ``lightning-aquila fit`` step does not
    either): each step's loss stays on the device, the clock is read after a synchronize at
    the end of warmup and of the timed steps, and the losses are averaged over ranks once,
    at the end, in one collective. With ``profile`` (a directory), ``profile_steps`` more
    steps run under ``torch.profiler`` on every rank; rank 0 writes its trace there."""

    def __init__(self, warmup: int, steps: int, profile: Path | None = None,
                 profile_steps: int = 3, name: str = "row") -> None:
        self.warmup, self.steps = warmup, steps
        self.losses: dict[int, float] = {}
        self.start: float | None = None
        self.seconds: float | None = None
        self.peak_GiB = 0.0
        self._sums: list[torch.Tensor] = []
        self._steps: list[int] = []
        self._step_losses: list[torch.Tensor] = []
        self.profiler = StepProfiler(profile, name, warmup + steps, profile_steps,
                                     torch.cuda.is_available())

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        self.profiler.write = trainer.is_global_zero  # every rank profiles, rank 0 writes

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._sums.append(outputs["loss"].detach())
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return
        self._steps.append(trainer.global_step)
        self._step_losses.append(torch.stack(self._sums).float().mean())
        self._sums = []
        cuda = torch.cuda.is_available()
        if trainer.global_step == self.warmup:
            self.start = mark(cuda)
        elif trainer.global_step == self.warmup + self.steps:
            self.seconds = elapsed(self.start, cuda)
            self.peak_GiB = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
        self.profiler.step(trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        if self.seconds is None:
            raise RuntimeError("fit ended before the timed steps did")
        if self._step_losses:
            mean = trainer.strategy.reduce(torch.stack(self._step_losses), reduce_op="mean")
            self.losses = dict(zip(self._steps, mean.tolist(), strict=True))


def data_parallel_size(strategy: str, devices: int) -> int:
    return 1 if strategy in _TENSOR_PARALLEL else devices


def run(args: argparse.Namespace) -> dict[str, Any] | None:
    config = AquilaConfig.from_name(args.preset, max_seq_len=max(args.seq_len, 2048))
    dp = data_parallel_size(args.strategy, args.devices)
    if args.global_batch % (dp * args.accumulate):
        raise SystemExit(f"--global-batch {args.global_batch} is not a multiple of "
                         f"data-parallel size {dp} × --accumulate {args.accumulate}")
    micro_batch = args.global_batch // (dp * args.accumulate)
    steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    seed_everything(0, verbose=False)
    module = AquilaLM(preset=args.preset, config={"max_seq_len": config.max_seq_len},
                      init_from=args.init_from,
                      learning_rate=args.learning_rate, warmup_steps=args.warmup,
                      decay_steps=10 * (args.warmup + args.steps), compile=args.compile,
                      activation_checkpointing=args.activation_checkpointing,
                      loss_impl=args.loss_impl)
    name = f"{args.strategy}-{args.devices}gpu-{args.preset}-seq{args.seq_len}-b{args.global_batch}"
    meter = Meter(args.warmup, args.steps, args.profile, args.profile_steps, name)
    trainer = Trainer(
        accelerator="gpu" if torch.cuda.is_available() else "cpu", devices=args.devices,
        strategy="auto" if args.strategy == "single" else args.strategy,
        precision=args.precision, max_steps=steps, accumulate_grad_batches=args.accumulate,
        gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[meter],
        limit_val_batches=0, use_distributed_sampler=False,
    )
    data = GlobalBatchData(args.global_batch, micro_batch, steps, args.seq_len,
                           min(args.alphabet, config.vocab_size))
    trainer.fit(module, datamodule=data)

    cuda = torch.cuda.is_available()
    peak = torch.tensor([meter.peak_GiB], device=trainer.strategy.root_device)
    peaks = trainer.strategy.all_gather(peak).flatten().tolist()
    if not trainer.is_global_zero:
        return None
    seconds = meter.seconds
    tokens_per_sec = args.steps * args.global_batch * args.seq_len / seconds
    per_gpu = tokens_per_sec / args.devices
    mfu = per_gpu * config.flops_per_token(args.seq_len) / (args.peak_tflops * 1e12)
    return {
        "strategy": args.strategy, "devices": args.devices, "data_parallel": dp,
        "preset": args.preset, "params_M": round(config.num_params / 1e6, 1),
        "precision": args.precision, "seq_len": args.seq_len,
        "global_batch": args.global_batch, "micro_batch": micro_batch,
        "accumulate": args.accumulate, "activation_checkpointing": args.activation_checkpointing,
        "compile": args.compile, "loss_impl": args.loss_impl, "init_from": args.init_from,
        "warmup": args.warmup,
        "steps": args.steps,
        "tokens_per_sec": round(tokens_per_sec), "tokens_per_sec_per_gpu": round(per_gpu),
        "mfu": round(mfu, 4), "peak_mem_GiB": round(max(peaks), 2),
        "peak_mem_GiB_per_rank": [round(p, 2) for p in peaks],
        "losses": {str(k): round(v, 5) for k, v in sorted(meter.losses.items())},
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "lightning": lightning.__version__,
        "profile": meter.profiler.summary,
    }


def write_init(preset: str, seq_len: int, path: Path) -> None:
    """The seeded initial weights, so that every strategy's curve starts from the same point
    (sharded strategies otherwise initialise each shard with its own random stream)."""
    from lightning_aquila import AquilaModel, export_hf

    seed_everything(0, verbose=False)
    config = AquilaConfig.from_name(preset, max_seq_len=max(seq_len, 2048))
    export_hf(AquilaModel(config), path, dtype=torch.float32, overwrite=True)
    print(f"wrote {path}")


def append_line(path: Path, row: dict[str, Any]) -> None:
    """Append one JSON line, written whole: the new file content goes to a temporary name
    and replaces the old one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.exists() else ""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(old + json.dumps(row) + "\n")
    os.replace(tmp, path)


def table_row(row: dict[str, Any], loss_steps: list[int]) -> str:
    losses = [row["losses"].get(str(s), float("nan")) for s in loss_steps]
    cells = [row["strategy"], row["devices"], f"{row['tokens_per_sec']:,}",
             f"{row['tokens_per_sec_per_gpu']:,}", f"{100 * row['mfu']:.1f}%",
             f"{row['peak_mem_GiB']:.1f}", *(f"{loss:.4f}" for loss in losses)]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def activation_checkpointing_flag(text: str) -> str:
    """``--activation-checkpointing``'s value as its canonical mode (``none``, ``full``,
    ``op``, ``every_N``), so the JSON row records the mode, not a bare flag."""
    try:
        return activation_checkpointing_mode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", default="single",
                        help=f"single, ddp, or one of {sorted(STRATEGIES)}")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--preset", default="aquila2-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--global-batch", type=int, default=8,
                        help="windows per optimizer step over all data-parallel ranks")
    parser.add_argument("--accumulate", type=int, default=1,
                        help="micro-batches per optimizer step on each rank")
    parser.add_argument("--steps", type=int, default=30, help="timed optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed optimizer steps first")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--alphabet", type=int, default=1024,
                        help="token ids the synthetic windows count over")
    parser.add_argument("--activation-checkpointing", nargs="?", const="full", default="none",
                        type=activation_checkpointing_flag, metavar="MODE",
                        help="alone: full (every block); or none, full, op, every_N "
                             "(AquilaLM's activation_checkpointing)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--loss-impl", default="standard", choices=LOSS_IMPLS,
                        help="AquilaLM's loss_impl: chunked is what the FSDP configs ship "
                             "(per-block compile leaves the head eager, where full fp32 "
                             "logits are the largest activation)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--loss-steps", default="1,5,10,20,35",
                        help="steps whose loss goes into the printed row")
    parser.add_argument("--out", type=Path, default=None, help="append one JSON line here")
    parser.add_argument("--init-from", default=None,
                        help="start from this Hugging Face directory (see --write-init)")
    parser.add_argument("--write-init", type=Path, default=None,
                        help="write the seeded initial model here as a Hugging Face "
                             "directory and exit")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="after the timed steps, --profile-steps steps under "
                             "torch.profiler on every rank; rank 0's trace goes to DIR and "
                             "a summary (GPU idle, NCCL time compute did not hide) into the row")
    parser.add_argument("--profile-steps", type=int, default=3)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.write_init:
        write_init(args.preset, args.seq_len, args.write_init)
        return
    if args.strategy.startswith("aquila_zero"):
        try:
            import deepspeed  # noqa: F401
        except ImportError as error:
            raise SystemExit(f"--strategy {args.strategy} needs deepspeed (see the "
                             "docstring)") from error
    row = run(args)
    # A process group left to the interpreter's exit let gloo's threads end the process with
    # "terminate called without an active exception" (exit -6), once in a CI run, after the
    # fit had finished: every rank leaves it here.
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if row is None:  # not rank 0
        return
    loss_steps = [int(s) for s in args.loss_steps.split(",")]
    header = ["strategy", "devices", "tokens/s", "tokens/s/GPU", "MFU", "peak GiB/GPU",
              *(f"loss@{s}" for s in loss_steps)]
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print(table_row(row, loss_steps), flush=True)
    print_profiles([row], label="strategy")
    print(json.dumps(row), flush=True)
    if args.out:
        append_line(args.out, row)


if __name__ == "__main__":
    main()
