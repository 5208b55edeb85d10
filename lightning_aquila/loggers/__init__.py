"""Experiment trackers beyond Lightning's own loggers. The TSM's metric names are the same
under every logger; see docs/tracking.md."""

from lightning_aquila.loggers.neptune import NeptuneLogger

__all__ = ["NeptuneLogger"]
