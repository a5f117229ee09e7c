"""Diagonal Fisher information of the denoising loss (Selective Amnesia's EWC term, VDU's precision).

F_i = 1/N sum_n g_{n,i}^2 with g_n = w sum_k grad_theta l(x_n, level_k, c_n; eps_k), the per-sample gradient
over the backbone's own noise levels (docs/method.md section 5), which the noise process states
(``schedule.fisher_levels``) so this code never asks which backbone it runs on:

- DDPM (VP): the sum over all T timesteps, or over ``levels`` evenly spaced ones scaled by T / len (an
  unbiased estimate of the full sum) -- the same levels for every sample, as in SA;
- EDM: ``levels`` (default 100) fresh draws per sample of the training distribution
  ln sigma ~ N(P_mean, P_std^2), weighted 1 / levels: the gradient of the expected loss E_sigma l.

``timesteps`` gives explicit integer timesteps instead (DDPM only; scaled by T / len). The levels of one
sample are processed in chunks: the gradient of a chunk's summed loss is the sum of its per-level
gradients, so chunking changes memory, not the result.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from .diffusion import Denoiser, eps_loss


def diagonal_fisher(denoiser: Denoiser, images: torch.Tensor, labels: torch.Tensor, timesteps=None,
                    chunk: int = 100, generator: torch.Generator | None = None, progress: bool = False,
                    levels: int | None = None) -> dict:
    """{parameter name: F} for the network behind ``denoiser`` (which must be a plain module)."""
    net: nn.Module = denoiser.net
    sched = denoiser.schedule
    if timesteps is not None:
        T = sched.num_timesteps
        timesteps = torch.as_tensor(timesteps)
        fixed = (timesteps, T / len(timesteps))
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(net.parameters()).device
    for x, c in tqdm(list(zip(images, labels)), disable=not progress, desc="Fisher", unit="sample"):
        net.zero_grad(set_to_none=True)
        level, scale = fixed if timesteps is not None else sched.fisher_levels(levels, generator)
        for t in level.split(chunk):
            k = len(t)
            eps = torch.randn((k, *x.shape), generator=generator).to(device)
            loss = eps_loss(denoiser, x.to(device).expand(k, *x.shape), c.to(device).expand(k), t.to(device), eps)
            (loss.sum() * scale).backward()
        for n, p in params.items():
            if p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
    net.zero_grad(set_to_none=True)
    return {n: f / len(images) for n, f in fisher.items()}
