"""Small pieces every method shares: EMA, DDP wrapping, grid sampling."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Dist


def frozen_copy(net: nn.Module) -> nn.Module:
    ema = copy.deepcopy(net).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net (parameters), buffers copied."""
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in net.parameters()], 1.0 - decay)
    for b_ema, b in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b)


def ema_decay(cfg: dict, step: int) -> float:
    """training.ema, optionally ramped up so that short runs do not average in the random init."""
    tr = cfg["training"]
    return min(tr["ema"], (1 + step) / (10 + step)) if tr["ema_rampup"] else tr["ema"]


def wrap(net: nn.Module, dist: Dist) -> nn.Module:
    """DDP under torchrun, the module itself otherwise."""
    if not dist.enabled:
        return net
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return DistributedDataParallel(net, device_ids=ids)


def unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, DistributedDataParallel) else net


def grid_labels(n_classes: int, per_class: int, device) -> tuple[torch.Tensor, list[int]]:
    """Labels of a grid with one row per class, and the within-class index of every image."""
    labels = torch.arange(n_classes, device=device).repeat_interleave(per_class)
    return labels, list(range(per_class)) * n_classes
