"""HeuriMentor callbacks: the Training State Monitor (observes) and the Adaptive Training
Engine (decides); reusable in any Lightning project whose batches carry a ``domain``."""

from lightning_aquila.callbacks.state import Anomaly, TrainingState

__all__ = ["Anomaly", "TrainingState"]
