"""Tokens/s, MFU and peak memory of the real fit path, next to compiled litgpt, in one process.

Every row trains the same shape (default: the ``aquila2-1b`` preset, seq 2048, micro-batch 8,
bf16 autocast) for ``--warmup`` untimed and ``--steps`` timed optimizer steps:

* ``litgpt``: the peer. ``litgpt.model.GPT`` of the same shape (vocab 100,008 unpadded, 16/4
  heads, SwiGLU 5,632, RMSNorm, no biases), forward and cross-entropy compiled as one
  ``torch.compile`` graph, fused AdamW, a plain Python loop on pre-made GPU batches.
* ``aquila-plain``: our ``AquilaModel`` in the same loop (its loss is part of its forward).
* ``fit-*``: ``AquilaLM`` through ``Trainer.fit`` as ``lightning-aquila fit`` drives it: the
  DomainDataModule reading a zarr store that this script builds with ``prepare`` from the
  bundled six-domain corpus, the TrainingStateMonitor and the AdaptiveTrainingEngine (EXP3
  bandit policy) at their default intervals, gradient clipping at 1.0, a CSV logger. Each
  row changes one lever (``FIT_ROWS``): per-block vs whole-model compile, fused AdamW,
  attention kernel, standard vs chunked loss, a larger micro-batch, TSM+ATE off (the overhead
  row is ``fit-best`` against ``fit-best-no-tsm-ate``).

MFU = tokens/s · (6·N + 12·L·H·T) / ``--peak-tflops`` (989: H100 dense bf16), N the
parameters without the input embedding (``AquilaConfig.flops_per_token``). Peak memory is
``torch.cuda.max_memory_allocated`` over the timed steps. No timing is synchronised per step:
the clock is read after a ``cuda.synchronize`` at the end of warmup and at the end of fit.

One GPU, from the repository root::

    PYTHONPATH=$PWD python benchmarks/fit_throughput.py --out benchmarks/results/fit.jsonl

``--quick`` runs the peer, ``aquila-plain``, ``fit-blocks`` and ``fit-best`` with fewer steps;
``--rows a,b,c`` picks rows by name; ``--device cpu --tiny`` is the smoke test the CPU suite
runs (``aquila2-tiny``, a few steps, no compile, no GPU rows). Rows whose package is missing
(litgpt, flash-attn-4) are reported as skipped, not failed.

``--profile DIR`` adds ``--profile-steps`` steps after the timed ones (so the timing is
untouched) under ``torch.profiler`` and, per row, writes ``DIR/<row>.trace.json.gz`` (open it
in Perfetto) and a summary in the row's JSON: how much of the profiled wall time the GPU ran
kernels, the host waits on the GPU (synchronize calls, device-to-host copies), and the
kernels that took the most GPU time. Where a fit row loses to the plain loop, this says
whether the GPU waited for the host (idle time) or did more work (kernels).

``--memory DIR`` adds ``--memory-steps`` untimed steps after those (``step_memory.py``): the
memory allocated when each step begins and the peak of each phase (forward with the loss,
backward, optimizer step with clipping and zero_grad) in the row's JSON and a table, and
``DIR/<row>.memory.pickle``, a ``torch.cuda.memory`` snapshot of those steps (open it at
https://pytorch.org/memory_viz). On the CPU the phases are reported as not measured.

``--activation-checkpointing none|full|op|every_N`` and ``--optimizer adamw|adamw8bit`` apply
to every row: AquilaLM's options for the fit rows; for the plain loop the same
``checkpoint_wrapper`` modes on litgpt's and our blocks, and torchao's ``AdamW8bit``. With
``--seq-len`` and ``--preset`` they give the long-sequence and 7B rows.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import tempfile
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F

from lightning_aquila.model import AquilaConfig, AquilaModel
from lightning_aquila.strategies.activation_checkpoint import (
    activation_checkpointing_mode,
    apply_activation_checkpointing_mode,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run from anywhere
from step_memory import StepMemory, print_memory
from step_profile import StepProfiler, elapsed, mark, print_profiles

REPO = Path(__file__).resolve().parents[1]

#: AquilaLM arguments of each fit row. ``fit-blocks`` is the path as it was (per-block
#: compile, unfused AdamW, PyTorch's SDPA choice, full logits); each later row moves one
#: lever; ``fit-best`` adds the chunked loss, which keeps the fit path under litgpt's memory
#: (configs/aquila2-1b-1gpu.yaml ships the standard loss: ``fit-cudnn``).
BEST = {"compile": "model", "fused_optimizer": True, "attention": "cudnn",
        "loss_impl": "chunked"}
FIT_ROWS: dict[str, dict[str, Any]] = {
    "fit-blocks": {"compile": True, "fused_optimizer": False, "attention": "sdpa",
                   "loss_impl": "standard"},
    "fit-blocks-fused": {"compile": True, "fused_optimizer": True, "attention": "sdpa",
                         "loss_impl": "standard"},
    "fit-model": {"compile": "model", "fused_optimizer": False, "attention": "sdpa",
                  "loss_impl": "standard"},
    "fit-model-fused": {"compile": "model", "fused_optimizer": True, "attention": "sdpa",
                        "loss_impl": "standard"},
    "fit-cudnn": {"compile": "model", "fused_optimizer": True, "attention": "cudnn",
                  "loss_impl": "standard"},
    "fit-flash": {"compile": "model", "fused_optimizer": True, "attention": "flash",
                  "loss_impl": "standard"},
    "fit-chunked": {"compile": "model", "fused_optimizer": True, "attention": "sdpa",
                    "loss_impl": "chunked"},
    "fit-best": dict(BEST),
    "fit-best-flash": {**BEST, "attention": "flash"},
    "fit-best-big-batch": {**BEST, "_batch_scale": 1.5},
    "fit-best-no-tsm-ate": {**BEST, "_callbacks": False},
    # no gradient clipping, as litgpt's loop: what the clip costs (at 7B with adamw8bit the
    # fit row idled in the optimizer after the clip's launches, docs/benchmarks.md)
    "fit-best-no-clip": {**BEST, "_clip": False},
    "fit-cudnn-no-tsm-ate": {**BEST, "loss_impl": "standard", "_callbacks": False},
    # gradient clipping as a separate multiply over every gradient (Lightning's
    # clip_grad_norm_), against fit-cudnn's clip inside the fused AdamW step
    "fit-cudnn-clip-multiply": {**BEST, "loss_impl": "standard", "_clip_by_multiply": True},
    "fit-cudnn-batch12": {**BEST, "loss_impl": "standard", "_batch_scale": 1.5},
    "fit-cudnn-batch16": {**BEST, "loss_impl": "standard", "_batch_scale": 2},
    "fit-best-fsdp": {**BEST, "compile": True, "_strategy": "aquila_fsdp"},
    # torchao float8 projections (the head stays bf16), on the standard-loss row
    "fit-float8": {**BEST, "loss_impl": "standard", "float8": "tensorwise"},
    "fit-float8-rowwise": {**BEST, "loss_impl": "standard", "float8": "rowwise"},
}
PLAIN_ROWS = ("litgpt", "aquila-plain", "litgpt-eager", "aquila-plain-eager")
DEFAULT_ROWS = ("litgpt", "aquila-plain", *FIT_ROWS)
QUICK_ROWS = ("litgpt", "aquila-plain", "fit-blocks", "fit-best", "fit-best-no-tsm-ate")


class Skipped(Exception):
    """A row that cannot run here (a package or the GPU is missing)."""


# -- the plain loop (peer and ours) ------------------------------------------------------------
def litgpt_model(config: AquilaConfig) -> torch.nn.Module:
    try:
        from litgpt import Config
        from litgpt.model import GPT
    except ImportError as error:
        raise Skipped(f"litgpt is not installed ({error})") from error
    lit = Config(
        name=config.name, block_size=config.max_seq_len, vocab_size=config.vocab_size,
        padded_vocab_size=config.vocab_size, n_layer=config.num_layers,
        n_head=config.num_heads, n_query_groups=config.num_kv_heads,
        n_embd=config.hidden_size, intermediate_size=config.intermediate_size, bias=False,
        norm_class_name="RMSNorm", norm_eps=config.norm_eps, mlp_class_name="LLaMAMLP",
        rotary_percentage=1.0, parallel_residual=False, rope_base=int(config.rope_theta),
    )
    return GPT(lit)


def plain_loop(row: str, config: AquilaConfig, args: argparse.Namespace,
               device: torch.device) -> dict[str, Any]:
    """Forward + loss (one compiled function), backward, AdamW step, zero_grad; nothing else."""
    torch.manual_seed(0)
    if row.startswith("litgpt"):
        model = litgpt_model(config).to(device)
        # litgpt's blocks, wrapped the way AquilaLM wraps ours (the same modes and wrapper)
        apply_activation_checkpointing_mode(SimpleNamespace(layers=model.transformer.h),
                                            args.activation_checkpointing)

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(x)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
    else:
        model = AquilaModel(config, attention=args.attention).to(device)
        apply_activation_checkpointing_mode(model, args.activation_checkpointing)

        def forward_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return model(x, labels=y)[0]
    if not row.endswith("eager") and args.compile:
        forward_loss = torch.compile(forward_loss)
    cuda = device.type == "cuda"
    optimizer = plain_optimizer(model, args.optimizer, cuda)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1),
                             generator=g).to(device) for _ in range(4)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)

    def train_step(step: int, memory: StepMemory | None = None) -> torch.Tensor:
        batch = batches[step % len(batches)]
        if memory:
            memory.step(step)
            memory.phase("forward")
        with autocast:
            loss = forward_loss(batch[:, :-1], batch[:, 1:])
        if memory:
            memory.phase("backward")
        loss.backward()
        if memory:
            memory.phase("optimizer")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    losses = [train_step(step) for step in range(args.warmup)]
    start = mark(cuda)
    timed_end = args.warmup + args.steps
    losses += [train_step(step) for step in range(args.warmup, timed_end)]
    seconds = elapsed(start, cuda)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    profiler = StepProfiler(args.profile, row, timed_end, args.profile_steps, cuda)
    if args.profile:  # untimed steps after the timed ones
        for step in range(timed_end, timed_end + args.profile_steps):
            profiler.step(step)
            train_step(step)
        profiler.step(timed_end + args.profile_steps)
    first = timed_end + (args.profile_steps if args.profile else 0)
    memory = StepMemory(args.memory, row, first, args.memory_steps, cuda)
    for step in range(first, first + memory.steps):  # untimed, after the profiled ones
        train_step(step, memory)
    memory.step(first + memory.steps)
    result = _result(row, config, args, args.batch_size, seconds, losses, peak)
    result.update(profile=profiler.summary, memory=memory.summary,
                  activation_checkpointing=args.activation_checkpointing,
                  optimizer=args.optimizer)
    # the two models must have the same shape for the comparison to mean anything
    result["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    return result


def plain_optimizer(model: torch.nn.Module, name: str, cuda: bool) -> torch.optim.Optimizer:
    """AdamW of the plain loop: fused ``torch.optim.AdamW``, or (``--optimizer adamw8bit``)
    what AquilaLM's ``optimizer='adamw8bit'`` builds, torchao's ``AdamW8bit`` with its update
    compiled once (``lightning_aquila.adamw8bit``): the peer gets the faster host side too."""
    if name == "adamw8bit":
        try:
            from lightning_aquila.adamw8bit import AdamW8bit
        except ImportError as error:
            raise Skipped(f"torchao is not installed (adamw8bit needs it: {error})") from error
        return AdamW8bit(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    return torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95),
                             weight_decay=0.1, fused=cuda or None)


# -- the fit path ------------------------------------------------------------------------------
def build_store(workdir: Path, domains: list[str] | None = None) -> str:
    """A zarr store of the bundled corpus (``domains``: its folders; default all), one domain
    per folder, through ``prepare`` with the bundled tokenizer."""
    try:
        from lightning_aquila.datamodules.prepare import prepare
    except ImportError as error:
        raise Skipped(f"the data stack (zarr) is not installed ({error})") from error
    store = str(workdir / "corpus.zarr")
    folders = sorted(p for p in (REPO / "corpus").iterdir() if p.is_dir())
    for folder in folders:
        if domains and folder.name not in domains:
            continue
        prepare([str(folder / "*.jsonl")], folder.name, store, progress=False)
    return store


def store_special_ids(store: str) -> dict[str, int]:
    """The bos/eos ids of the store's tokenizer, which the model must share (the run refuses
    to start otherwise, as ``lightning-aquila fit`` fills them from the store); the vocabulary
    stays the preset's, so every row does litgpt's FLOPs."""
    from lightning_aquila.datamodules.store import ShardStore
    from lightning_aquila.datamodules.store_tokenizer import store_tokenizer

    ids = store_tokenizer(ShardStore(store)).model_config()
    return {k: ids[k] for k in ("bos_token_id", "eos_token_id")}


def fit_row(row: str, config: AquilaConfig, args: argparse.Namespace, device: torch.device,
            store: str, workdir: Path) -> dict[str, Any]:
    from lightning.pytorch import Callback, Trainer
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.plugins.precision import Precision
    from lightning.pytorch.utilities import GradClipAlgorithmType

    from lightning_aquila import AquilaLM
    from lightning_aquila.callbacks import (
        AdaptiveTrainingEngine,
        BanditMixture,
        TrainingStateMonitor,
    )
    from lightning_aquila.datamodules import DomainDataModule

    class ClipByMultiply(AquilaLM):
        """Clipping as it was before the clip factor went into the fused AdamW step."""

        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None,
                                        gradient_clip_algorithm=None) -> None:
            Precision.clip_gradients(self.trainer.precision_plugin, optimizer,
                                     self.trainer.gradient_clip_val, GradClipAlgorithmType.NORM)

    options = dict(FIT_ROWS[row])
    batch_size = int(args.batch_size * options.pop("_batch_scale", 1))
    callbacks_on = options.pop("_callbacks", True)
    gradient_clip_val = 1.0 if options.pop("_clip", True) else None
    module_class = ClipByMultiply if options.pop("_clip_by_multiply", False) else AquilaLM
    strategy = options.pop("_strategy", "auto")
    if options["attention"] == "flash":
        try:
            import flash_attn.cute  # noqa: F401
        except ImportError as error:
            raise Skipped(f"flash-attn-4 is not installed ({error})") from error
    if options.get("float8") and importlib.util.find_spec("torchao") is None:
        raise Skipped("torchao is not installed (the float8 rows need it)")
    options.update(activation_checkpointing=args.activation_checkpointing,
                   optimizer=args.optimizer)
    if args.optimizer == "adamw8bit":
        if importlib.util.find_spec("torchao") is None:
            raise Skipped("torchao is not installed (adamw8bit needs it)")
        options["fused_optimizer"] = False  # torch's fused AdamW kernel; AdamW8bit has none
    if device.type != "cuda":
        options.update(compile=options["compile"] and args.compile, fused_optimizer=False)
        if strategy != "auto":
            raise Skipped("FSDP rows need a GPU")
    cuda = device.type == "cuda"

    timed_end = args.warmup + args.steps
    profiler = StepProfiler(args.profile, row, timed_end, args.profile_steps, cuda)
    first = timed_end + (args.profile_steps if args.profile else 0)
    memory = StepMemory(args.memory, row, first, args.memory_steps, cuda)

    class Clock(Callback):
        """Reads the clock after a synchronize at the end of warmup and of the timed steps;
        keeps each step's loss on the device (read once at the end: no per-step host sync).
        Profiled steps, then memory-measured steps, if any, come after the timed ones; their
        phases are marked from Lightning's hooks (the optimizer phase runs from
        ``on_before_optimizer_step``, before clipping, to the next step's start)."""

        def __init__(self) -> None:
            self.start: float | None = None
            self.seconds = 0.0
            self.peak: int | None = None
            self.losses: list[torch.Tensor] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            profiler.step(trainer.global_step)
            memory.step(trainer.global_step)
            memory.phase("forward")

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            memory.phase("backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            memory.phase("optimizer")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.losses.append(outputs["loss"].detach())
            if trainer.global_step == args.warmup:
                self.start = mark(cuda)
            elif trainer.global_step == timed_end:
                self.seconds = elapsed(self.start, cuda)
                self.peak = torch.cuda.max_memory_allocated() if cuda else None

        def on_train_end(self, trainer, pl_module) -> None:
            profiler.step(trainer.global_step)
            memory.step(trainer.global_step)

    clock = Clock()
    callbacks: list[Callback] = [clock]
    if callbacks_on:
        callbacks += [TrainingStateMonitor(run_dir=str(workdir / row)),
                      AdaptiveTrainingEngine(policy=BanditMixture(update_every=10))]
    torch.manual_seed(0)
    module = module_class(preset=args.preset, config={"max_seq_len": config.max_seq_len,
                                                      **store_special_ids(store)},
                          learning_rate=3e-4, warmup_steps=10, **options)
    data = DomainDataModule(store, seq_len=args.seq_len, batch_size=batch_size,
                            num_workers=args.num_workers, pin_memory=cuda,
                            val_windows_per_domain=0)
    trainer = Trainer(
        accelerator=device.type, devices=1, strategy=strategy,
        precision="bf16-mixed" if args.bf16 else "32-true",
        max_steps=first + memory.steps,
        gradient_clip_val=gradient_clip_val, log_every_n_steps=10,
        limit_val_batches=0, logger=CSVLogger(str(workdir / "logs"), name=row),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, default_root_dir=str(workdir / row),
    )
    trainer.fit(module, data)
    result = _result(row, config, args, batch_size, clock.seconds,
                     clock.losses[args.warmup:timed_end], clock.peak)
    result.update(options, tsm_ate=callbacks_on, gradient_clip_val=gradient_clip_val,
                  strategy=strategy, profile=profiler.summary,
                  memory=memory.summary)
    del trainer, module, data
    return result


# -- helpers -----------------------------------------------------------------------------------
def _result(row: str, config: AquilaConfig, args: argparse.Namespace, batch_size: int,
            seconds: float, losses: list[torch.Tensor], peak: int | None) -> dict[str, Any]:
    """``peak``: ``torch.cuda.max_memory_allocated`` at the end of the timed steps (read
    then, before untimed steps reset it), ``None`` on the CPU."""
    tokens = args.steps * batch_size * args.seq_len
    tokens_per_sec = tokens / seconds
    mfu = tokens_per_sec * config.flops_per_token(args.seq_len) / (args.peak_tflops * 1e12)
    values = torch.stack(losses[-args.steps:]).float().cpu().tolist() if losses else []
    return {
        "row": row, "preset": config.name, "seq_len": args.seq_len, "batch_size": batch_size,
        "steps": args.steps, "tokens_per_sec": round(tokens_per_sec), "mfu": round(mfu, 4),
        "peak_mem_GiB": round(peak / 2**30, 2) if peak is not None else None,
        "loss_first": round(values[0], 4) if values else None,
        "loss_last": round(values[-1], 4) if values else None,
        "losses": [round(v, 4) for v in values],
        "device": torch.cuda.get_device_name() if peak is not None else "cpu",
        "torch": torch.__version__,
    }


def _free(cuda: bool) -> None:
    gc.collect()
    torch._dynamo.reset()
    if cuda:
        torch.cuda.empty_cache()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=None,
                        help="default aquila2-1b (aquila2-tiny with --tiny)")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated; default all: {','.join(DEFAULT_ROWS)}")
    parser.add_argument("--quick", action="store_true",
                        help=f"rows {','.join(QUICK_ROWS)}, 15 timed steps after 8")
    parser.add_argument("--attention", default="cudnn", help="attention of aquila-plain")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="aquila2-tiny, seq 64, batch 2, 3+2 steps, no compile (smoke test)")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--domains", default=None,
                        help="corpus folders to prepare (comma-separated; default all six)")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default=None, help="append one JSON line per row here")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR",
                        help="profile --profile-steps steps after the timed ones; traces and "
                             "a summary per row go here")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--memory", type=Path, default=None, metavar="DIR",
                        help="after the timed (and profiled) steps, --memory-steps steps with "
                             "the peak memory of each phase (forward+loss, backward, "
                             "optimizer) and a torch.cuda.memory snapshot per row in DIR")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--activation-checkpointing", default="none", metavar="MODE",
                        help="none, full, op or every_N, for every row (AquilaLM's option; "
                             "the plain loop wraps litgpt's and our blocks the same way)")
    parser.add_argument("--optimizer", default="adamw", choices=("adamw", "adamw8bit"),
                        help="adamw: fused torch AdamW; adamw8bit: torchao's, every row")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup = 15, 8
    if args.tiny:
        args.preset = args.preset or "aquila2-tiny"
        args.seq_len, args.batch_size = 64, 2
        args.steps, args.warmup, args.compile, args.num_workers = 2, 3, False, 0
        args.domains = args.domains or "en_legal,code_python"
    args.preset = args.preset or "aquila2-1b"
    names = args.rows.split(",") if args.rows else list(QUICK_ROWS if args.quick
                                                        else DEFAULT_ROWS)
    unknown = [n for n in names if n not in FIT_ROWS and n not in PLAIN_ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; known: {[*PLAIN_ROWS, *FIT_ROWS]}")
    args.row_names = names
    try:
        args.activation_checkpointing = activation_checkpointing_mode(
            args.activation_checkpointing)
    except ValueError as error:
        parser.error(str(error))
    args.bf16 = args.device == "cuda" or not args.tiny
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu --tiny for the smoke test")
    config = AquilaConfig.from_name(args.preset, max_seq_len=max(args.seq_len, 64))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fit_throughput_") as tmp:
        workdir = Path(tmp)
        store: str | None = None
        for name in args.row_names:
            try:
                if name in PLAIN_ROWS:
                    row = plain_loop(name, config, args, device)
                else:
                    store = store or build_store(
                        workdir, args.domains.split(",") if args.domains else None)
                    row = fit_row(name, config, args, device, store, workdir)
            except Skipped as reason:
                row = {"row": name, "skipped": str(reason)}
            except Exception as error:  # one failing lever must not cost the other rows
                traceback.print_exc()
                row = {"row": name, "failed": f"{type(error).__name__}: {error}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
            _free(cuda)
    print_table(rows)
    print_profiles(rows)
    print_memory(rows)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    peer = next((r for r in rows if r["row"] == "litgpt" and "tokens_per_sec" in r), None)
    device = next((r["device"] for r in rows if "device" in r), "?")
    print(f"\ndevice: {device}\n")
    print("| row | tokens/s | vs litgpt | MFU | peak GiB | batch | loss first → last |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "tokens_per_sec" not in r:
            print(f"| {r['row']} | {r.get('skipped') or r.get('failed')} | | | | | |")
            continue
        ratio = f"{r['tokens_per_sec'] / peer['tokens_per_sec']:.3f}×" if peer else "–"
        print(f"| {r['row']} | {r['tokens_per_sec']:,} | {ratio} | {r['mfu']:.1%} | "
              f"{r['peak_mem_GiB']} | {r['batch_size']} | {r['loss_first']} → {r['loss_last']} |")


if __name__ == "__main__":
    main()
