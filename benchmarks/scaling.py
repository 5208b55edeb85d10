"""Scaling runs of the real fit path on 1 to 8 GPUs, and what each layout needs in memory.

A configuration is ``configs/scaling/<name>.yaml`` on top of ``configs/scaling/base.yaml``:
the preset, the strategy and tensor-parallel size, the number of GPUs it is written for,
the sequence length, the micro-batch, activation checkpointing, compile and the optimizer.
``run`` trains it for ``--steps`` optimizer steps through ``python -m lightning_aquila.cli
fit`` (the DomainDataModule on a zarr store; the Training State Monitor and the default
adaptive policy, ODM's EXP3 bandit, attached), on ``--gpus`` devices, started by
Lightning's launcher or by torchrun. It then reads the monitor's run file
(``<run>/tsm/metrics.jsonl``) and prints the table of docs/benchmarks.md ("Scaling"):

* tokens/s per GPU: the monitor's ``tsm/tokens_per_sec`` (tokens of a tensor-parallel group
  counted once), over the intervals after ``--warmup-steps`` (compile, first all-gathers),
  combined as total tokens over total time;
* MFU: the monitor's ``tsm/mfu``, ``(6·N + 12·L·H·T)`` FLOPs per token (N without the input
  embedding) against 989 TFLOP/s, dense bf16 of an H100 and of an H200 alike;
* peak memory per GPU: ``tsm/peak_memory_gib``, the most any rank's allocator handed out;
* scaling efficiency: tokens/s per GPU against the same configuration's runs on 1, 2 and 4
  GPUs under the same ``--out``;
* the loss curve (``tsm/loss`` every step): the largest absolute difference, step by step,
  from the same configuration at a smaller data-parallel size.

The global batch (``micro-batch × data-parallel size × accumulation``) is the configuration's
at its own GPU count whatever ``--gpus`` is: on fewer GPUs each rank accumulates more
micro-batches. So every run of a configuration takes the same optimizer steps on the same
windows (the DMU's global sample sequence depends on the global batch, not on the layout),
and the curves can be held against each other. Only the adaptive policy can make them part:
it reads the losses, and bf16 rounds them differently on another layout.

Usage (from the repository root; one run folder per configuration and GPU count under
``--out``)::

    python benchmarks/scaling.py run --config 7b-fsdp --store STORE --gpus 8 --steps 300
    python benchmarks/scaling.py run --config 7b-fsdp --store STORE --gpus 2 4 --steps 60
    python benchmarks/scaling.py table --out runs/scaling
    python benchmarks/scaling.py compare runs/scaling/7b-fsdp-8gpu runs/scaling/7b-fsdp-4gpu
    python benchmarks/scaling.py memory            # the estimate table, no GPU needed

``run`` flags override the configuration: ``--preset``, ``--strategy``, ``--tp``,
``--seq-len``, ``--micro-batch``, ``--activation-checkpointing``, ``--compile``,
``--optimizer``, ``--global-batch``; an overridden field goes into the run's name. At toy
scale on CPU (the CI test): ``--toy`` adds ``configs/scaling/cpu-toy.yaml`` (aquila2-tiny,
gloo, fp32) and ``--gpus`` counts CPU processes.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "scaling"
NOT_CONFIGS = ("base", "cpu-toy")
GiB = 2**30
#: Memory of one card as ``torch.cuda.get_device_properties().total_memory`` reports it
#: (nvidia-smi: 81,559 MiB and 143,771 MiB); a layout "fits" below ``FIT_SHARE`` of it, the
#: rest being the CUDA context, NCCL buffers and the allocator's fragmentation.
CARDS = {"H100 80GB": 81_559 * 2**20, "H200 141GB": 143_771 * 2**20}
FIT_SHARE = 0.9
PEAK_TFLOPS = 989.0  # dense bf16, H100 and H200 SXM
NOT_RUN = "not run: no 8-GPU host lent on 2026-11-26"


# -- the layout of a run -----------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """What decides a run's speed and memory, as the configuration and the flags set it."""

    preset: str
    gpus: int
    tp: int
    micro_batch: int
    seq_len: int
    global_batch: int
    activation_checkpointing: bool | str = False  # as AquilaLM takes it: true, "op", "every_2"
    compile: bool | str = False
    optimizer: str = "adamw"
    loss_impl: str = "standard"
    cpu_offload: bool = False
    strategy: str = "aquila_fsdp"

    @property
    def dp(self) -> int:
        return self.gpus // self.tp

    @property
    def accumulate(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def check(self) -> Layout:
        if self.gpus % self.tp:
            raise SystemExit(f"tensor-parallel size {self.tp} does not divide {self.gpus} GPUs")
        if self.global_batch % (self.micro_batch * self.dp):
            raise SystemExit(f"the global batch of {self.global_batch} windows is not a multiple"
                             f" of micro-batch {self.micro_batch} × data-parallel size {self.dp}")
        return self


def read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def config_path(name: str) -> Path:
    path = Path(name)
    if path.suffix == ".yaml" and path.is_file():
        return path
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem not in NOT_CONFIGS)
        raise SystemExit(f"unknown scaling configuration {name!r}; known: {known}")
    return path


