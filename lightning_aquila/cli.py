"""The ``lightning-aquila`` command.

``fit``/``validate``/``test`` are LightningCLI, so trainer, model, data, callbacks and logger
all come from YAML and ``--print_config`` works. The data tools (``prepare``, ``inspect``,
``train-tokenizer``), ``report``, ``consolidate`` and ``export-hf`` are plain argparse
commands dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import importlib
import sys

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

import lightning_aquila  # noqa: F401  (registers our named strategies)
from lightning_aquila.module import AquilaLM

#: name -> (module, function taking argv and returning an exit code, one-line help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "prepare": ("lightning_aquila.datamodules.prepare", "main",
                "tokenize raw text into a domain of a zarr shard store"),
    "inspect": ("lightning_aquila.datamodules.prepare", "inspect_main",
                "print the domains, documents and tokens of a shard store"),
    "train-tokenizer": ("lightning_aquila.tokenizer", "main",
                        "train a byte-level BPE tokenizer on jsonl/txt files"),
    "report": ("lightning_aquila.report", "main",
               "write the PNG + HTML run report of a run directory"),
    "consolidate": ("lightning_aquila.strategies.consolidate", "main",
                    "merge a sharded checkpoint into one file and/or a Hugging Face directory"),
    "export-hf": ("lightning_aquila.export", "main",
                  "export a Lightning checkpoint as a Hugging Face Llama directory"),
}


class AquilaCLI(LightningCLI):
    """LightningCLI with the model fixed to AquilaLM and any LightningDataModule as data."""

    def init_parser(self, **kwargs):
        parser = super().init_parser(**kwargs)
        tools = "\n".join(f"  {name:<16} {info[2]}" for name, info in TOOLS.items())
        parser.epilog = f"other commands (lightning-aquila COMMAND --help):\n{tools}"
        return parser


def run_cli(args: list[str] | None = None) -> AquilaCLI:
    return AquilaCLI(
        AquilaLM,
        LightningDataModule,
        subclass_mode_data=True,
        seed_everything_default=1234,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in TOOLS:
        module, function, _ = TOOLS[argv[0]]
        return int(getattr(importlib.import_module(module), function)(argv[1:]) or 0)
    run_cli(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
