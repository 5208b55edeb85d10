"""``AquilaParallelStrategy``: Lightning's ``ModelParallelStrategy`` carrying our parallel plan.

Lightning's strategy sets up the 2-D device mesh (data parallel × tensor parallel), leaves the
parallelisation to ``configure_model`` and saves sharded checkpoints. Ours adds four things:

* the ``ParallelPlan`` that ``prepare_model`` reads (FSDP2 mixed precision, CPU offload,
  resharding, sequence parallel, vocabulary-parallel loss);
* ``"auto"`` sizes resolved against each other: ``tensor_parallel_size=2`` on 8 devices gives
  ``data_parallel_size=4`` (Lightning's own ``"auto"`` means nodes × devices per node);
* the steps and backward passes run inside ``loss_parallel()`` when the logits are sharded on
  the vocabulary, as ``loss_parallel`` requires of both;
* sharded checkpoint directories are written under a temporary name, with a size/checksum
  manifest, and renamed into place, and single-file ones through ``AtomicCheckpointIO`` unless
  another ``CheckpointIO`` is given; a checkpoint that does not match its record is refused.
  Sharded checkpoints are refused on object storage (no directory rename there), before
  training starts.
"""

from __future__ import annotations

import shutil
from collections.abc import Generator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_aquila.atomic import PARTIAL_SUFFIX, replace_directory
from lightning_aquila.checkpoint import AtomicCheckpointIO, is_local_path
from lightning_aquila.checkpoint_check import ensure_loadable
from lightning_aquila.checkpoint_record import checksum_files, shard_names, write_manifest
from lightning_aquila.strategies.parallelize import ParallelPlan

Size = Literal["auto"] | int