def merged(*documents: dict[str, Any]) -> dict[str, Any]:
    """Nested dictionaries merged as jsonargparse merges ``--config`` files: later wins,
    mappings merge key by key, anything else (lists included) is replaced."""
    out: dict[str, Any] = {}
    for document in documents:
        for key, value in document.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merged(out[key], value)
            else:
                out[key] = value
    return out


def layout_of(config: dict[str, Any]) -> Layout:
    """The layout a merged configuration describes, at its own GPU count."""
    trainer, model = config["trainer"], config["model"]
    data = config["data"]["init_args"]
    strategy = trainer.get("strategy", "aquila_fsdp")
    if isinstance(strategy, dict):
        args = strategy.get("init_args", {})
        tp, dp = args.get("tensor_parallel_size", "auto"), args.get("data_parallel_size", "auto")
        if tp == "auto":  # as AquilaParallelStrategy resolves it on one node
            tp = trainer["devices"] // dp if dp != "auto" else trainer["devices"]
        name = "aquila_tp_fsdp" if args.get("fsdp", True) else "aquila_tp"
        offload = args.get("cpu_offload", False)
    else:
        name, tp, offload = strategy, 1, strategy == "aquila_fsdp_offload"
        if strategy in ("aquila_tp", "aquila_tp_fsdp"):
            tp = trainer["devices"]
    gpus = trainer["devices"]
    micro = data["batch_size"]
    accumulate = trainer.get("accumulate_grad_batches", 1)
    return Layout(
        preset=model["preset"], gpus=gpus, tp=int(tp), micro_batch=micro,
        seq_len=data["seq_len"], global_batch=micro * (gpus // int(tp)) * accumulate,
        activation_checkpointing=model.get("activation_checkpointing", False),
        compile=model.get("compile", False), optimizer=model.get("optimizer", "adamw"),
        loss_impl=model.get("loss_impl", "standard"), cpu_offload=offload, strategy=name,
    ).check()


#: ``run`` flag -> Layout field
OVERRIDES = {"preset": "preset", "strategy": "strategy", "tp": "tp", "seq_len": "seq_len",
             "micro_batch": "micro_batch", "activation_checkpointing": "activation_checkpointing",
             "compile": "compile", "optimizer": "optimizer", "global_batch": "global_batch"}


def run_name(config: str, overrides: dict[str, Any], gpus: int) -> str:
    short = {"preset": "", "strategy": "", "tp": "tp", "seq_len": "seq", "micro_batch": "mb",
             "activation_checkpointing": "ac", "compile": "compile", "optimizer": "",
             "global_batch": "gb"}
    parts = [Path(config).stem]
    for field, value in overrides.items():
        value = int(value) if isinstance(value, bool) else value
        parts.append(f"{short[field]}{value}")
    return "-".join([*parts, f"{gpus}gpu"])


def strategy_block(layout: Layout) -> Any:
    """``trainer.strategy`` for the layout: a registered name when it says everything, else
    ``AquilaParallelStrategy`` with the tensor-parallel size."""
    if layout.tp == 1 and layout.strategy in ("aquila_fsdp", "aquila_fsdp_offload"):
        return layout.strategy
    return {"class_path": "lightning_aquila.strategies.AquilaParallelStrategy",
            "init_args": {"tensor_parallel_size": layout.tp, "data_parallel_size": "auto",
                          "fsdp": layout.strategy != "aquila_tp",
                          "cpu_offload": layout.cpu_offload}}


def layout_file(layout: Layout, model_config: dict[str, Any], steps: int, store: str,
                run_dir: Path, callbacks: list[dict[str, Any]] | None = None) -> Path:
    """The run's own ``--config``, last on the command line: the layout at this GPU count
    (and ``callbacks``, when given, in place of the configuration's)."""
    import yaml

    document = {
        "trainer": {"devices": layout.gpus, "strategy": strategy_block(layout),
                    "accumulate_grad_batches": layout.accumulate, "max_steps": steps,
                    "default_root_dir": str(run_dir)},
        "model": {"preset": layout.preset, "activation_checkpointing":
                  layout.activation_checkpointing, "compile": layout.compile,
                  "optimizer": layout.optimizer, "loss_impl": layout.loss_impl,
                  "config": {**model_config,
                             "max_seq_len": max(layout.seq_len,
                                                model_config.get("max_seq_len", 0))}},
        "data": {"init_args": {"store": store, "seq_len": layout.seq_len,
                               "batch_size": layout.micro_batch}},
    }
    if callbacks is not None:
        document["trainer"]["callbacks"] = callbacks
    path = run_dir / "layout.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def toy_callbacks(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The configuration's callbacks with a nominal peak for the monitor: Lightning knows no
    CPU's peak FLOP/s, so a toy run on the CPU reads MFU against an H100's, as a GPU run
    reads it against its own chip's."""
    callbacks = json.loads(json.dumps(config["trainer"].get("callbacks") or []))
    for callback in callbacks:
        if str(callback.get("class_path", "")).endswith("TrainingStateMonitor"):
            callback.setdefault("init_args", {})["peak_flops"] = PEAK_TFLOPS * 1e12
    return callbacks


def fit_command(configs: list[Path], launcher: str, gpus: int) -> list[str]:
    fit = ["-m", "lightning_aquila.cli", "fit", *[a for c in configs for a in ("--config", str(c))]]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(gpus), *fit]
    return [sys.executable, *fit]  # Lightning's launcher starts the other ranks


