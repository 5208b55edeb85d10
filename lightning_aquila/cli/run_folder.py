"""One run, one folder: every path a run writes follows ``trainer.default_root_dir``.

A config that names its output folders in five places (monitor, checkpoints, logger save dir,
logger data directory, root) makes ``--trainer.default_root_dir`` a trap: the override moves
one of them and the next run writes into the previous run's folders. The CLI fills the paths
a config leaves unset from the root (an explicit path stays as given), and refuses to start a
fresh run where another run's files already are.

Layout under the root: ``tsm/`` (monitor), ``checkpoints/`` (ModelCheckpoint, so that
``--ckpt_path last`` finds the previous session), ``config.yaml`` and, for Neptune,
``.neptune/`` (the offline run); a CSV/TensorBoard logger without a ``save_dir`` logs into
``<root>/<name>/version_N``.

A root on object storage (``s3://bucket/run``) holds the same layout: the checkpoints and
``config.yaml`` are written there directly, the monitor's files are uploaded there whole
(``tracking.run_log``). Only Neptune's offline queue stays local (Neptune's own default
folder), and a fit that fails before its first step leaves what it wrote in the bucket.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_aquila import object_store
from lightning_aquila.tracking.run_files import METRICS_FILE, RUN_FILES_DIR

#: Class names (the last part of a ``class_path``) whose unset paths are filled.
MONITOR = "TrainingStateMonitor"
NEPTUNE = "NeptuneLogger"


def _entries(value: Any) -> list[Any]:
    """A logger/callback config value as a list of ``class_path``/``init_args`` entries."""
    if value is None or isinstance(value, bool):
        return []
    items = value if isinstance(value, (list, tuple)) else [value]
    return [item for item in items if getattr(item, "class_path", None) is not None]


def _set_if_unset(init_args: Any, key: str, value: str) -> None:
    if init_args.get(key) is None:
        init_args[key] = value


def fill_run_paths(trainer_config: Any, is_checkpoint: Any) -> list[str]:
    """Fill the unset output paths of a jsonargparse ``trainer`` namespace (in place) from its
    ``default_root_dir``; returns the checkpoint folders the run will write.

    ``is_checkpoint(class_path)`` says whether a callback is a ``ModelCheckpoint``."""
    root = trainer_config.get("default_root_dir")
    if root is None:
        return []
    root = str(root)
    checkpoint_dirs: list[str] = []
    for entry in _entries(trainer_config.get("callbacks")):
        name = entry.class_path.rsplit(".", 1)[-1]
        if entry.get("init_args") is None:
            from jsonargparse import Namespace

            entry.init_args = Namespace()
        if name == MONITOR:
            _set_if_unset(entry.init_args, "run_dir", root)
        elif is_checkpoint(entry.class_path):
            _set_if_unset(entry.init_args, "dirpath", object_store.join(root, "checkpoints"))
            checkpoint_dirs.append(str(entry.init_args["dirpath"]))
    for entry in _entries(trainer_config.get("logger")):
        if entry.get("init_args") is None:
            continue
        if "save_dir" in entry.init_args or entry.class_path.rsplit(".", 1)[-1] == NEPTUNE:
            _set_if_unset(entry.init_args, "save_dir", root)  # TensorBoard, CSV, Neptune
        if entry.class_path.rsplit(".", 1)[-1] == NEPTUNE and not object_store.is_remote(root):
            _set_if_unset(entry.init_args, "data_directory", str(Path(root) / ".neptune"))
    return checkpoint_dirs


def previous_run_files(root: str | Path, checkpoint_dirs: Iterable[str | Path] = ()) -> list[str]:
    """What in ``root`` shows that a run already trained there: monitor metrics and
    checkpoints. (A prepared data store, an empty metrics file or a ``config.yaml`` left by a
    run that failed before its first step do not count.) Each path is asked where it is: a
    local checkpoint folder of a run whose root is on object storage counts, and so does the
    reverse."""
    found = []
    metrics = object_store.join(root, RUN_FILES_DIR, METRICS_FILE)
    if _written(metrics):
        found.append(metrics)
    folders = [*map(str, checkpoint_dirs), object_store.join(root, "checkpoints")]
    for folder in dict.fromkeys(folders):
        if _holds_files(folder):
            found.append(f"{folder}/")
    return found


def _written(path: str) -> bool:
    """A file that exists and is not empty (an object store is asked afresh: fsspec's cache
    would not show what another process wrote)."""
    if not object_store.is_remote(path):
        file = Path(path)
        return file.is_file() and file.stat().st_size > 0
    fs, inner = object_store.filesystem(path)
    fs.invalidate_cache(inner)
    return fs.exists(inner) and fs.size(inner) > 0


def _holds_files(folder: str) -> bool:
    if object_store.is_remote(folder):
        return bool(object_store.listing(folder))
    return Path(folder).is_dir() and any(Path(folder).iterdir())


def has_last_checkpoint(checkpoint_dirs: Iterable[str | Path]) -> bool:
    """Whether ``--ckpt_path last`` has something to resume from (Lightning's rule,
    ``checkpoint_check.newest_last``)."""
    from lightning_aquila.checkpoint_check import newest_last

    return newest_last(checkpoint_dirs) is not None


#: ``checkpoint_step``'s answers, by file version (``checkpoint_check.while_unchanged``)
_steps: dict[tuple, int | None] = {}


def checkpoint_step(path: str | Path | None) -> int | None:
    """The ``global_step`` a single-file checkpoint was saved at; ``None`` for a sharded
    (directory) checkpoint, an object on object storage (it would be downloaded whole for
    that number) or none.

    Read once per file while it is unchanged: a resume asks for the finished-run check
    before the trainer is built and again for ``SameResumeOnEveryRank``'s comparison of the
    ranks. This read cannot be Lightning's own load of the checkpoint, which happens inside
    ``trainer.fit`` after the model is built: the finished run is refused before anything
    is built (no trainer, no tracker run), and holding the whole checkpoint from then until
    the load would keep it in memory while the model is built. So it is memory-mapped:
    nothing but the pickled structure is read, not the tensors."""
    if path is None or object_store.is_remote(path) or not Path(path).is_file():
        return None
    from lightning_aquila.checkpoint_check import while_unchanged

    return while_unchanged(_steps, Path(path), _saved_step)


def _saved_step(path: Path) -> int | None:
    import torch

    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    step = state.get("global_step") if isinstance(state, dict) else None
    return int(step) if isinstance(step, int) else None


@dataclass(frozen=True)
class FolderBefore:
    """What a run folder held before a fit: enough to put it back as it was when the fit
    fails before its first step (a folder left holding only ``tsm/`` and ``config.yaml``
    looks like a run that never happened)."""

    #: the outermost folder of the root's path that did not exist (removed whole), or None
    created: Path | None
    root: Path
    #: the root's entries before, when it existed
    entries: frozenset[str]

    @classmethod
    def of(cls, root: str | Path) -> FolderBefore:
        root = Path(root).absolute()
        created = None
        for folder in (root, *root.parents):
            if folder.exists():
                break
            created = folder
        entries = frozenset(p.name for p in root.iterdir()) if root.is_dir() else frozenset()
        return cls(created, root, entries)

    def restore(self) -> None:
        """Remove what appeared since: the folders the fit created, else the root's new
        entries (nothing that was there before is touched)."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
            return
        if not self.root.is_dir():
            return
        for path in self.root.iterdir():
            if path.name in self.entries:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
