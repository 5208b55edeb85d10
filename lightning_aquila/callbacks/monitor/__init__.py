"""The Training State Monitor (TSM): watches a run, logs it, and publishes a ``TrainingState``.

``TrainingStateMonitor`` (``callback.py``) wires the parts to Lightning's hooks; each part is
one file:

* ``domain_loss.py``: training loss per domain, and its reduction across ranks;
* ``held_out.py``: held-out loss and perplexity per domain;
* ``step_check.py``: each step's loss and gradient norm, loss spikes and non-finite values;
* ``weight_stats.py``: weight norms, update ratios and change since the stage began;
* ``throughput.py``: tokens/s per device and MFU;
* ``norms.py``: sums of squares over sharded tensors, read without stalling the device.

What it writes (``tsm/metrics.jsonl``, ``tsm/events.jsonl``) goes through the run log of
``lightning_aquila.tracking``, which also reads it back.
"""

from lightning_aquila.callbacks.monitor.callback import TrainingStateMonitor
from lightning_aquila.callbacks.monitor.held_out import HeldOutLoss, next_token_loss
from lightning_aquila.callbacks.monitor.norms import squares_on_device, sum_of_squares
from lightning_aquila.callbacks.monitor.step_check import SpikeDetector
from lightning_aquila.callbacks.monitor.throughput import throughput
from lightning_aquila.callbacks.monitor.weight_stats import layer_of
from lightning_aquila.tracking.run_files import RUN_FILES_FORMAT

__all__ = ["RUN_FILES_FORMAT", "HeldOutLoss", "SpikeDetector", "TrainingStateMonitor",
           "layer_of", "next_token_loss", "squares_on_device", "sum_of_squares", "throughput"]