def run(args: argparse.Namespace) -> list[str]:
    """Train the configuration at each GPU count of ``--gpus``; the runs that failed."""
    config = config_path(args.config)
    # the toy file last: it scales any configuration down, whatever that sets
    files = [CONFIGS / "base.yaml", config, *([CONFIGS / "cpu-toy.yaml"] if args.toy else [])]
    resolved = merged(*(read_yaml(f) for f in files))
    base = layout_of(resolved)
    overrides = {f: getattr(args, a) for a, f in OVERRIDES.items() if getattr(args, a) is not None}
    if "strategy" in overrides and "tp" not in overrides and overrides["strategy"] in (
            "aquila_fsdp", "aquila_fsdp_offload"):
        overrides["tp"] = 1
    if overrides.get("strategy") == "aquila_fsdp_offload":
        overrides["cpu_offload"] = True
    base = replace(base, **{k: v for k, v in overrides.items()})
    failed = []
    for gpus in args.gpus:
        layout = replace(base, gpus=gpus).check()
        name = run_name(config.stem, {k: v for k, v in overrides.items() if k in OVERRIDES},
                        gpus)
        run_dir = args.out / name
        if (run_dir / "scaling.json").is_file() and not args.again:
            print(f"{name}: done before (--again to repeat)", flush=True)
            continue
        if run_dir.exists():  # a failed or repeated run: fit refuses another run's files
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        model_config = dict(resolved["model"].get("config") or {})
        mine = layout_file(layout, model_config, args.steps, args.store, run_dir,
                           toy_callbacks(resolved) if args.toy else None)
        command = fit_command([*files, mine], args.launcher, gpus)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(command)}", flush=True)
        started = time.time()
        with open(run_dir / "fit.log", "w", encoding="utf-8") as log:
            code = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  check=False).returncode
        seconds = time.time() - started
        if code:
            tail = (run_dir / "fit.log").read_text(encoding="utf-8").splitlines()[-30:]
            print(f"{name}: FAILED (exit {code}); the end of {run_dir / 'fit.log'}:\n"
                  + "\n".join(tail), flush=True)
            failed.append(name)
            continue
        warmup = args.warmup_steps if args.warmup_steps is not None else (0 if args.toy else 20)
        result = summarise(run_dir, layout, warmup)
        result.update(name=name, config=config.stem, seconds=round(seconds, 1),
                      device=device_name(args.toy), steps=args.steps)
        (run_dir / "scaling.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"{name}: {result['tokens_per_sec_per_gpu']:,.0f} tokens/s per GPU, "
              f"MFU {result['mfu']:.1%}, {seconds:.0f} s", flush=True)
    return failed


