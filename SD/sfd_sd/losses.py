"""SFD losses, written once against ``GuidedDenoiser`` (docs/method.md section 3).

Both return *per-sample* losses (sums over latent elements); ``masked_sum`` drops samples whose
loss is not finite (NaN/inf outputs, the authors' numerical safety net) and divides by a fixed
normaliser, so a dropped sample simply contributes nothing.
"""
from __future__ import annotations

import torch

from .denoiser import GuidedDenoiser


def fake_score_loss(fake: GuidedDenoiser, x_g: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                    prompts, guidance: float = 1.0, negative=None) -> torch.Tensor:
    """L_phi = || eps - eps_phi(a_t sg(x_g) + b_t eps, t, c) ||^2 per sample (guided with kappa1)."""
    x_t = fake.schedule.add_noise(x_g.detach(), eps, t)
    eps_hat = fake.eps(x_t, t, prompts, guidance, negative)
    return (eps_hat - eps).square().flatten(1).sum(1)


def sid_generator_loss(teacher: GuidedDenoiser, fake: GuidedDenoiser, x_g: torch.Tensor, t: torch.Tensor,
                       eps: torch.Tensor, *, teacher_prompts, fake_prompts, alpha: float = 1.0,
                       teacher_guidance: float = 1.0, fake_guidance: float = 1.0,
                       teacher_negative=None, fake_negative=None) -> torch.Tensor:
    """SiD generator loss per sample.

    x_t = a_t x_g + b_t eps; f_psi, f_phi denoised estimates (weights frozen by the caller, gradients
    flow through x_t into the generator); omega = sg(mean |f_psi - x_g|) clamped >= 1e-5;
    L = sum (f_psi - f_phi) * [(f_psi - x_g) - alpha (f_psi - f_phi)] / omega.
    """
    x_t = teacher.schedule.add_noise(x_g, eps, t)
    f_psi = teacher.x0(x_t, t, teacher_prompts, teacher_guidance, teacher_negative)
    f_phi = fake.x0(x_t, t, fake_prompts, fake_guidance, fake_negative)
    x_g = x_g.float()
    omega = (f_psi - x_g).abs().flatten(1).mean(1).clamp_min(1e-5).detach()
    diff = f_psi - f_phi
    per = (diff * ((f_psi - x_g) - alpha * diff)).flatten(1).sum(1)
    return per / omega


def masked_sum(per_sample: torch.Tensor, normaliser: float) -> tuple[torch.Tensor, int]:
    """Sum of the finite per-sample losses / normaliser, and how many samples were kept."""
    keep = torch.isfinite(per_sample.detach())
    n = int(keep.sum())
    total = per_sample[keep].sum() / normaliser if n else per_sample.new_zeros(()) * 0.0
    return total, n


@torch.no_grad()
def clean_gradients_(params) -> None:
    """NaN -> 0 and +-inf -> +-1e5 in gradients, before the optimiser step."""
    for p in params:
        if p.grad is not None:
            torch.nan_to_num_(p.grad, nan=0.0, posinf=1e5, neginf=-1e5)
