"""``lightning-aquila fit/validate/test/predict``: LightningCLI with our defaults.

- The model is fixed to AquilaLM; any LightningDataModule is the data.
- Output paths a config leaves unset follow ``trainer.default_root_dir`` (``run_folder``);
  ``fit`` refuses to start a fresh run in a folder that holds another run
  (``--reuse_run_dir true`` allows it), and ``--ckpt_path last`` without a checkpoint says
  so in one line and starts fresh; a fit whose processes resolved it to different
  checkpoints (nodes that see different folders) stops before training (``same_resume``).
- No prefix abbreviations (``--trainer.max_step`` is an error, not ``max_steps``), and parser
  errors are one line naming the field (``errors``; ``--verbose`` shows them in full). The
  options are kept for the dispatcher's check before this module is imported
  (``known_options``).
- The model's vocabulary size, bos and eos follow the tokenizer the store records unless the
  config sets them (``store_defaults``).
- A step progress bar and a one-line model summary (``console``); the Neptune run is stopped
  before the quiet block ends (``quiet``).
- Checkpoints are written atomically (``AtomicCheckpointIO``) unless the configuration names
  another ``CheckpointIO``; see ``docs/crash-safety.md``.
"""

from __future__ import annotations

import sys
from typing import Any

from jsonargparse import Namespace
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

import lightning_aquila.strategies  # noqa: F401  (registers our named strategies)
from lightning_aquila.checkpoint import AtomicCheckpointIO
from lightning_aquila.checkpoint_check import checked_resume_path
from lightning_aquila.cli import known_options
from lightning_aquila.cli.console import CompactModelSummary, StepProgressBar
from lightning_aquila.cli.errors import OneLineErrors
from lightning_aquila.cli.quiet import quiet_dependencies
from lightning_aquila.cli.run_folder import (
    FolderBefore,
    checkpoint_step,
    fill_run_paths,
    has_last_checkpoint,
    previous_run_files,
)
from lightning_aquila.cli.same_resume import SameResumeOnEveryRank
from lightning_aquila.cli.store_defaults import fill_model_vocabulary
from lightning_aquila.module import AquilaLM
from lightning_aquila.object_store import is_remote

REUSE_FLAG = "reuse_run_dir"


