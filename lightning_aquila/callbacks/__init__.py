"""HeuriMentor callbacks: the Training State Monitor (observes) and the Adaptive Training
Engine (decides); reusable in any Lightning project whose batches carry a ``domain``."""

from lightning_aquila.callbacks.engine import (
    AdaptiveTrainingEngine,
    EngineOrderError,
    RollbackError,
)
from lightning_aquila.callbacks.monitor import TrainingStateMonitor
from lightning_aquila.callbacks.policies import (
    AioliMixture,
    BanditMixture,
    EffectiveDataMixture,
    ExcessLossMixture,
    MixturePolicy,
    QualityCurriculum,
    StagedMixture,
    StaticMixture,
)
from lightning_aquila.callbacks.probes import MultipleChoiceProbe, Probe
from lightning_aquila.callbacks.state import Anomaly, TrainingState

__all__ = [
    "AdaptiveTrainingEngine",
    "AioliMixture",
    "Anomaly",
    "BanditMixture",
    "EffectiveDataMixture",
    "EngineOrderError",
    "ExcessLossMixture",
    "MixturePolicy",
    "MultipleChoiceProbe",
    "Probe",
    "QualityCurriculum",
    "RollbackError",
    "StagedMixture",
    "StaticMixture",
    "TrainingState",
    "TrainingStateMonitor",
]
