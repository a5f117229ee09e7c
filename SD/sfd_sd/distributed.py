"""One process or torchrun; CPU (gloo) or CUDA (NCCL).

Gradients are averaged with an explicit all-reduce after accumulation rather than through DDP:
each SFD iteration runs the generator several times per optimiser step (two loss terms, each with
its own backward), toggles ``requires_grad`` on the fake score between phases and uses gradient
checkpointing, which DDP's bucketed hooks handle poorly. One flat all-reduce per step is simple and
exact.
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

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place average over ranks."""
        if self.enabled:
            dist.all_reduce(tensor)
            tensor /= self.world_size
        return tensor

    def average_gradients(self, params) -> None:
        """Average ``.grad`` of ``params`` over ranks (missing grads count as zero)."""
        if not self.enabled:
            return
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        # Coalesce into ~64 MB buckets to keep the number of collective calls small.
        bucket: list[torch.Tensor] = []
        size = 0
        for p in params + [None]:
            if p is not None:
                bucket.append(p.grad)
                size += p.grad.numel()
            if bucket and (p is None or size >= 16 * 2**20):
                flat = torch.cat([g.reshape(-1) for g in bucket])
                self.mean_(flat)
                offset = 0
                for g in bucket:
                    g.copy_(flat[offset:offset + g.numel()].view_as(g))
                    offset += g.numel()
                bucket, size = [], 0

    def gather_objects(self, obj) -> list:
        """All ranks' ``obj`` as a list indexed by rank."""
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init(device: str = "auto") -> Dist:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was requested but CUDA is not available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