class AquilaArgumentParser(OneLineErrors, LightningArgumentParser):
    """No prefix matching, and a parse error as one line (the full report with
    ``--verbose``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def _is_checkpoint(class_path: str) -> bool:
    from jsonargparse._util import import_object

    try:
        cls = import_object(class_path)
    except Exception:  # resolved by the parser already; a failure here means "not ours"
        return False
    return isinstance(cls, type) and issubclass(cls, ModelCheckpoint)


class AquilaCLI(LightningCLI):
    """LightningCLI with the model fixed to AquilaLM and any LightningDataModule as data."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", AquilaArgumentParser)
        self._folder_before: FolderBefore | None = None
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            # A fit that fails before its first step leaves the folder as it found it.
            trainer = getattr(self, "trainer", None)
            if self._folder_before is not None and getattr(trainer, "global_step", 0) == 0:
                self._folder_before.restore()
            raise

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        known_options.remember(parser)  # the next typo is refused before this import
        super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            f"--{REUSE_FLAG}", type=bool, default=False,
            help="fit: start a fresh run even if trainer.default_root_dir holds another run's "
                 "metrics or checkpoints (they stay; the new run's files go beside them). "
                 "Without it such a fit stops: give a new folder, or --ckpt_path last to resume.")

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand)) if self.subcommand else self.config
        parser = self._parser(self.subcommand)
        try:
            check_config_groups(config)
        except ValueError as error:
            parser.error(str(error))
        checkpoint_dirs = fill_run_paths(config.trainer, _is_checkpoint)
        fill_model_vocabulary(config)
        if self.subcommand != "fit":
            return
        root = config.trainer.get("default_root_dir")
        if root is not None and not is_remote(root):
            self._folder_before = FolderBefore.of(root)
        if config.get("ckpt_path") == "last" and not has_last_checkpoint(checkpoint_dirs):
            print(f"lightning-aquila fit: no checkpoint to resume in "
                  f"{', '.join(checkpoint_dirs) or 'the checkpoint folder'}; starting a fresh "
                  "run", file=sys.stderr)
            config.ckpt_path = None
        elif config.get("ckpt_path") is None and root is not None and not config.get(REUSE_FLAG):
            found = previous_run_files(root, checkpoint_dirs)
            if found:
                parser.error(f"{root} already holds a run ({', '.join(found)}): give a new "
                             "--trainer.default_root_dir, resume it with --ckpt_path last, or "
                             f"pass --{REUSE_FLAG} true to start another run beside it")
        # verified first (a damaged file is replaced by the newest intact one, or the run
        # stops), so that the finished-run check reads only a checkpoint that is whole
        config.ckpt_path = checked_resume_path(config.get("ckpt_path"), checkpoint_dirs)
        self._refuse_finished_run(config)

    @staticmethod
    def _refuse_finished_run(config: Namespace) -> None:
        """Resuming a run that reached ``max_steps`` says so and stops (exit status 0)
        before anything is built: no trainer, no new tracker run, nothing written."""
        ckpt, max_steps = config.get("ckpt_path"), config.trainer.get("max_steps")
        if ckpt is None or not max_steps or max_steps < 0:
            return
        path = ckpt  # already a verified path: checked_resume_path resolved "last"
        step = checkpoint_step(path)
        if step is not None and step >= max_steps:
            print(f"lightning-aquila fit: the run of {path} already finished (step {step} of "
                  f"max_steps {max_steps}); nothing to do. Raise --trainer.max_steps to "
                  "train on.", file=sys.stderr)
            raise SystemExit(0)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The trainer, with ``AtomicCheckpointIO`` unless the configuration chose a
        ``CheckpointIO`` (a plugin, or a strategy instance given one), and our progress bar
        and model summary unless it names its own."""
        config = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        plugins = with_atomic_checkpoint_io(config.get("plugins"), config.get("strategy"))
        if plugins is not None:
            kwargs["plugins"] = plugins
        callbacks = config.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        added = console_callbacks(callbacks, config)
        if self.subcommand == "fit":  # each process resolved --ckpt_path on its own
            # the path before_instantiate_classes verified, as fit will be given it
            added.append(SameResumeOnEveryRank(self.config.get("fit").get("ckpt_path")))
        if added:
            kwargs["callbacks"] = [*callbacks, *added]
        return super().instantiate_trainer(**kwargs)


def console_callbacks(callbacks: list[Any], trainer_config: dict[str, Any]) -> list[Any]:
    """A ``StepProgressBar`` and a ``CompactModelSummary`` where the trainer would otherwise
    add Lightning's own (enabled, and no such callback configured)."""
    added: list[Any] = []
    if trainer_config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in callbacks):
        added.append(StepProgressBar())
    if trainer_config.get("enable_model_summary", True) is not False and not any(
            isinstance(c, ModelSummary) for c in callbacks):
        added.append(CompactModelSummary())
    return added


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


def stop_tracker_runs(cli: AquilaCLI) -> None:
    """Stop the Neptune run of a command that is done, inside ``quiet_dependencies`` (the
    client would stop it at exit, printing two lines of goodbye)."""
    from lightning_aquila.loggers import NeptuneLogger

    for logger in getattr(getattr(cli, "trainer", None), "loggers", None) or []:
        if isinstance(logger, NeptuneLogger):
            logger.stop()


def run_cli(args: list[str] | None = None) -> AquilaCLI:
    with quiet_dependencies():
        cli = AquilaCLI(
            AquilaLM,
            LightningDataModule,
            subclass_mode_data=True,
            seed_everything_default=1234,
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"prog": "lightning-aquila"},
            args=args,
        )
        stop_tracker_runs(cli)
        return cli
