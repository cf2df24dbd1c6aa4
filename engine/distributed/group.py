"""The process group of a data-parallel run, initialised from the ``torchrun`` environment.

``torchrun --nproc_per_node N -m engine run ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in every worker; :func:`init_from_env`
reads them and initialises ``torch.distributed``'s default group (gloo on CPU, NCCL on CUDA).
Without them (a plain ``python -m engine run``) it returns :data:`SINGLE`, a world of one in
which every collective of this package is a no-op, so single-process runs are unchanged.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.distributed.shards import Shard, shard_bounds, shard_of
from engine.distributed.traffic import record

BACKENDS = ("gloo", "nccl")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the run: ``rank`` of ``world_size`` on ``backend``.

    ``backend`` is ``None`` for a world of one (no process group).  ``owns_group`` records
    whether :func:`init_from_env` created the default group (and :func:`shutdown` may destroy
    it) or found one already initialised by the caller.
    """

    rank: int = 0
    world_size: int = 1
    backend: str | None = None
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        """More than one process: collectives really communicate."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes the manifest and swaps the run into place."""
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        """Where tensors must be for a collective: the local GPU with NCCL, else the CPU."""
        if self.backend == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shard(self, total: int) -> Shard:
        """This rank's contiguous rows of ``total`` (all of them in a world of one)."""
        return shard_of(total, self.rank, self.world_size)

    def shards(self, total: int) -> list[Shard]:
        """Every rank's rows of ``total``, in rank order."""
        return shard_bounds(total, self.world_size)

    def barrier(self) -> None:
        """Wait for every rank (no-op in a world of one)."""
        if self.distributed:
            dist.barrier()
            record("barrier", 0)

    def main_only(self, echo: Callable[[str], None]) -> Callable[[str], None]:
        """``echo`` on rank 0, a silent one on the others (rank 0 speaks for the run)."""
        return echo if self.is_main else _silent

    def describe(self) -> dict[str, int | str | None]:
        """What a run manifest records about the process group."""
        return {"world_size": self.world_size, "backend": self.backend}


SINGLE = DistContext()


def backend_for(device: str | torch.device = "cpu") -> str:
    """The collective backend for tensors on ``device``: NCCL for CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def launched_by_torchrun() -> bool:
    """Whether this process is one worker of several (``WORLD_SIZE`` > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"WORLD_SIZE is set but {name} is not: launch the engine with "
                           "`torchrun --nproc_per_node N -m engine run ...`")
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(device: str | torch.device = "cpu",
                  timeout: dt.timedelta | None = None) -> DistContext:
    """The process group described by the environment (see the module docstring).

    ``device`` picks the backend (:func:`backend_for`); ``timeout`` bounds every collective
    (torch's default when ``None``: 30 minutes for gloo).  A default group that the caller
    already initialised is reused, and left alone by :func:`shutdown`.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), dist.get_backend(),
                           int(os.environ.get("LOCAL_RANK", "0")), owns_group=False)
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed; run without torchrun")
    world_size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)   # one GPU per process, by local rank
    kwargs = {} if timeout is None else {"timeout": timeout}
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world_size,
                            **kwargs)
    return DistContext(rank, world_size, backend, local_rank, owns_group=True)


def shutdown(world: DistContext) -> None:
    """Destroy the default group if :func:`init_from_env` created it for ``world``."""
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _silent(_: str) -> None:
    """The echo of ranks other than 0."""
