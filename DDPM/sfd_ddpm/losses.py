"""The SiD / SFD losses (docs/method.md section 3), written once against the Denoiser interface.

All losses are returned *per sample* (pixel sums); callers average over the batch and weight terms.
Guidance scales w are the DDPM convention, guided = (1 + w) out(x, c) - w out(x, null) (SiD-LSG's
kappa = 1 + w); w = 0 is one conditional pass, exactly the unguided loss.
"""
from __future__ import annotations

from typing import Callable

import torch

from .diffusion import Denoiser


def fake_score_loss(fake_score: Denoiser, x_g: torch.Tensor, label: torch.Tensor, t: torch.Tensor,
                    eps: torch.Tensor, guidance: float = 0.0, augment=None) -> torch.Tensor:
    """Denoising score matching on generator samples, generator stopped, with the backbone's loss:
    VP: L_phi = || eps - eps_phi(a_t sg(x_g) + b_t eps, t, c) ||^2;
    EDM: L_phi = lambda(sigma) || D_phi(sg(x_g) + sigma eps; sigma, c) - sg(x_g) ||^2 (docs/method.md section 4);
    the fake score's output guided with ``guidance`` (SiD-LSG's kappa1). ``augment`` (sfd_ddpm.augment,
    SiD's CIFAR-10 setting): the fake score learns augmented generator images, told how through its
    augmentation labels; the generator loss stays un-augmented (all-zero labels), as in SiD."""
    x_g = x_g.detach()
    if augment is None:
        return fake_score.loss(x_g, label, t, eps, guidance)
    x_a, augment_labels = augment(x_g)
    return fake_score.loss(x_a, label, t, eps, guidance, augment_labels)


def sid_loss(x_g: torch.Tensor, f_teacher: torch.Tensor, f_fake: torch.Tensor, alpha: float) -> torch.Tensor:
    """L_theta = sum_pixels (f_psi - f_phi) [(f_psi - x_g) - alpha (f_psi - f_phi)] / omega,
    omega = stopgrad(mean_pixels |f_psi - x_g|) clamped >= 1e-5."""
    omega = (f_teacher - x_g).abs().flatten(1).mean(1).clamp_min(1e-5).detach()
    diff = f_teacher - f_fake
    return (diff * ((f_teacher - x_g) - alpha * diff)).flatten(1).sum(1) / omega


def generator_loss(teacher: Denoiser, fake_score: Denoiser, x_g: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                   label_teacher: torch.Tensor | Callable[[torch.Tensor], torch.Tensor], label_fake: torch.Tensor,
                   alpha: float, teacher_guidance: float = 0.0, fake_guidance: float = 0.0) -> torch.Tensor:
    """SiD generator loss at x_t = noised x_g (a_t x_g + b_t eps, or x_g + sigma eps for EDM); gradients
    reach theta through x_g and through the
    inputs of both (frozen) networks. ``label_teacher`` may be a function of the fake score's denoised
    estimate (classifier pseudo-labels), which is why the fake score is evaluated first. The teacher is
    guided with ``teacher_guidance`` (SiD-LSG's kappa4), the fake score with ``fake_guidance`` (kappa2)."""
    x_t = teacher.schedule.add_noise(x_g, t, eps)
    f_fake = fake_score(x_t, t, label_fake, fake_guidance)
    if callable(label_teacher):
        label_teacher = label_teacher(f_fake.detach())
    f_teacher = teacher(x_t, t, label_teacher, teacher_guidance)
    return sid_loss(x_g, f_teacher, f_fake, alpha)

