"""Float64 stays float64: the samplers agree with diffusers' DDPM/DDIM schedulers and with the hand-written
Heun recursion to 1e-12 when everything is float64 (a float32 cast anywhere on the path gives ~1e-7)."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from sfd_ddpm.diffusion import Denoiser
from sfd_ddpm.edm import EDMSchedule
from sfd_ddpm.samplers import image_seed, sample
from test_core import gaussian_denoiser
from test_edm import GaussianDenoiser, heun_factor

TOL = 1e-12
SHAPE = (1, 3, 3)


@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # our noise streams and diffusers' randn_tensor both draw float64
    yield
    torch.set_default_dtype(previous)


def diffusers_scheduler(cls, den):
    """diffusers' scheduler on our beta grid, its abar table replaced by the float64 one (diffusers keeps
    float32 tables; the comparison is of the two algorithms at float64)."""
    sched = cls(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)
    sched.betas, sched.alphas_cumprod = den.schedule.betas.clone(), den.schedule.abar.clone()
    sched.alphas = 1 - sched.betas
    return sched


def eps_of(den, label):
    return lambda x, t: den.eps(x, torch.tensor([int(t)]), label)


@pytest.mark.parametrize("steps,eta", [(10, 0.0), (50, 0.0), (20, 1.0)])
def test_ddim_matches_diffusers_at_float64(steps, eta):
    den, label, seed = gaussian_denoiser(), torch.tensor([3]), image_seed(0, 3, 0)
    ours = sample(den, "ddim", label, [seed], SHAPE, steps=steps, eta=eta)
    assert ours.dtype == torch.float64

    ref = diffusers_scheduler(DDIMScheduler, den)
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == list(range(0, 1000, 1000 // steps))[::-1]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *SHAPE, generator=g)
    for t in ref.timesteps:
        x = ref.step(eps_of(den, label)(x, t), t, x, eta=eta, generator=g).prev_sample
    assert (ours - x).abs().max().item() <= TOL


def test_ddpm_ancestral_matches_diffusers_at_float64():
    den, label, seed = gaussian_denoiser(), torch.tensor([7]), image_seed(1, 7, 2)
    ours = sample(den, "ddpm", label, [seed], SHAPE)

    ref = diffusers_scheduler(DDPMScheduler, den)
    ref.set_timesteps(1000)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *SHAPE, generator=g)
    for t in ref.timesteps:
        x = ref.step(eps_of(den, label)(x, t), t, x, generator=g).prev_sample
    assert (ours - x).abs().max().item() <= TOL


@pytest.mark.parametrize("steps", [18, 40])
def test_edm_heun_matches_the_hand_recursion_at_float64(steps):
    s, mu = 0.5, 0.5
    den = Denoiser(GaussianDenoiser(mu=mu, s=s), EDMSchedule(), 10)
    seeds = [image_seed(2, 0, i) for i in range(4)]
    x = sample(den, "edm", torch.zeros(4, dtype=torch.long), seeds, SHAPE, steps=steps)
    z = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(q)) for q in seeds])
    assert x.dtype == torch.float64
    assert (x - (mu + (80 * z - mu) * heun_factor(s, steps))).abs().max().item() <= TOL
