"""The ``lightning-aquila`` command.

``fit``/``validate``/``test`` are LightningCLI, so trainer, model, data, callbacks and logger
all come from YAML and ``--print_config`` works. The data tools (``prepare``, ``inspect``,
``train-tokenizer``), ``report``, ``consolidate`` and ``export-hf`` are plain argparse
commands dispatched before LightningCLI sees the arguments.

Checkpoints are written atomically (``AtomicCheckpointIO``) unless the configuration names
another ``CheckpointIO``; see ``docs/crash-safety.md``.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

import lightning_aquila  # noqa: F401  (registers our named strategies)
from lightning_aquila.checkpoint import AtomicCheckpointIO
from lightning_aquila.module import AquilaLM

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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand)) if self.subcommand else self.config
        try:
            check_config_groups(config)
        except ValueError as error:
            self._parser(self.subcommand).error(str(error))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with ``AtomicCheckpointIO`` unless the configuration chose a
        ``CheckpointIO`` (a plugin, or a strategy instance given one)."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = with_atomic_checkpoint_io(config.get("plugins"), config.get("strategy"))
        if plugins is not None:
            kwargs["plugins"] = plugins
        return super().instantiate_trainer(**kwargs)


def check_config_groups(config: Namespace) -> None:
    """``trainer:``, ``model:`` and ``data:`` hold mappings. jsonargparse lets a list or a
    number through there (a stray ``- `` in YAML), which then fails deep inside Lightning
    with a ``TypeError`` that names no field."""
    for group in ("trainer", "model", "data"):
        value = config.get(group)
        if value is not None and not isinstance(value, Namespace):
            raise ValueError(f"config field {group!r} must be a mapping of its settings, got "
                             f"a {type(value).__name__}: {value!r:.200}")


def with_atomic_checkpoint_io(plugins: Any, strategy: Any) -> list[Any] | None:
    """``plugins`` plus an ``AtomicCheckpointIO`` when neither they nor ``strategy`` name a
    ``CheckpointIO``; a wrapping one without a base (``AsyncCheckpointIO()``) gets it as its
    base. ``None`` when there is nothing to change."""
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
    given = [p for p in plugins if isinstance(p, CheckpointIO)]
    if getattr(strategy, "_checkpoint_io", None) is not None:
        given.append(strategy._checkpoint_io)
    if not given:
        return [*plugins, AtomicCheckpointIO()]
    for io in given:
        if isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is None:
            io.checkpoint_io = AtomicCheckpointIO()
    return None


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
    words = sys.argv[1:] if argv is None else list(argv)
    if words and words[0] in TOOLS:
        module, function, _ = TOOLS[words[0]]
        return int(getattr(importlib.import_module(module), function)(words[1:]) or 0)
    # From the console script, let LightningCLI read sys.argv itself (passing it again as
    # ``args`` makes Lightning warn that both were given).
    run_cli(None if argv is None else words)
    return 0


if __name__ == "__main__":
    sys.exit(main())
