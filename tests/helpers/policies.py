"""Building a mixture policy from YAML the way LightningCLI does (jsonargparse's
``class_path``/``init_args``), so policy tests check the user's route, not the constructor."""

from __future__ import annotations

from typing import Any

import yaml

from lightning_aquila.callbacks.policies import MixturePolicy


def policy_from_config(config: dict[str, Any]) -> MixturePolicy:
    """``{"class_path": ..., "init_args": {...}}`` parsed and instantiated as a
    ``MixturePolicy``-typed argument."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--policy", type=MixturePolicy)
    return parser.instantiate_classes(parser.parse_object({"policy": config})).policy


def policy_from_yaml(text: str) -> MixturePolicy:
    """A YAML mapping with ``class_path`` and ``init_args`` instantiated."""
    return policy_from_config(yaml.safe_load(text))