def resolve_mesh_sizes(data_parallel_size: Size, tensor_parallel_size: Size, num_nodes: int,
                       devices_per_node: int) -> tuple[int, int]:
    """(data-parallel size, tensor-parallel size) on ``num_nodes × devices_per_node`` ranks:
    an ``"auto"`` size is what the other leaves; both ``"auto"`` put TP within a node and
    data parallelism across nodes."""
    world = num_nodes * devices_per_node
    dp, tp = data_parallel_size, tensor_parallel_size
    if dp == "auto" and tp == "auto":
        dp, tp = num_nodes, devices_per_node
    elif dp == "auto" or tp == "auto":
        name, given = ("tensor_parallel_size", tp) if dp == "auto" else ("data_parallel_size", dp)
        if world % given:
            raise ValueError(f"{name}={given} does not divide the world size {world} "
                             f"({num_nodes} node(s) × {devices_per_node} device(s))")
        dp, tp = (world // given, given) if dp == "auto" else (given, world // given)
    if dp * tp != world:
        raise ValueError(f"data_parallel_size={dp} × tensor_parallel_size={tp} must equal the "
                         f"world size {world} ({num_nodes} node(s) × {devices_per_node} "
                         "device(s))")
    return int(dp), int(tp)


class AquilaParallelStrategy(ModelParallelStrategy):
    """FSDP2 and/or Megatron-style tensor parallelism for ``AquilaLM``, from YAML.

    Args:
        data_parallel_size: ranks that hold different samples (FSDP2 shards across them).
            ``"auto"``: the world size divided by ``tensor_parallel_size``.
        tensor_parallel_size: ranks that split each layer (keep it within a node: every block
            all-gathers and reduce-scatters activations over it). ``"auto"``: the world size
            divided by ``data_parallel_size``; both ``"auto"``: the devices of one node.
        fsdp, param_dtype, reduce_dtype, cpu_offload, reshard_after_forward,
        sequence_parallel, loss_parallel: the ``ParallelPlan`` (see
            ``lightning_aquila.strategies.parallelize``).
        save_distributed_checkpoint: one shard per rank in a checkpoint directory (``True``)
            or a single full file assembled on rank 0.
        process_group_backend, timeout: as in ``ModelParallelStrategy``.
    """

    strategy_name = "aquila_parallel"

    def __init__(
        self,
        data_parallel_size: Size = "auto",
        tensor_parallel_size: Size = "auto",
        fsdp: bool = True,
        param_dtype: str | None = "auto",
        reduce_dtype: str | None = "fp32",
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        sequence_parallel: bool = True,
        loss_parallel: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        for name, value in (("data_parallel_size", data_parallel_size),
                            ("tensor_parallel_size", tensor_parallel_size)):
            if value != "auto" and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be 'auto' or a positive integer, got {value!r}")
        super().__init__(
            data_parallel_size=data_parallel_size,
            tensor_parallel_size=tensor_parallel_size,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.parallel_plan = ParallelPlan(
            fsdp=fsdp, param_dtype=param_dtype, reduce_dtype=reduce_dtype,
            cpu_offload=cpu_offload, reshard_after_forward=reshard_after_forward,
            sequence_parallel=sequence_parallel, loss_parallel=loss_parallel,
        )
        self._loss_parallel_depth = 0

    # -- mesh ---------------------------------------------------------------------------------
    def setup_environment(self) -> None:
        self._data_parallel_size, self._tensor_parallel_size = resolve_mesh_sizes(
            self._data_parallel_size, self._tensor_parallel_size, self.num_nodes,
            self.num_processes)
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        if self._save_distributed_checkpoint:
            for callback in trainer.checkpoint_callbacks:
                _refuse_remote_directory(getattr(callback, "dirpath", None))
        super().setup(trainer)

    def model_to_device(self) -> None:
        """With CPU offload FSDP2 keeps the shards in host memory and copies each one to the
        GPU for its all-gather: moving the module would undo the offload. The module still
        reports the GPU as its device, where batches and metrics belong."""
        if not self.parallel_plan.cpu_offload:
            super().model_to_device()
            return
        from lightning.fabric.utilities.device_dtype_mixin import _update_properties

        _update_properties(self.lightning_module, device=self.root_device)

    @property
    def tensor_parallel_size(self) -> int:
        return self.device_mesh["tensor_parallel"].size()

    @property
    def data_parallel_size(self) -> int:
        return self.device_mesh["data_parallel"].size()

    # -- vocabulary-parallel loss --------------------------------------------------------------
    @contextmanager
    def _loss_parallel(self) -> Generator[None, None, None]:
        """``loss_parallel()`` around a step or a backward pass, entered once (a manual
        ``manual_backward`` inside a step nests) and left even when the step raises."""
        active = (self.parallel_plan.loss_parallel and self._device_mesh is not None
                  and self.tensor_parallel_size > 1)
        if not active or self._loss_parallel_depth:
            yield
            return
        from torch.distributed.tensor.parallel import loss_parallel

        context = loss_parallel()
        context.__enter__()
        self._loss_parallel_depth += 1
        try:
            yield
        finally:
            self._loss_parallel_depth -= 1
            context.__exit__(None, None, None)

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_parallel():
            return super().training_step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_parallel():
            return super().validation_step(*args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self._loss_parallel():
            return super().test_step(*args, **kwargs)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        with self._loss_parallel():
            return super().backward(closure_loss, optimizer, *args, **kwargs)

    # -- checkpoints ---------------------------------------------------------------------------
    @property
    def checkpoint_io(self) -> CheckpointIO:
        """Single-file checkpoints (``save_distributed_checkpoint=False``) go through
        ``AtomicCheckpointIO`` unless a ``CheckpointIO`` was given (Lightning's default would
        be ``TorchCheckpointIO``)."""
        if self._checkpoint_io is None:
            self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(self._checkpoint_io, _WrappingCheckpointIO):
            self._checkpoint_io.checkpoint_io = AtomicCheckpointIO()  # only when it has none
        return self._checkpoint_io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH,
                        storage_options: Any | None = None) -> None:
        """A sharded checkpoint is written to a hidden sibling directory and renamed into
        place once every rank has finished, so a crash never leaves a half-written
        checkpoint under the real name (and never destroys the previous one)."""
        if not self._save_distributed_checkpoint:
            super().save_checkpoint(checkpoint, filepath, storage_options)
            return
        _refuse_remote_directory(filepath)
        path = Path(self.broadcast(filepath))
        staging = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
        if self.is_global_zero and staging.exists():
            shutil.rmtree(staging)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        self._write_manifest(staging)
        self.barrier()
        if self.is_global_zero:
            replace_directory(staging, path)
        self.barrier()

    def _write_manifest(self, directory: Path) -> None:
        """Every rank checksums the shards it wrote; rank 0 adds the rest and writes the
        manifest last (``checkpoint_record``), before the directory is renamed into place."""
        own = checksum_files(directory, shard_names(directory, self.global_rank))
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, own)
        else:
            gathered = [own]
        if self.is_global_zero:
            write_manifest(directory, {k: v for part in gathered for k, v in part.items()})

    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """Refuses a checkpoint that does not match its size/checksum record."""
        if is_local_path(checkpoint_path):
            ensure_loadable(str(checkpoint_path).removeprefix("file://"))
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def _refuse_remote_directory(path: _PATH | None) -> None:
    if path is not None and not is_local_path(path):
        raise ValueError(f"AquilaParallelStrategy: sharded checkpoints cannot go to object "
                         f"storage ({path}): give a local or shared-filesystem checkpoint "
                         "folder, or save_distributed_checkpoint=false for single files")
