"""The ``lightning-aquila`` command: a small dispatcher that imports only what a command needs.

``fit``/``validate``/``test``/``predict`` are LightningCLI (``lightning_aquila.trainer_cli``),
so trainer, model, data, callbacks and logger all come from YAML and ``--print_config`` works.
The data tools (``prepare``, ``inspect``, ``train-tokenizer``), ``report``, ``consolidate`` and
``export-hf`` are plain argparse commands. Nothing heavy (torch, Lightning) is imported here:
``lightning-aquila --help`` must answer at once, and a data tool must not pay for Lightning.

User errors (a bad config file, an unknown class, bad data) are printed as one line naming the
file or field; ``--verbose`` (anywhere on the command line) shows the full message and
traceback instead.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from lightning_aquila import user_errors

#: The LightningCLI commands -> one-line help.
TRAINER_COMMANDS: dict[str, str] = {
    "fit": "train a model from a YAML config (resume with --ckpt_path last)",
    "validate": "run the validation loop of a config on a checkpoint",
    "test": "run the test loop of a config on a checkpoint",
    "predict": "run the predict loop of a config on a checkpoint",
}

#: name -> (module, function taking argv and returning an exit code, one-line help)
TOOLS: dict[str, tuple[str, str, str]] = {
    "prepare": ("lightning_aquila.datamodules.prepare", "main",
                "tokenize raw text into a domain of a zarr shard store"),
    "inspect": ("lightning_aquila.datamodules.prepare", "inspect_main",
                "print the domains, documents and tokens of a shard store"),
    "remove-domain": ("lightning_aquila.datamodules.edit", "main",
                      "take a domain out of a shard store (atomically)"),
    "train-tokenizer": ("lightning_aquila.tokenizer", "main",
                        "train a byte-level BPE tokenizer on jsonl/txt files"),
    "report": ("lightning_aquila.report", "main",
               "write the PNG + HTML run report of a run directory (or --compare runs)"),
    "consolidate": ("lightning_aquila.strategies.consolidate", "main",
                    "merge a sharded checkpoint into one file and/or a Hugging Face directory"),
    "export-hf": ("lightning_aquila.export", "main",
                  "export a Lightning checkpoint as a Hugging Face Llama directory"),
}

VERBOSE_FLAG = "--verbose"


def help_text() -> str:
    """The top-level help: every command with its one line."""
    width = max(len(name) for name in [*TRAINER_COMMANDS, *TOOLS]) + 2
    lines = ["usage: lightning-aquila COMMAND [ARGS ...] [--verbose]", "",
             "Data-centric LLM pretraining on PyTorch Lightning (Aquila2's HeuriMentor).", "",
             "training (LightningCLI: configs, --print_config, --ckpt_path):"]
    lines += [f"  {name:<{width}}{text}" for name, text in TRAINER_COMMANDS.items()]
    lines += ["", "data and run tools:"]
    lines += [f"  {name:<{width}}{info[2]}" for name, info in TOOLS.items()]
    lines += ["", "options:",
              f"  {'-h, --help':<{width}}show this message; `lightning-aquila COMMAND --help` "
              "shows a command's flags",
              f"  {VERBOSE_FLAG:<{width}}on an error, print the full message and traceback",
              "", "Quick start: docs/quickstart.md. Runs write everything under "
              "--trainer.default_root_dir."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    verbose = VERBOSE_FLAG in words
    words = [w for w in words if w != VERBOSE_FLAG]
    user_errors.VERBOSE = verbose
    if not words or words[0] in ("-h", "--help"):
        print(help_text())
        return 0 if words else 2
    command = words[0]
    if command not in TOOLS and command not in TRAINER_COMMANDS:
        print(f"lightning-aquila: unknown command {command!r} (commands: "
              f"{', '.join([*TRAINER_COMMANDS, *TOOLS])}; see lightning-aquila --help)",
              file=sys.stderr)
        return 2
    try:
        if command in TOOLS:
            module, function, _ = TOOLS[command]
            return int(getattr(importlib.import_module(module), function)(words[1:]) or 0)
        user_errors.check_config_files(words[1:])
        from lightning_aquila.trainer_cli import run_cli

        if argv is None:
            # From the console script LightningCLI reads sys.argv itself (passing it again as
            # ``args`` makes Lightning warn that both were given); it must not see --verbose.
            sys.argv = [sys.argv[0], *words]
            run_cli(None)
        else:
            run_cli(words)
        return 0
    except Exception as error:
        if verbose or not user_errors.is_user_error(error):
            raise
        print(f"lightning-aquila {command}: {user_errors.one_line(error)}\n"
              f"(run again with {VERBOSE_FLAG} for the traceback)", file=sys.stderr)
        return 1


def __getattr__(name: str) -> Any:
    # The LightningCLI pieces moved to trainer_cli (importing them costs seconds).
    if name in ("AquilaCLI", "run_cli", "check_config_groups", "with_atomic_checkpoint_io"):
        return getattr(importlib.import_module("lightning_aquila.trainer_cli"), name)
    raise AttributeError(f"module 'lightning_aquila.cli' has no attribute {name!r}")


if __name__ == "__main__":
    sys.exit(main())
