"""Discrete VP diffusion (SPEC section 2) and the denoiser interface.

Every loss and sampler in this package is written once against :class:`Denoiser`, which wraps any
eps-prediction network ``net(x_t, t, label) -> eps`` (a raw module or a DDP wrapper).
"""
from __future__ import annotations

import torch


class VPSchedule:
    """beta_t, abar_t and the derived a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t), sigma_t = b_t / a_t.

    Timesteps are integer indices 0..T-1, as in Ho et al. and the authors' code.
    """

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, num_timesteps: int = 1000,
                 kind: str = "linear"):
        if kind == "linear":
            betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        elif kind == "scaled_linear":  # Stable Diffusion's schedule
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_timesteps, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"unknown beta schedule {kind!r} (expected 'linear' or 'scaled_linear')")
        self.num_timesteps = num_timesteps
        self.betas = betas
        self.abar = torch.cumprod(1.0 - betas, dim=0)

    def _gather(self, values: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        if not torch.is_tensor(t):
            return values[t].float()
        return values.to(t.device)[t.long()].float()

    def a(self, t):
        return self._gather(self.abar.sqrt(), t)

    def b(self, t):
        return self._gather((1.0 - self.abar).sqrt(), t)

    def sigma(self, t):
        return self._gather(((1.0 - self.abar) / self.abar).sqrt(), t)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x_0 + b_t eps, per-sample t."""
        return _bc(self.a(t), x0) * x0 + _bc(self.b(t), x0) * eps

    def sample_t(self, n: int, lo: int, hi: int, device, generator=None) -> torch.Tensor:
        """t ~ U{lo..hi-1}, independently per sample (exclusive upper bound, SPEC section 2)."""
        return torch.randint(lo, hi, (n,), device=device, generator=generator)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample vector over the remaining dimensions of ``like``."""
    if v.dim() == 0:
        return v
    return v.view(-1, *([1] * (like.dim() - 1)))


class Denoiser:
    """eps(x_t, t, c) and the denoised estimate f(x_t, t, c) = (x_t - b_t eps) / a_t.

    ``null_label`` is the learned "no class" embedding used for classifier-free guidance:
    guided eps = (1 + w) eps(x, c) - w eps(x, null) (SPEC section 4). With w = 0 only the
    conditional pass runs.
    """

    def __init__(self, net, schedule: VPSchedule, null_label: int):
        self.net = net
        self.schedule = schedule
        self.null_label = null_label

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor, guidance: float = 0.0) -> torch.Tensor:
        t = _per_sample(t, x_t)
        if guidance == 0:
            return self.net(x_t, t, label)
        null = torch.full_like(label, self.null_label)
        eps_c, eps_u = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([label, null])).chunk(2)
        return (1 + guidance) * eps_c - guidance * eps_u

    def __call__(self, x_t, t, label, guidance: float = 0.0) -> torch.Tensor:
        t = _per_sample(t, x_t)
        eps = self.eps(x_t, t, label, guidance)
        return (x_t - _bc(self.schedule.b(t), x_t) * eps) / _bc(self.schedule.a(t), x_t)

    denoise = __call__


def _per_sample(t, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):
        return torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
    if t.dim() == 0:
        return t.expand(x.shape[0]).to(x.device)
    return t


def eps_loss(denoiser: Denoiser, x0: torch.Tensor, label: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor) -> torch.Tensor:
    """Per-sample pixel-summed eps-prediction loss ||eps - eps(x_t, t, c)||^2 (Ho et al.)."""
    x_t = denoiser.schedule.add_noise(x0, t, eps)
    return (eps - denoiser.eps(x_t, t, label)).square().flatten(1).sum(1)
