"""The ``lightning-aquila`` command: a small dispatcher that imports only what a command needs.

``fit``/``validate``/``test``/``predict`` are LightningCLI (``cli/trainer.py``), so trainer,
model, data, callbacks and logger all come from YAML and ``--print_config`` works. The data
and run tools (``prepare``, ``inspect``, ``remove-domain``, ``train-tokenizer``, ``report``,
``consolidate``, ``export-hf``) take their flags from a function's signature (``cli/tools.py``,
jsonargparse). Nothing heavy (torch, Lightning, jsonargparse) is imported here:
``lightning-aquila --help`` must answer at once, and a data tool must not pay for Lightning.
The rest of the package: ``commands.py`` (the command list), ``errors.py`` (one-line errors),
``known_options.py`` (a flag or config typo refused before Lightning is imported),
``run_folder.py`` (one run, one folder), ``console.py`` (progress bar and model summary).

User errors (a bad config file, an unknown class, bad data) are printed as one line naming the
file or field; ``--verbose`` (anywhere on the command line) shows the full message and
traceback instead.
"""

from __future__ import annotations

import sys

from lightning_aquila.cli import errors
from lightning_aquila.cli.commands import TOOLS, TRAINER_COMMANDS

VERBOSE_FLAG = "--verbose"

__all__ = ["TOOLS", "TRAINER_COMMANDS", "main"]


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


def trainer_help(command: str) -> int:
    """``COMMAND --help`` of a trainer command, from the cache when it holds it
    (``help_cache``), else from LightningCLI (and then kept)."""
    import contextlib
    import io

    from lightning_aquila.cli import help_cache

    text = help_cache.read_help(command)
    if text is None:
        from lightning_aquila.cli.trainer import run_cli

        out, argv = io.StringIO(), sys.argv
        sys.argv = [argv[0], command, "--help"]  # LightningCLI reads them itself
        try:
            with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
                run_cli(None)
        finally:
            sys.argv = argv
        text = out.getvalue()
        help_cache.write_help(command, text)
    print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    verbose = VERBOSE_FLAG in words
    words = [w for w in words if w != VERBOSE_FLAG]
    errors.VERBOSE = verbose
    errors.WORDS = words
    if not words or words[0] in ("-h", "--help"):
        print(help_text())
        return 0 if words else 2
    command = words[0]
    if command not in TOOLS and command not in TRAINER_COMMANDS:
        print(f"lightning-aquila: unknown command {command!r} (commands: "
              f"{', '.join([*TRAINER_COMMANDS, *TOOLS])}; see lightning-aquila --help)",
              file=sys.stderr)
        return 2
    if command in TRAINER_COMMANDS and words[1:] in (["--help"], ["-h"]):
        return trainer_help(command)
    try:
        if command in TOOLS:
            from lightning_aquila.cli.tools import run_tool

            return run_tool(command, words[1:])
        configs = errors.check_config_files(words[1:])
        if not verbose:
            from lightning_aquila.cli.known_options import refusal

            # a typo refused before Lightning is imported (once its options are known)
            problem = refusal(command, words[1:], configs=configs)
            if problem is not None:
                print(errors.usage_error(f"lightning-aquila {command}", problem),
                      file=sys.stderr)
                return 2
        from lightning_aquila.cli.trainer import run_cli

        if argv is None:
            # From the console script LightningCLI reads sys.argv itself (passing it again as
            # ``args`` makes Lightning warn that both were given); it must not see --verbose.
            sys.argv = [sys.argv[0], *words]
            run_cli(None)
        else:
            run_cli(words)
        return 0
    except Exception as error:
        if verbose or not errors.is_user_error(error):
            raise
        print(f"lightning-aquila {command}: {errors.one_line(error)}\n"
              f"(run again with {VERBOSE_FLAG} for the traceback)", file=sys.stderr)
        return 1

