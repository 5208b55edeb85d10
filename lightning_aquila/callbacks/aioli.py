"""``AioliMixture`` lives in ``callbacks/policies/aioli.py`` with the other policies; this
name stays importable for code, configs and checkpoints that use it."""

from lightning_aquila.callbacks.policies.aioli import AioliMixture

__all__ = ["AioliMixture"]
