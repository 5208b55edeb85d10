"""Messages of dependencies that a user of ``lightning-aquila fit`` cannot act on, kept off
the console for the length of one CLI run, each by its own text at its source.

- Lightning's ``💡 Tip`` advertising litlogger, its note that the trainer "already
  configured with model summary callbacks" (ours, ``console.CompactModelSummary``) and
  "TPU available: False" (the GPU line stays), and "`Trainer.fit` stopped: `max_steps=300`
  reached", which the step bar at 300/300 says already (and which Lightning prints before
  the bar ends, on the bar's line): ``rank_zero_info`` records of one logger, filtered
  there.
- The Neptune client's "Shutting down background jobs, please wait a moment..." and "Done!"
  when the CLI stops its run (``stop_tracker_runs``, inside the block; the client would
  otherwise stop it at exit, outside).
- The ``isinstance(treespec, LeafSpec)`` deprecation that torch raises inside Lightning's
  ``_pytree`` module: Lightning's to fix, not the user's.
- "Checkpoint directory ... exists and is not empty": the CLI already refuses a fresh run in
  a folder holding a run (``run_folder.previous_run_files``), so what remains is a resume
  or ``--reuse_run_dir true``, where it is expected.

Nothing is filtered process-wide: the warning filters live in a ``catch_warnings`` block and
the logging filter is removed on the way out, so a library user's own code sees everything.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

#: logger -> the starts of its messages that are dropped: the one Lightning's
#: ``rank_zero_info`` writes to, and the Neptune client's.
DROPPED_INFO = {
    "lightning.pytorch.utilities.rank_zero": (
        "💡 Tip: For seamless cloud logging",
        "Trainer already configured with model summary callbacks",
        "TPU available: False",
        "`Trainer.fit` stopped: `max_steps="),
    "neptune": ("Shutting down background jobs", "Done!"),
}
#: (message regex, module regex) of the warnings that are dropped.
DROPPED_WARNINGS = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities"),
    (r"Checkpoint directory .* exists and is not empty", r"lightning\.pytorch\.callbacks"),
)


class _DropInfo(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


@contextmanager
def quiet_dependencies() -> Iterator[None]:
    """Within the block, the messages above are not shown; all others are."""
    drops = [(logging.getLogger(name), _DropInfo(starts)) for name, starts in DROPPED_INFO.items()]
    for logger, drop in drops:
        logger.addFilter(drop)
    try:
        with warnings.catch_warnings():
            for message, module in DROPPED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, module=module)
            yield
    finally:
        for logger, drop in drops:
            logger.removeFilter(drop)


__all__ = ["quiet_dependencies"]
