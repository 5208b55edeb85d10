"""NeptuneLogger: a small Lightning logger on the ``neptune`` 1.x client.

Lightning 2.6 dropped its own Neptune logger, and Neptune's hosted service is gone, but the
1.x client still writes a run to a local queue in offline mode and talks to any server that
speaks its API online. This logger picks the mode from the environment: online when
``NEPTUNE_API_TOKEN`` and a project (argument or ``NEPTUNE_PROJECT``) are set, offline
otherwise, so a quickstart needs no network. ``neptune sync`` uploads an offline run later.

The API token is read by the client from the environment only. It is not an argument, so it
cannot end up in a saved config, and any hyperparameter value that contains it is redacted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from argparse import Namespace
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

TOKEN_ENV = "NEPTUNE_API_TOKEN"
PROJECT_ENV = "NEPTUNE_PROJECT"
DATA_DIRECTORY_ENV = "NEPTUNE_DATA_DIRECTORY"
REDACTED = "<redacted>"
#: Hyperparameter names whose values are never sent, whatever they hold.
_SECRET_KEYS = ("api_token", "api_key", "token", "password", "secret")


def _neptune() -> Any:
    try:
        import neptune
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("NeptuneLogger needs the neptune client 1.x: "
                          "pip install 'lightning-aquila[neptune]'") from None
    return neptune


def resolve_mode(mode: str | None, project: str | None) -> str:
    """``mode`` if given; else online ("async") when a token and a project are set, else
    "offline"."""
    if mode is not None:
        return mode
    return "async" if os.environ.get(TOKEN_ENV) and project else "offline"


@contextlib.contextmanager
def _data_directory(path: str | None) -> Iterator[None]:
    """The client reads NEPTUNE_DATA_DIRECTORY when a run starts; set it only for that."""
    if path is None:
        yield
        return
    previous = os.environ.get(DATA_DIRECTORY_ENV)
    os.environ[DATA_DIRECTORY_ENV] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(DATA_DIRECTORY_ENV, None)
        else:
            os.environ[DATA_DIRECTORY_ENV] = previous


def _redact(key: str, value: Any) -> Any:
    token = os.environ.get(TOKEN_ENV)
    if key.rsplit("/", 1)[-1].lower() in _SECRET_KEYS:
        return REDACTED
    if token and isinstance(value, str) and token in value:
        return value.replace(token, REDACTED)
    return value


def _field_value(value: Any) -> Any:
    """What a Neptune field can hold: numbers, bools and strings; the rest as text."""
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _field_value(value.item())
    return str(value)


class NeptuneLogger(Logger):
    """Lightning logger writing to a Neptune run (``neptune`` client 1.x).

    Metrics keep their names (``tsm/train_loss/web`` is the field ``tsm/train_loss/web``),
    hyperparameters go under ``parameters/``, checkpoint paths under ``checkpoints/``, and
    ``log_file`` uploads a file (the run report). Only global rank 0 talks to Neptune.

    Args:
        project: ``workspace/project``; default ``NEPTUNE_PROJECT``.
        name: the run's name; also this logger's ``name`` (checkpoint folder).
        tags: run tags.
        description: run description.
        mode: "async", "sync", "offline", "debug"; default: see ``resolve_mode``.
        with_id: the id of an existing run to continue (online).
        custom_run_id: a run id of your own (all processes giving it log to one run).
        data_directory: where the client keeps its queue and offline runs (default: its own,
            ``.neptune`` in the working directory or ``NEPTUNE_DATA_DIRECTORY``).
        save_dir: this logger's local folder, which Lightning uses as ``trainer.log_dir``
            (LightningCLI saves ``config.yaml`` there) and, with ``name``/``version``, for
            checkpoints: ``<save_dir>/<name>/<version>/checkpoints``. Default: the data
            directory. Give the run's folder (e.g. ``runs/quickstart``) to keep a run together.
        prefix: put before every metric name (default none: names stay as logged).
        run_kwargs: more ``neptune.init_run`` arguments (``capture_hardware_metrics``, ...).
            By default the client captures no stdout/stderr, hardware metrics or source files.
    """

    def __init__(
        self,
        project: str | None = None,
        name: str = "aquila",
        tags: list[str] | None = None,
        description: str | None = None,
        mode: str | None = None,
        with_id: str | None = None,
        custom_run_id: str | None = None,
        data_directory: str | None = None,
        save_dir: str | None = None,
        prefix: str = "",
        run_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        _neptune()  # fail at construction, not at the first metric, when the client is missing
        self._project = project or os.environ.get(PROJECT_ENV)
        self._name = name
        self._tags = list(tags or [])
        self._description = description
        self._mode = resolve_mode(mode, self._project)
        self._with_id = with_id
        self._custom_run_id = custom_run_id
        self._data_directory = data_directory
        self._save_dir = save_dir or data_directory or os.environ.get(DATA_DIRECTORY_ENV,
                                                                      ".neptune")
        self._prefix = prefix
        self._run_kwargs = {"capture_stdout": False, "capture_stderr": False,
                            "capture_hardware_metrics": False, "source_files": [],
                            "git_ref": False, **(run_kwargs or {})}
        self._version = with_id or custom_run_id or time.strftime("run-%Y%m%d-%H%M%S")
        self._run: Any = None
        self._checkpoints_seen: set[str] = set()
        self._leaves: set[str] = set()  # metric paths logged so far
        self._namespaces: set[str] = set()  # their parent paths
        self._skipped: set[str] = set()

    # -- Lightning's Logger interface ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def mode(self) -> str:
        return self._mode

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The ``neptune.Run`` (created at first use, on global rank 0 only)."""
        if self._run is None:
            neptune = _neptune()
            with _data_directory(self._data_directory):
                self._run = neptune.init_run(
                    project=self._project, name=self._name, tags=self._tags or None,
                    description=self._description, mode=self._mode, with_id=self._with_id,
                    custom_run_id=self._custom_run_id, **self._run_kwargs)
        return self._run

    @property
    def run(self) -> Any:
        return self.experiment

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        flat = _flatten_dict(_convert_params(params))
        for key, value in flat.items():
            if value is None:
                continue
            self.experiment[f"parameters/{key}"] = _field_value(_redact(key, value))

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        run = self.experiment
        for key, value in metrics.items():
            value = float(value.item() if hasattr(value, "item") else value)
            if not math.isfinite(value):
                continue  # a Neptune float series cannot hold NaN/inf
            path = f"{self._prefix}{key}"
            if self._claim(path):
                run[path].append(value, step=step)

    def _claim(self, path: str) -> bool:
        """Neptune cannot hold a value at ``a/b`` and values under ``a/b/...`` at once (other
        loggers can). The first name logged wins; a clashing one is skipped with a warning
        rather than failing the run."""
        if path in self._leaves:
            return True
        parents = ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
        clash = next((p for p in parents if p in self._leaves), None)
        if clash is None and path in self._namespaces:
            clash = next(leaf for leaf in self._leaves if leaf.startswith(path + "/"))
        if clash is not None:
            if path not in self._skipped:
                self._skipped.add(path)
                rank_zero_warn(f"NeptuneLogger: metric {path!r} is not logged: Neptune cannot "
                               f"hold it next to {clash!r} (a value and a namespace at one "
                               "path); rename one of them.")
            return False
        self._leaves.add(path)
        self._namespaces.update(parents)
        return True

    @rank_zero_only
    def log_file(self, path: str | os.PathLike[str], name: str | None = None) -> str:
        """Upload a file (a copy: an offline run stays complete if the original moves) as
        field ``name`` (default ``files/<file name with . as _>``, e.g. ``files/report_html``);
        returns the field name."""
        from neptune.types import File

        path = Path(path)
        field = name or f"files/{path.name.replace('.', '_')}"
        self.experiment[field].upload(File.from_content(path.read_bytes(),
                                                        extension=path.suffix.lstrip(".")))
        return field

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        run = self.experiment
        for key in ("best_model_path", "last_model_path"):
            path = getattr(checkpoint_callback, key, "")
            if path:
                run[f"checkpoints/{key}"] = str(path)
        score = getattr(checkpoint_callback, "best_model_score", None)
        if score is not None:
            run["checkpoints/best_model_score"] = _field_value(score)
        saved = dict(getattr(checkpoint_callback, "best_k_models", {}) or {})
        newest = [getattr(checkpoint_callback, key, "") for key in ("best_model_path",
                                                                     "last_model_path")]
        for path in [*saved, *newest]:
            if path and str(path) not in self._checkpoints_seen:
                self._checkpoints_seen.add(str(path))
                run["checkpoints/saved"].append(str(path))
        if saved:
            run["checkpoints/best_k_models"] = json.dumps(
                {str(k): _field_value(v) for k, v in saved.items()})

    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Record the status and flush to disk/server. The run stays open (a later
        ``trainer.test`` logs into it); the client stops it when the process exits, or call
        ``logger.run.stop()``.

        An offline run that failed before logging a single metric (bad data, a config
        mistake found at setup) is stopped and its folder removed: it holds nothing, and a
        newcomer's retries would otherwise leave one empty tracker run each."""
        if self._run is None:
            return
        if status == "failed" and self._mode == "offline" and not self._leaves:
            self._discard_offline_run()
            return
        self._run["lightning/status"] = status
        self._run.wait()

    @rank_zero_only
    def stop(self) -> None:
        """Stop the run now, as the client does when the process exits (``lightning-aquila``
        does once its command is done, where the client's goodbye can be kept off the
        console). A later log starts another run."""
        run, self._run = self._run, None
        if run is not None:
            run.stop()

    def _discard_offline_run(self) -> None:
        run, self._run = self._run, None
        folder = getattr(getattr(run, "_op_processor", None), "data_path", None)
        run.stop()
        if folder is not None and Path(folder).is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(OSError):  # the offline/ folder, when now empty
                Path(folder).parent.rmdir()
                Path(folder).parent.parent.rmdir()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_run"] = None  # a live client does not pickle (spawned processes)
        return state