def device_name(toy: bool) -> str:
    if toy:
        return "cpu"
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # the name is for the record only
        return "unknown"


# -- reading a run -----------------------------------------------------------------------------
def metrics(run_dir: Path) -> list[dict[str, Any]]:
    """``tsm/metrics.jsonl``, skipping a torn last line."""
    rows = []
    for line in (run_dir / "tsm" / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def loss_curve(run_dir: Path) -> dict[int, float]:
    """Step -> the step's global training loss (the last record of a step wins)."""
    return {int(r["step"]): float(r["tsm/loss"]) for r in metrics(run_dir) if "tsm/loss" in r}


def summarise(run_dir: Path, layout: Layout, warmup_steps: int) -> dict[str, Any]:
    """Throughput, MFU, peak memory and the loss curve of a finished run. Each throughput
    record covers the same number of tokens, so the run's rate is their harmonic mean."""
    rows = metrics(run_dir)
    timed = [r for r in rows if "tsm/tokens_per_sec" in r]
    after = [r for r in timed if r["step"] > warmup_steps] or timed
    if not after:
        raise SystemExit(f"{run_dir}: the monitor logged no throughput (too few steps?)")
    rate = len(after) / sum(1.0 / r["tsm/tokens_per_sec"] for r in after)
    mfus = [r["tsm/mfu"] for r in after if "tsm/mfu" in r]
    mfu = len(mfus) / sum(1.0 / m for m in mfus) if mfus and all(mfus) else 0.0
    peaks = [r["tsm/peak_memory_gib"] for r in rows if "tsm/peak_memory_gib" in r]
    return {**asdict(layout), "dp": layout.dp, "accumulate": layout.accumulate,
            "tokens_per_sec_per_gpu": rate, "mfu": mfu,
            "peak_memory_gib": max(peaks) if peaks else None,
            "timed_intervals": len(after), "timed_to_step": after[-1]["step"],
            "losses": {str(k): v for k, v in sorted(loss_curve(run_dir).items())}}


def compare_curves(a: dict[int, float], b: dict[int, float]) -> dict[str, Any]:
    """Step by step over the steps both curves have: the largest absolute difference and
    where it is, the mean one, and each curve's mean over the last ten common steps."""
    common = sorted(set(a) & set(b))
    if not common:
        raise SystemExit("the two runs have no step in common")
    gaps = {s: abs(a[s] - b[s]) for s in common}
    worst = max(common, key=gaps.__getitem__)
    tail = common[-10:]
    return {"steps": len(common), "first": common[0], "last": common[-1],
            "max_abs_diff": gaps[worst], "at_step": worst,
            "mean_abs_diff": sum(gaps.values()) / len(gaps),
            "tail_mean_a": sum(a[s] for s in tail) / len(tail),
            "tail_mean_b": sum(b[s] for s in tail) / len(tail)}


# -- the table ---------------------------------------------------------------------------------
def load_results(out: Path) -> list[dict[str, Any]]:
    found = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(out.glob("*/scaling.json"))]
    return sorted(found, key=lambda r: (r["config"], r["name"].rsplit("-", 1)[0], r["gpus"]))


def family(result: dict[str, Any]) -> str:
    """Runs of one configuration with the same overrides differ only in their GPU count."""
    return result["name"].rsplit("-", 1)[0]


