"""Host time of one 8-bit AdamW step: torchao's ``AdamW8bit`` against
``lightning_aquila.adamw8bit.AdamW8bit`` (the same update, its compile wrapper built once), over
the parameter tensors of a preset in two layouts: ours (separate q/k/v and gate/up weights,
decayed and undecayed groups, as ``AquilaLM`` builds them) and litgpt's (fused qkv and fc,
one group, as the fit benchmark's plain loop builds it).

On one GPU a 7B step's optimizer is host-bound (docs/benchmarks.md, "Fit path"): the GPU idles
while the host steps 291 tensors one compiled call each. ``host ms`` is the time until
``step()`` returns; ``wall ms`` waits for the device as well. ``--shrink K`` divides every
dimension by K (the tensor count and the layout stay), for a CPU run.

    PYTHONPATH=$PWD python benchmarks/optimizer_host.py --preset aquila2-7b          # one GPU
    PYTHONPATH=$PWD python benchmarks/optimizer_host.py --preset aquila2-7b --shrink 64   # CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from pathlib import Path

import torch

from lightning_aquila.model import AquilaConfig, AquilaModel


def aquila_layout(config: AquilaConfig) -> list[tuple[tuple[int, ...], float]]:
    """(shape, weight decay) of every parameter, in AquilaLM's group order."""
    with torch.device("meta"):
        shapes = [tuple(p.shape) for p in AquilaModel(config).parameters()]
    return ([(s, 0.1) for s in shapes if len(s) >= 2] + [(s, 0.0) for s in shapes if len(s) < 2])


def litgpt_layout(config: AquilaConfig) -> list[tuple[tuple[int, ...], float]]:
    """litgpt's ``GPT`` of the same shape: per block norm_1, attn.qkv, attn.proj, norm_2,
    mlp.fc_1, mlp.fc_2, mlp.proj; every tensor decayed, as the plain loop's one group."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = h + 2 * config.num_kv_heads * config.head_dim
    block = [(h,), (qkv, h), (h, h), (h,), (i, h), (i, h), (h, i)]
    return [(s, 0.1) for s in [(v, h), *block * config.num_layers, (h,), (v, h)]]


def measure(impl: str, layout: list[tuple[tuple[int, ...], float]], device: str, steps: int,
            warmup: int) -> dict[str, float]:
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    from lightning_aquila.adamw8bit import AdamW8bit

    optimizer_class = {"torchao": TorchaoAdamW8bit, "aquila": AdamW8bit}[impl]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    params = [torch.nn.Parameter(torch.randn(s, device=device, dtype=dtype) * 0.02)
              for s, _ in layout]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for p, (_, decay) in zip(params, layout, strict=True):
        groups.setdefault(decay, []).append(p)
    optimizer = optimizer_class([{"params": ps, "weight_decay": wd} for wd, ps in groups.items()],
                                lr=3e-4, betas=(0.9, 0.95))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):  # compiles a graph per shape and group
        optimizer.step()
    sync()
    host = wall = 0.0
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        host += time.perf_counter() - start
        sync()
        wall += time.perf_counter() - start
    return {"host_ms": 1e3 * host / steps, "wall_ms": 1e3 * wall / steps,
            "host_us_per_tensor": 1e6 * host / steps / len(params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="aquila2-7b")
    parser.add_argument("--shrink", type=int, default=1,
                        help="divide every dimension by this (keeps the tensor count)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="append the rows here (jsonl)")
    args = parser.parse_args()
    config = AquilaConfig.from_name(args.preset)
    if args.shrink > 1:
        k = args.shrink
        config = AquilaConfig.from_name(
            args.preset, hidden_size=config.hidden_size // k,
            intermediate_size=config.intermediate_size // k, vocab_size=config.vocab_size // k,
            bos_token_id=0, eos_token_id=1, num_heads=max(1, config.num_heads // k),
            num_kv_heads=max(1, config.num_kv_heads // k))
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else platform.processor() or platform.machine())
    print(f"{args.preset} (shrink {args.shrink}), {args.device}: {machine}, torch "
          f"{torch.__version__}")
    print("| layout | AdamW8bit | tensors | host ms/step | host µs/tensor | wall ms/step |")
    print("|---|---|---:|---:|---:|---:|")
    for layout_name, layout in (("aquila", aquila_layout(config)),
                                ("litgpt", litgpt_layout(config))):
        for impl in ("torchao", "aquila"):
            row = measure(impl, layout, args.device, args.steps, args.warmup)
            row.update(layout=layout_name, impl=impl, tensors=len(layout), preset=args.preset,
                       shrink=args.shrink, device=args.device, machine=machine,
                       torch=torch.__version__)
            print(f"| {layout_name} | {impl} | {len(layout)} | {row['host_ms']:.1f} | "
                  f"{row['host_us_per_tensor']:.0f} | {row['wall_ms']:.1f} |", flush=True)
            if args.out:
                with args.out.open("a") as out:
                    out.write(json.dumps(row) + "\n")
            if args.device == "cuda":  # the row's 40 GB (7B) back before the next
                gc.collect()
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
