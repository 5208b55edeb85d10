"""What a run prints on the console: one progress bar in optimizer steps, one line per
evaluation, and a model summary of one line. The CLI adds both unless the config names its
own.

Lightning's bars count batches per epoch, which is wrong for the step-bounded runs of
pretraining: with ``max_steps`` and ``max_epochs=-1`` they show ``Epoch 0/-2``, and after a
resume at step 121 of 300 the batch counter passes the remaining-steps total (``200/179``).
Its validation bars (one per loader, and the sanity check's) scroll the screen at every
evaluation, so the evaluation is one line instead, and ``v_num`` (the logger's version, a
number nobody reads on the bar) is left off.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelSummary, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities.model_summary.model_summary import get_human_readable_count

log = logging.getLogger("lightning.pytorch.callbacks.model_summary")


def steps_bounded(trainer: Trainer) -> bool:
    """A run bounded by ``max_steps`` (and not by epochs)."""
    return trainer.max_steps is not None and trainer.max_steps > 0 and trainer.max_epochs in (
        None, -1)


class StepProgressBar(TQDMProgressBar):
    """TQDM bar that shows ``Step n/max_steps`` (optimizer steps, so gradient accumulation and
    a resume count right) for step-bounded runs; epoch-bounded runs get Lightning's bar."""

    def init_train_tqdm(self) -> Tqdm:
        """For a step-bounded run, the bar starts as ``Step N/max_steps`` (Lightning's shows
        ``Training 0/?`` until the epoch starts, and for good after resuming a finished run)."""
        trainer = self.trainer
        if not steps_bounded(trainer):
            return super().init_train_tqdm()
        return Tqdm(desc="Step", total=trainer.max_steps, initial=trainer.global_step,
                    position=2 * self.process_position, disable=self.is_disabled, leave=True,
                    dynamic_ncols=True, file=sys.stdout, smoothing=0,
                    bar_format=self.BAR_FORMAT)

    def init_sanity_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.sanity_checking or self.is_disabled:
            return
        line = evaluation_line(trainer)
        if line:
            Tqdm.write(line, file=sys.stdout)

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        if not steps_bounded(trainer):
            super().on_train_epoch_start(trainer, *args)
            return
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description("Step", refresh=False)
        bar.reset(total=trainer.max_steps)
        bar.initial = bar.n = trainer.global_step  # tqdm's rate counts from `initial`
        bar.refresh()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not steps_bounded(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        bar, step = self.train_progress_bar, trainer.global_step
        if bar is not None and not bar.disable and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar


def evaluation_line(trainer: Trainer) -> str:
    """``step 50: val/loss 6.2143 (code 5.91, prose 6.52)``: an evaluation's numbers, from
    the metrics the module logged (``val/loss`` and ``val/domain_loss/<domain>``)."""
    metrics = trainer.callback_metrics
    if "val/loss" not in metrics:
        return ""
    prefix = "val/domain_loss/"
    domains = ", ".join(f"{key[len(prefix):]} {float(value):.2f}"
                        for key, value in sorted(metrics.items()) if key.startswith(prefix))
    return (f"step {trainer.global_step}: val/loss {float(metrics['val/loss']):.4f}"
            + (f" ({domains})" if domains else ""))


class CompactModelSummary(ModelSummary):
    """The model summary as one line: ``model: 2.8 M parameters (all trainable), 11.3 MB``,
    with the FLOPs only when something measured them (Lightning does only for modules with an
    ``example_input_array``; it would print ``0``). Lightning's 12-line table of the top-level
    layers says nothing more about a model that is one module; name
    ``lightning.pytorch.callbacks.ModelSummary`` among the callbacks to get it."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int,
                  trainable_parameters: int, model_size: float,
                  total_training_modes: dict[str, int], total_flops: int,
                  **summarize_kwargs: Any) -> None:
        log.info(summary_line(total_parameters, trainable_parameters, model_size, total_flops))


def summary_line(total_parameters: int, trainable_parameters: int, model_size: float,
                 total_flops: int = 0) -> str:
    count = get_human_readable_count
    trainable = ("all trainable" if trainable_parameters == total_parameters
                 else f"{count(trainable_parameters)} trainable")
    flops = f", {count(total_flops)} FLOPs" if total_flops else ""
    return (f"model: {count(total_parameters)} parameters ({trainable}), "
            f"{model_size:.1f} MB{flops}")