def efficiency(result: dict[str, Any], results: list[dict[str, Any]]) -> str:
    peers = {r["gpus"]: r for r in results if family(r) == family(result)}
    cells = []
    for n in (1, 2, 4):
        if n < result["gpus"] and n in peers:
            ratio = result["tokens_per_sec_per_gpu"] / peers[n]["tokens_per_sec_per_gpu"]
            cells.append(f"{n}: {ratio:.0%}")
        elif n < result["gpus"]:
            cells.append(f"{n}: –")
    return ", ".join(cells) or "–"


def loss_cell(result: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """Against the same configuration's run at the next smaller data-parallel size."""
    smaller = [r for r in results if family(r) == family(result) and r["dp"] < result["dp"]]
    if not smaller:
        return "–"
    peer = max(smaller, key=lambda r: r["dp"])
    diff = compare_curves({int(k): v for k, v in result["losses"].items()},
                          {int(k): v for k, v in peer["losses"].items()})
    return (f"{diff['max_abs_diff']:.3g} (step {diff['at_step']}) vs DP {peer['dp']}, "
            f"{diff['steps']} steps")


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| run | device | GPUs | TP × DP | micro-batch × accumulation | tokens/s/GPU | MFU "
             "| peak GiB/GPU | scaling efficiency vs 1 / 2 / 4 GPUs | max |Δ loss| per step |",
             "|---|---|---:|---|---|---:|---:|---:|---|---|"]
    for r in results:
        peak = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "–"
        lines.append(
            f"| {r['name']} | {r['device']} | {r['gpus']} | {r['tp']} × {r['dp']} | "
            f"{r['micro_batch']} × {r['accumulate']} | {r['tokens_per_sec_per_gpu']:,.0f} | "
            f"{r['mfu']:.1%} | {peak} | {efficiency(r, results)} | {loss_cell(r, results)} |")
    return "\n".join(lines)


# -- memory ------------------------------------------------------------------------------------
def local_parameter_numels(config: Any, tp: int, dp: int) -> dict[str, int]:
    """Elements of each parameter one GPU holds: split over ``tp`` as the tensor-parallel
    plan splits it (``tensor_parallel_plan``: column-parallel layers on their output rows,
    row-parallel ones on their input columns, the embedding on its vocabulary rows, the norms
    replicated), then over ``dp`` on dimension 0 as FSDP2 shards it (padded to equal shards).
    Counted on a model built on the meta device, so the 34B and 70B presets cost nothing."""
    import torch
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    from lightning_aquila import AquilaModel
    from lightning_aquila.strategies.parallelize import tensor_parallel_plan

    with torch.device("meta"):
        model = AquilaModel(config)
    root, block = tensor_parallel_plan()
    numels = {}
    for module_name, module in model.named_modules():
        parts = module_name.split(".")
        plan, key = (block, ".".join(parts[2:])) if parts[0] == "layers" else (root, module_name)
        style = plan.get(key)
        for name, parameter in module.named_parameters(recurse=False):
            shape = list(parameter.shape)
            if tp > 1 and isinstance(style, (ColwiseParallel, RowwiseParallel)):
                # Linear weights are (out, in); an embedding's is (vocabulary, hidden)
                rowwise = isinstance(style, RowwiseParallel)
                dim = 0 if rowwise == isinstance(module, nn.Embedding) else 1
                shape[dim] //= tp
            shape[0] = math.ceil(shape[0] / dp)
            numels[f"{module_name}.{name}"] = math.prod(shape)
    return numels


