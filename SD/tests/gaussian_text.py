"""A text-conditioned denoiser with a known score, for the semantic SFD test.

``GaussianTextScore`` has the call signature of diffusers' ``UNet2DConditionModel`` (``forward(sample,
timestep, encoder_hidden_states, return_dict=True)``), so ``GuidedDenoiser`` and the SFD training step
use it exactly as they use an SD UNet. Its eps is the exact score of per-prompt Gaussian latents
x0 | c ~ N(m(c), diag v(c)):

    eps(x_t, t, c) = b_t (x_t - a_t m(c)) / (a_t^2 v(c) + b_t^2),

where (m(c), log v(c)) is a linear map of the text encoder's hidden states for c (all token
positions, flattened). The map is shared by all prompts, so a change made for one prompt leaks into
prompts with similar hidden states, as in a real text-conditioned UNet.

The teacher is fitted by least squares so that each prompt yields the pattern of the word it
contains. Trainable copies are the fake score (the family represents the score of any per-prompt
Gaussian, hence of the one-step generator's output) and the generator (whose one-step output
sigma_{t*} (z - eps(b_{t*} z, t*, c)) is then a per-prompt Gaussian too), as in the DDPM tree's
``tests/analytic.py``.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
from torch import nn


class GaussianTextScore(nn.Module):
    def __init__(self, alphas_cumprod: torch.Tensor, text_len: int, text_dim: int, shape: tuple[int, ...]):
        super().__init__()
        abar = alphas_cumprod.double()
        self.register_buffer("a_table", abar.sqrt().float())
        self.register_buffer("b_table", (1 - abar).sqrt().float())
        self.shape = tuple(shape)
        self.dim = math.prod(shape)
        self.proj = nn.Linear(text_len * text_dim, 2 * self.dim)

    def stats(self, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-prompt latent mean and variance, each (batch, dim)."""
        mean, log_var = self.proj(encoder_hidden_states.flatten(1).float()).chunk(2, dim=1)
        return mean, log_var.exp()

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True, **_):
        mean, var = self.stats(encoder_hidden_states)
        t = timestep.to(sample.device).long().expand(sample.shape[0])
        a, b = self.a_table[t][:, None], self.b_table[t][:, None]
        x = sample.flatten(1).float()
        eps = (b * (x - a * mean) / (a * a * var + b * b)).view_as(sample)
        return SimpleNamespace(sample=eps) if return_dict else (eps,)

    @torch.no_grad()
    def fit(self, hidden_states: torch.Tensor, means: torch.Tensor, variance: float, ridge: float = 1e-4):
        """Least squares (ridge): hidden states (n, L, D) of n prompts -> their means (n, dim), variance."""
        feats = hidden_states.flatten(1).double()
        feats = torch.cat([feats, torch.ones(len(feats), 1, dtype=feats.dtype)], dim=1)
        target = torch.cat([means.flatten(1).double(),
                            torch.full((len(feats), self.dim), math.log(variance), dtype=feats.dtype)], dim=1)
        gram = feats @ feats.T + ridge * torch.eye(len(feats), dtype=feats.dtype)
        w = feats.T @ torch.linalg.solve(gram, target)  # min-norm (ridge) solution, (features + 1, 2 dim)
        self.proj.weight.copy_(w[:-1].T.float())
        self.proj.bias.copy_(w[-1].float())
        return self
