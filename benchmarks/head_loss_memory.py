"""Peak memory of the output head and its loss (forward and backward), standard or chunked,
eager or under ``torch.compile``, measured on the CPU: what inductor keeps alive does not
need a GPU to be seen (issue 29: the chunked loss cost ~6 GiB more than the standard one in
a compiled fit on an H100).

The peak is that of the bytes torch allocates while one step runs, from the profiler's
memory timeline (what ``export_memory_timeline`` reads), above what was allocated before it.
The shape is scaled down (default 4,096 tokens, hidden 256, vocabulary 32,000); the head's
buffers scale with tokens × vocabulary, so ratios carry over to the real shape.

    PYTHONPATH=$PWD python benchmarks/head_loss_memory.py --chunk-size 1024
"""

from __future__ import annotations

import argparse

import torch

from lightning_aquila.model.head_loss import chunked_linear_cross_entropy, token_cross_entropy

MiB = 2**20


def peak_bytes(step) -> int:
    """Peak bytes torch allocated on the CPU while ``step()`` ran, above the start."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


def measure(impl: str, compiled: bool, tokens: int, hidden: int, vocab: int,
            chunk: int) -> int:
    torch.manual_seed(0)
    x0 = torch.randn(tokens, hidden) * 0.1
    weight = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if impl == "chunked":
                return chunked_linear_cross_entropy(x, weight, labels, chunk)[0]
            logits = x @ weight.t()
        return token_cross_entropy(logits[None], labels[None]).mean()

    fn = torch.compile(loss_of) if compiled else loss_of

    def step() -> None:
        fn(x0.clone().requires_grad_()).backward()
        weight.grad = None

    step()  # compiles, warms the allocator
    return peak_bytes(step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()
    unit = args.chunk_size * args.vocab * 4
    print(f"tokens {args.tokens}, hidden {args.hidden}, vocab {args.vocab}, chunk "
          f"{args.chunk_size}: one chunk's fp32 logits {unit / MiB:.0f} MiB, all tokens' bf16 "
          f"logits {args.tokens * args.vocab * 2 / MiB:.0f} MiB\n")
    print("| loss | mode | peak MiB | in chunks' fp32 logits |\n|---|---|---:|---:|")
    for impl in ("standard", "chunked"):
        for compiled in (False, True):
            peak = measure(impl, compiled, args.tokens, args.hidden, args.vocab,
                           args.chunk_size)
            print(f"| {impl} | {'compiled' if compiled else 'eager'} | {peak / MiB:.1f} | "
                  f"{peak / unit:.2f} |", flush=True)


if __name__ == "__main__":
    main()
