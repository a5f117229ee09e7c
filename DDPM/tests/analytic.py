"""Small models with a known score, for tests of the SFD math and its semantics."""
from __future__ import annotations

import math

import torch
from torch import nn

from sfd_ddpm.diffusion import VPSchedule


class GaussianClassScore(nn.Module):
    """Exact eps-prediction for class-conditional data x0 | c ~ N(m_c, diag(v_c)):
    eps(x_t, t, c) = b_t (x_t - a_t m_c) / (a_t^2 v_c + b_t^2).

    m_c and log v_c are parameters, so a copy of the teacher is a trainable fake score (it represents
    the score of any per-class Gaussian, hence of the one-step generator's output exactly) or a
    generator (whose one-step output is then a per-class Gaussian too). "Images" have shape (D, 1, 1);
    label n_classes (the null class) has its own mean and variance.
    """

    def __init__(self, means: torch.Tensor, s: float):
        super().__init__()
        means = torch.cat([means, means.mean(0, keepdim=True)])
        self.means = nn.Parameter(means.clone())
        self.log_var = nn.Parameter(torch.full_like(means, math.log(s * s)))
        self.n_classes = means.shape[0] - 1
        self.sched = VPSchedule()

    @property
    def null_label(self) -> int:
        return self.n_classes

    def forward(self, x, t, label):
        flat = x.flatten(1)
        a, b = self.sched.a(t)[:, None], self.sched.b(t)[:, None]
        eps = b * (flat - a * self.means[label]) / (a * a * self.log_var[label].exp() + b * b)
        return eps.view_as(x)


class EDMGaussianClassDenoiser(nn.Module):
    """Exact EDM denoiser for x0 | c ~ N(m_c, diag(v_c)): D(x; sigma, c) = (v_c x + sigma^2 m_c) / (v_c + sigma^2).

    The sigma-space twin of :class:`GaussianClassScore` (same parameters, same uses: exact teacher,
    trainable fake score, one-step generator G(z, c) = D(sigma_init z; sigma_init, c), a per-class Gaussian).
    """

    def __init__(self, means: torch.Tensor, s: float):
        super().__init__()
        means = torch.cat([means, means.mean(0, keepdim=True)])
        self.means = nn.Parameter(means.clone())
        self.log_var = nn.Parameter(torch.full_like(means, math.log(s * s)))
        self.n_classes = means.shape[0] - 1

    @property
    def null_label(self) -> int:
        return self.n_classes

    def forward(self, x, sigma, label):
        flat, s2 = x.flatten(1), sigma.view(-1, 1) ** 2
        v = self.log_var[label].exp()
        return ((v * flat + s2 * self.means[label]) / (v + s2)).view_as(x)