def adamw8bit_bytes(numel: int) -> int:
    """torchao's AdamW8bit state of one local tensor: two uint8 moments and an fp32 scale per
    256 values, where the tensor has at least 4,096 values in whole blocks; else fp32."""
    if numel >= 4096 and numel % 256 == 0:
        return 2 * (numel + 4 * numel // 256)
    return 8 * numel


def activation_bytes_per_token(config: Any, tp: int) -> dict[str, float]:
    """Bytes kept for backward per token by one decoder block and by the head, bf16 compute
    without compile (counted from the saved tensors of ``model.py``'s operations).

    Per block: each RMSNorm keeps its fp32 input copy and its bf16 output (``6·H``); with
    sequence parallelism both are split over ``tp`` and each projection input all-gathered
    from them (``2·H``) is kept too. Attention keeps q, k, v after RoPE and its output
    (``4·H + 4·K``), the SwiGLU MLP gate, silu, up and product (``8·I``), split over ``tp``.
    """
    h, i = config.hidden_size, config.intermediate_size
    k = config.num_kv_heads * config.head_dim
    gathered = 2 * h if tp > 1 else 0
    norm = 6 * h / tp + gathered
    block = 2 * norm + (4 * h + 4 * k + 4 * config.num_heads) / tp + 8 * i / tp
    return {"block": block, "block_input": 2 * h / tp, "final_norm": norm}


def estimate_memory(layout: Layout, config: Any | None = None) -> dict[str, float]:
    """Bytes per GPU, by part, of ``layout`` under ``AquilaParallelStrategy`` with FSDP2
    (bf16 compute and all-gathers, fp32 sharded weights, gradients and reduce-scatter) and
    optional tensor parallelism; eager kernels (``compile`` keeps fewer activations).

    * parameters, gradients: the local fp32 shards (``local_parameter_numels``);
    * optimizer: AdamW's two fp32 moments, or AdamW8bit's (``adamw8bit_bytes``);
    * gathered: what FSDP2 holds unsharded at the worst moment of backward: two blocks' bf16
      weights (the current one and the prefetched next), one block's bf16 gradients and
      their fp32 copy for the reduce-scatter, and the output head's bf16 weight, kept from
      forward to backward;
    * activations: with activation checkpointing each block's bf16 input plus one block
      recomputed, else every block's saved tensors (``activation_bytes_per_token``);
      ``every_N`` checkpoints that share of the blocks; ``op`` (matmul and attention outputs
      kept) is not modelled and counted as no checkpointing, which overestimates it;
    * loss: ``standard`` keeps the fp32 log-softmax of the (vocabulary-split) logits and at
      its backward an fp32 and a bf16 gradient of them (10 bytes per logit); ``chunked``
      keeps the hidden states' gradient and the head weight's fp32 gradient, plus one
      chunk of 4,096 tokens' logits at a time;
    * host: with CPU offload the shards, gradients and optimizer state live in host memory
      (per GPU; a host holds that times its GPUs) and leave the GPU.

    Not counted: the CUDA context, NCCL buffers, the caching allocator's fragmentation and
    compile workspaces, hence the fitting rule's margin (``FIT_SHARE``).
    """
    from lightning_aquila import AquilaConfig
    from lightning_aquila.strategies.activation_checkpoint import (
        activation_checkpointing_mode,
        checkpointed_blocks,
    )

    config = config or AquilaConfig.from_name(layout.preset, max_seq_len=layout.seq_len)
    tp, dp = layout.tp, layout.dp
    numels = local_parameter_numels(config, tp, dp)
    local = sum(numels.values())
    if layout.optimizer == "adamw8bit":
        optimizer = sum(adamw8bit_bytes(n) for n in numels.values())
    else:
        optimizer = 8 * local
    block_numel = sum(n for name, n in numels.items() if name.startswith("layers.0.")) * dp
    head_numel = config.vocab_size * config.hidden_size // tp
    gathered = block_numel * (2 * 2 + 2 + 4) + 2 * head_numel
    tokens = layout.micro_batch * layout.seq_len
    per_token = activation_bytes_per_token(config, tp)
    mode = activation_checkpointing_mode(layout.activation_checkpointing)
    checkpointed = 0 if mode == "op" else len(checkpointed_blocks(mode, config.num_layers))
    activations = tokens * (checkpointed * per_token["block_input"]
                            + (config.num_layers - checkpointed) * per_token["block"])
    if checkpointed:
        activations += tokens * per_token["block"]  # the block being recomputed
    activations += tokens * per_token["final_norm"]
    vocab = config.vocab_size / tp
    if layout.loss_impl == "chunked":
        loss = tokens * 2 * config.hidden_size + 4 * head_numel + 10 * min(tokens, 4096) * vocab
    else:
        loss = 10 * tokens * vocab
    parts = {"parameters": 4 * local, "gradients": 4 * local, "optimizer": optimizer,
             "gathered": gathered, "activations": activations, "loss": loss, "host": 0.0}
    if layout.cpu_offload:
        parts["host"] = parts["parameters"] + parts["gradients"] + parts["optimizer"]
        parts["parameters"] = parts["gradients"] = parts["optimizer"] = 0.0
    parts["total"] = sum(v for k, v in parts.items() if k != "host")
    return parts


def fits(total: float, card: str) -> str:
    """``fits`` below ``FIT_SHARE`` of the card, ``tight`` up to all of it, with the share."""
    share = total / CARDS[card]
    verdict = "fits" if share <= FIT_SHARE else ("tight" if share <= 1.0 else "does not fit")
    return f"{verdict} ({share:.0%})"


def ac_cell(value: bool | str) -> str:
    """The memory table's AC column: on and off as before, a selective mode by name."""
    return {True: "on", False: "off", "none": "off", "full": "on"}.get(value, str(value))


def memory_table(layouts: dict[str, Layout]) -> str:
    lines = ["| layout | GPUs | TP × DP | micro-batch | AC | optimizer | parameters | gradients "
             "| optimizer state | gathered | activations | loss | total GiB/GPU | "
             + " | ".join(CARDS) + " |",
             "|---|---:|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|"
             + "---|" * len(CARDS)]
    for name, layout in layouts.items():
        parts = estimate_memory(layout)
        cells = [f"{parts[k] / GiB:.1f}" for k in ("parameters", "gradients", "optimizer",
                                                    "gathered", "activations", "loss", "total")]
        verdicts = [fits(parts["total"], card) for card in CARDS]
        lines.append(f"| {name} | {layout.gpus} | {layout.tp} × {layout.dp} | "
                     f"{layout.micro_batch} | {ac_cell(layout.activation_checkpointing)}"
                     f" | {layout.optimizer} | " + " | ".join(cells) + " | "
                     + " | ".join(verdicts) + " |")
    return "\n".join(lines)


#: The variant of each configuration that docs/benchmarks.md plans next to its own layout:
#: activation checkpointing for the 7B (what lets its 2-GPU baseline fit an H100), 8-bit
#: AdamW for the 34B (its optimizer state is what does not fit).
VARIANTS: dict[str, dict[str, Any]] = {
    "7b-fsdp": {"activation_checkpointing": True}, "7b-tp2-dp4": {"activation_checkpointing": True},
    "34b-tp4-dp2": {"optimizer": "adamw8bit"}, "34b-tp8": {"optimizer": "adamw8bit"}}


def planned_layouts(gpu_counts: Sequence[int] = (1, 2, 4, 8)) -> dict[str, Layout]:
    """Every configuration of configs/scaling, and its ``VARIANTS`` entry, at each GPU count
    its tensor-parallel size and global batch allow; smallest model first."""
    from lightning_aquila import AquilaConfig

    base = read_yaml(CONFIGS / "base.yaml")
    own = {p.stem: layout_of(merged(base, read_yaml(p))) for p in CONFIGS.glob("*.yaml")
           if p.stem not in NOT_CONFIGS}
    layouts = {}
    for name in sorted(own, key=lambda n: (AquilaConfig.from_name(own[n].preset).num_params, n)):
        variant = VARIANTS.get(name, {})
        for gpus in gpu_counts:
            layout = replace(own[name], gpus=gpus)
            if gpus % layout.tp or layout.global_batch % (layout.micro_batch * layout.dp):
                continue
            label = f"{name}, {gpus} GPU{'s' if gpus > 1 else ''}"
            layouts[label] = layout
            if variant:
                words = ", ".join("AC" if k == "activation_checkpointing" else str(v)
                                  for k, v in variant.items())
                layouts[f"{label}, {words}"] = replace(layout, **variant)
    return layouts


# -- the command -------------------------------------------------------------------------------
def as_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "on", "yes"):
        return True
    if text.lower() in ("false", "0", "off", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def as_activation_checkpointing(text: str) -> bool | str:
    """true/false as before, or one of AquilaLM's modes (``full``, ``op``, ``every_N``)."""
    try:
        return as_bool(text)
    except argparse.ArgumentTypeError:
        pass
    from lightning_aquila.strategies.activation_checkpoint import activation_checkpointing_mode

    try:
        return activation_checkpointing_mode(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def as_compile(text: str) -> bool | str:
    return text if text in ("blocks", "model") else as_bool(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", allow_abbrev=False,
                                     help="train a configuration, then print the table")
    run_parser.add_argument("--config", required=True,
                            help="a name of configs/scaling (7b-fsdp, 7b-tp2-dp4, 34b-tp4-dp2, "
                                 "34b-tp8) or a YAML path")
    run_parser.add_argument("--store", required=True, help="the shard store to train on")
    run_parser.add_argument("--gpus", nargs="+", type=int, required=True,
                            help="GPU counts (CPU processes with --toy), one run each")
    run_parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    run_parser.add_argument("--warmup-steps", type=int, default=None,
                            help="throughput intervals ending at or before this step are left "
                                 "out (compile, first all-gathers); default 20, 0 with --toy")
    run_parser.add_argument("--launcher", choices=["lightning", "torchrun"], default="lightning")
    run_parser.add_argument("--toy", action="store_true",
                            help="add configs/scaling/cpu-toy.yaml: aquila2-tiny on CPU, gloo")
    run_parser.add_argument("--again", action="store_true", help="repeat runs done before")
    run_parser.add_argument("--preset")
    run_parser.add_argument("--strategy", choices=["aquila_fsdp", "aquila_fsdp_offload",
                                                   "aquila_tp", "aquila_tp_fsdp"])
    run_parser.add_argument("--tp", type=int, help="tensor-parallel size")
    run_parser.add_argument("--seq-len", type=int)
    run_parser.add_argument("--micro-batch", type=int, help="windows per data-parallel rank")
    run_parser.add_argument("--activation-checkpointing", type=as_activation_checkpointing,
                            help="true, false, op or every_N")
    run_parser.add_argument("--compile", type=as_compile, help="false, true/blocks or model")
    run_parser.add_argument("--optimizer", choices=["adamw", "adamw8bit"])
    run_parser.add_argument("--global-batch", type=int,
                            help="windows per optimizer step (default: the configuration's)")
    for sub in (run_parser, commands.add_parser("table", allow_abbrev=False,
                                                help="the table of the runs under --out")):
        sub.add_argument("--out", type=Path, default=Path("runs/scaling"))
    compare = commands.add_parser("compare", allow_abbrev=False,
                                  help="two runs' training loss, step by step")
    compare.add_argument("runs", nargs=2, type=Path, help="two run folders")
    compare.add_argument("--tolerance", type=float, default=None,
                         help="exit 1 when the largest difference exceeds this")
    memory = commands.add_parser("memory", allow_abbrev=False,
                                 help="per-GPU memory estimate of the configurations")
    memory.add_argument("--gpus", nargs="+", type=int, default=[1, 2, 4, 8])
    args = parser.parse_args(argv)

    if args.command == "memory":
        print(memory_table(planned_layouts(args.gpus)))
        return 0
    if args.command == "compare":
        a, b = (loss_curve(path) for path in args.runs)
        diff = compare_curves(a, b)
        print(f"{args.runs[0]} vs {args.runs[1]}: {diff['steps']} common steps "
              f"({diff['first']}-{diff['last']}); max |Δ loss| {diff['max_abs_diff']:.4g} at "
              f"step {diff['at_step']}, mean {diff['mean_abs_diff']:.4g}; last ten steps' mean "
              f"{diff['tail_mean_a']:.4f} vs {diff['tail_mean_b']:.4f}")
        tolerance = args.tolerance
        return int(tolerance is not None and diff["max_abs_diff"] > tolerance)
    failed = run(args) if args.command == "run" else []
    results = load_results(args.out)
    if not results:
        print(f"no finished runs under {args.out}", file=sys.stderr)
        return 1
    print(table(results))
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return int(bool(failed))


if __name__ == "__main__":
    sys.exit(main())
