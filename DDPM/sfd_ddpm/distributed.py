"""One process or torchrun, CPU or CUDA.

Under torchrun (WORLD_SIZE > 1) the process group uses NCCL on CUDA and gloo on CPU; the device is
``cuda:LOCAL_RANK`` (multi-node safe). Only rank 0 writes files.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """All-reduce average over ranks (for logging and losses)."""
        if self.enabled:
            value = value.detach().clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value

    def local_batch(self, global_batch: int) -> int:
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by {self.world_size} processes")
        return global_batch // self.world_size

    def print0(self, *args, **kwargs) -> None:
        if self.is_main:
            print(*args, **kwargs, flush=True)


def init(device: str | None = None) -> Dist:
    """Initialise from torchrun's environment (or a single process when it is absent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return Dist(rank=rank, world_size=world, local_rank=local, device=dev)


# Errors a rank re-raises when rank 0's ``main_rank_first`` work failed (by name: no pickled exceptions).
_RERAISE = {"FileNotFoundError": FileNotFoundError, "ValueError": ValueError}


def main_rank_first(fn):
    """``fn()`` on rank 0 alone, then on the other ranks, which wait for it: a dataset download happens
    once instead of every rank racing to write the same files (they find rank 0's files; data.root has
    to be on a file system every node sees). When ``fn`` fails on rank 0 every rank raises its message,
    so none is left waiting. One process: just ``fn()``."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return fn()
    failure: list = [None]
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as err:
            dist.broadcast_object_list([(type(err).__name__, str(err))], src=0)
            raise
        dist.broadcast_object_list(failure, src=0)
        return result
    dist.broadcast_object_list(failure, src=0)
    if failure[0] is not None:
        kind, message = failure[0]
        raise _RERAISE.get(kind, RuntimeError)(message)
    return fn()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
