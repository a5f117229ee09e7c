"""Diagonal Fisher information of the eps-loss (Selective Amnesia's EWC term, VDU's precision).

F_i = 1/N sum_n g_{n,i}^2 with g_n = sum_t grad_theta l(x_n, t, c_n; eps_t), the per-sample gradient
summed over timesteps (docs/method.md section 5). The timesteps of one sample are processed in chunks: the
gradient of a chunk's summed loss is the sum of its per-timestep gradients, so chunking changes
memory, not the result. ``timesteps`` may be a subset (e.g. every 10th), then the sum is scaled by
T / len(timesteps) as an unbiased estimate of the full sum.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .diffusion import Denoiser, eps_loss


def diagonal_fisher(denoiser: Denoiser, images: torch.Tensor, labels: torch.Tensor, timesteps=None,
                    chunk: int = 100, generator: torch.Generator | None = None, progress: bool = False) -> dict:
    """{parameter name: F} for the network behind ``denoiser`` (which must be a plain module)."""
    net: nn.Module = denoiser.net
    T = denoiser.schedule.num_timesteps
    timesteps = torch.arange(T) if timesteps is None else torch.as_tensor(timesteps)
    scale = T / len(timesteps)
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(net.parameters()).device
    for x, c in tqdm(list(zip(images, labels)), disable=not progress, desc="Fisher", unit="sample"):
        net.zero_grad(set_to_none=True)
        for t in timesteps.split(chunk):
            k = len(t)
            eps = torch.randn((k, *x.shape), generator=generator).to(device)
            loss = eps_loss(denoiser, x.to(device).expand(k, *x.shape), c.to(device).expand(k), t.to(device), eps)
            (loss.sum() * scale).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
    net.zero_grad(set_to_none=True)
    return {n: f / len(images) for n, f in fisher.items()}
