"""Training throughput and MFU of AquilaLM, next to transformers' LlamaForCausalLM (the peer).

Both models have the same architecture (the preset exported as a Llama config), run under the
same Lightning Trainer, precision, optimizer, batch and synthetic token stream, in one
process one after the other, so the table compares implementations and nothing else.

    python benchmarks/train_throughput.py --preset aquila2-1b --seq-len 2048 --batch-size 8 \
        --steps 30 --warmup 10 --impls aquila,aquila-compile,hf --out results.jsonl

MFU = tokens/s · (6·N + 12·L·H·T) / peak, with peak = 989 TFLOP/s (H100 dense bf16) unless
``--peak-tflops`` says otherwise. Needs only torch, lightning and transformers (no zarr or
jsonargparse), so it runs on the lent GPU machine as it is.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.utils.data import DataLoader, Dataset

from lightning_aquila import AquilaConfig, AquilaLM
from lightning_aquila.model.hf import hf_config_dict


class RandomWindows(Dataset):
    """Uniform random token windows: throughput does not depend on the text."""

    def __init__(self, vocab_size: int, seq_len: int, length: int) -> None:
        self.vocab_size, self.seq_len, self.length = vocab_size, seq_len, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(index)
        window = torch.randint(0, self.vocab_size, (self.seq_len + 1,), generator=g)
        return {"input_ids": window[:-1], "labels": window[1:], "domain": torch.tensor(0)}


class HFLlamaLM(LightningModule):
    """The peer: transformers' Llama with AquilaLM's loss and optimizer."""

    def __init__(self, config: AquilaConfig, learning_rate: float, compile: bool) -> None:
        super().__init__()
        self.config, self.learning_rate, self.compile = config, learning_rate, compile
        self.model = None

    def configure_model(self) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        if self.model is not None:
            return
        data = hf_config_dict(self.config, torch.float32)
        for key in ("architectures", "torch_dtype", "dtype", "transformers_version"):
            data.pop(key, None)
        hf_config = LlamaConfig(**data)
        hf_config._attn_implementation = "sdpa"
        self.model = LlamaForCausalLM(hf_config)
        if self.compile:
            for i, layer in enumerate(self.model.model.layers):
                self.model.model.layers[i] = torch.compile(layer)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        logits = self.model(input_ids=batch["input_ids"], use_cache=False).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate,
                                 betas=(0.9, 0.95), weight_decay=0.1)


class StepTimer(Callback):
    """Wall time of the steps after warmup, synchronised with the GPU at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.losses = warmup, None, None, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.losses.append(float(loss))  # one sync per step, for both implementations alike
        if batch_idx + 1 == self.warmup and torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        self.end = time.perf_counter()


def run(impl: str, args: argparse.Namespace) -> dict:
    config = AquilaConfig.from_name(args.preset, max_seq_len=max(args.seq_len, 2048))
    torch.manual_seed(0)
    if impl.startswith("aquila"):
        module = AquilaLM(preset=args.preset, config={"max_seq_len": config.max_seq_len},
                          learning_rate=3e-4, warmup_steps=10, compile=impl.endswith("compile"),
                          activation_checkpointing=args.activation_checkpointing)
    else:
        module = HFLlamaLM(config, 3e-4, compile=impl.endswith("compile"))
    timer = StepTimer(args.warmup)
    steps = args.warmup + args.steps
    trainer = Trainer(accelerator="auto", devices=1, precision=args.precision, max_steps=steps,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[timer], limit_val_batches=0,
                      gradient_clip_val=1.0)
    data = DataLoader(RandomWindows(config.vocab_size, args.seq_len, steps * args.batch_size),
                      batch_size=args.batch_size, num_workers=2, pin_memory=True)
    trainer.fit(module, data)
    cuda = torch.cuda.is_available()
    seconds = timer.end - timer.start
    tokens = args.steps * args.batch_size * args.seq_len
    tokens_per_sec = tokens / seconds
    mfu = tokens_per_sec * config.flops_per_token(args.seq_len) / (args.peak_tflops * 1e12)
    result = {
        "impl": impl, "preset": args.preset, "params_M": round(config.num_params / 1e6, 1),
        "precision": args.precision, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "steps": args.steps, "tokens_per_sec": round(tokens_per_sec),
        "mfu": round(mfu, 4),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "loss_first": round(timer.losses[0], 4), "loss_last": round(timer.losses[-1], 4),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }
    del trainer, module
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="aquila2-1b")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--impls", default="aquila,aquila-compile,hf")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--out", default=None, help="append one JSON line per result here")
    args = parser.parse_args()
    rows = []
    for impl in args.impls.split(","):
        row = run(impl, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    header = ("impl", "tokens_per_sec", "mfu", "peak_mem_GiB", "loss_first", "loss_last")
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(row[h]) for h in header) + " |")


if __name__ == "__main__":
    main()
