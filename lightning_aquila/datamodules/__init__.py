"""The Data Management Unit: domain shards, ``prepare``/``inspect``, the mixture sampler."""

from lightning_aquila.datamodules.datamodule import DomainDataModule
from lightning_aquila.datamodules.mixture import BatchSkip, DomainMixture, MixtureChange
from lightning_aquila.datamodules.shard_format import DataError
from lightning_aquila.datamodules.store import ShardStore

__all__ = ["BatchSkip", "DataError", "DomainDataModule", "DomainMixture", "MixtureChange",
           "ShardStore"]
