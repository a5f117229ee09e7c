"""Samplers written once against the Denoiser interface, with per-seed noise streams.

Every image owns a ``torch.Generator`` seeded from its identity, and every random draw for that image
(initial noise, each ancestral step) comes from it; image i is therefore identical whatever the
batch size or the number of processes.
"""
from __future__ import annotations

import torch

from .diffusion import Denoiser

SAMPLERS = ("ddpm", "ddim", "one_step", "edm")


def image_seed(seed: int, label: int, index: int) -> int:
    """The seed of image ``index`` of class ``label`` in a run seeded with ``seed``."""
    return (seed * 1_000_003 + label * 10_000_019 + index) % (2 ** 63)


class NoiseStreams:
    """One generator per image; ``randn()`` draws one (C, H, W) tensor from each and stacks them."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = shape, device

    def randn(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


@torch.no_grad()
def ddpm_ancestral(denoiser: Denoiser, labels: torch.Tensor, noise: NoiseStreams, guidance: float = 0.0,
                   clip_x0: bool = False, progress=None) -> torch.Tensor:
    """Ancestral sampling of Ho et al. over all T steps, with the posterior q(x_{t-1} | x_t, x0_hat):

    mean = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat + sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t) x_t,
    variance beta~_t = beta_t (1 - abar_{t-1}) / (1 - abar_t). Without clipping this is Ho et al.'s eps form.
    """
    sched = denoiser.schedule
    x = noise.randn()
    for t in _steps(range(sched.num_timesteps - 1, -1, -1), progress):
        beta, abar = sched.betas[t].item(), sched.abar[t].item()
        abar_prev = sched.abar[t - 1].item() if t > 0 else 1.0
        x0, _ = denoiser.predict(x, t, labels, guidance, clip_x0)
        x = (abar_prev ** 0.5 * beta * x0 + (1 - beta) ** 0.5 * (1 - abar_prev) * x) / (1 - abar)
        if t > 0:
            x = x + (beta * (1 - abar_prev) / (1 - abar)) ** 0.5 * noise.randn()
    return x


@torch.no_grad()
def ddim(denoiser: Denoiser, labels: torch.Tensor, noise: NoiseStreams, steps: int = 100, eta: float = 0.0,
         guidance: float = 0.0, clip_x0: bool = False, progress=None) -> torch.Tensor:
    """DDIM (Song et al., eq. 12) on the uniform sub-sequence 0, k, 2k, ... with k = T // steps.

    eta = 1 with all T steps is the ancestral sampler above. ``clip_x0`` clamps the denoised estimate
    to the data range at every step (Ho et al.'s sampler did; the authors' DDIM did not).
    """
    sched = denoiser.schedule
    T = sched.num_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"DDIM steps must be in [1, {T}], got {steps}")
    seq = ddim_timesteps(T, steps)
    x = noise.randn()
    for i in _steps(range(len(seq) - 1, -1, -1), progress):
        t = seq[i]
        abar, abar_prev = sched.abar[t].item(), (sched.abar[seq[i - 1]].item() if i > 0 else 1.0)
        x0, eps = denoiser.predict(x, t, labels, guidance, clip_x0)
        c1 = eta * ((1 - abar / abar_prev) * (1 - abar_prev) / (1 - abar)) ** 0.5
        c2 = max(1 - abar_prev - c1 ** 2, 0.0) ** 0.5
        x = abar_prev ** 0.5 * x0 + c2 * eps
        if c1 > 0:
            x = x + c1 * noise.randn()
    return x


@torch.no_grad()
def edm_heun(denoiser: Denoiser, labels: torch.Tensor, noise: NoiseStreams, steps: int = 18,
             guidance: float = 0.0, progress=None) -> torch.Tensor:
    """EDM's deterministic 2nd-order Heun sampler (Karras et al., Algorithm 1, S_churn = 0) on the
    rho-schedule grid sigma_0 = sigma_max > ... > sigma_{N-1} = sigma_min, sigma_N = 0:
    x_0 = sigma_0 z; Euler step with d = (x - D(x; sigma_i)) / sigma_i, then the trapezoidal correction
    except on the last step (to sigma = 0). N steps cost 2N - 1 evaluations (18 -> 35)."""
    sigmas = denoiser.schedule.sampler_sigmas(steps)
    x = noise.randn() * sigmas[0]
    for i in _steps(range(steps), progress):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = denoiser.eps(x, s, labels, guidance)
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d_next = denoiser.eps(x_next, s_next, labels, guidance)
            x_next = x + (s_next - s) * 0.5 * (d + d_next)
        x = x_next
    return x


def one_step(generator: Denoiser, labels: torch.Tensor, z: torch.Tensor, t_init,
             guidance: float = 0.0) -> torch.Tensor:
    """The one-step generator: the denoiser applied to pure noise at level t_init, with optional
    guidance (0 in the paper's evaluation). VP: G(z, c) = sigma_{t*} (z - eps(b_{t*} z, t*, c))
    (docs/method.md section 3); EDM: G(z, c) = D(sigma_init z; sigma_init, c) (docs/method.md section 4)."""
    return generator(generator.schedule.noise_scale(t_init, z.dtype) * z, t_init, labels, guidance)


def sample(denoiser: Denoiser, sampler: str, labels: torch.Tensor, seeds: list[int], shape, *, steps: int = 100,
           eta: float = 0.0, guidance: float = 0.0, t_init: int = 440, clip_x0: bool = False,
           progress=None) -> torch.Tensor:
    """Dispatch by name; returns images in (roughly) [-1, 1]. ``steps`` is DDIM's or EDM's step count."""
    if sampler in SAMPLERS and sampler not in denoiser.schedule.samplers:
        raise ValueError(f"sampler {sampler!r} does not fit this network's noise process; use one of "
                         f"{', '.join(denoiser.schedule.samplers)}")
    noise = NoiseStreams(seeds, shape, labels.device)
    if sampler == "ddpm":
        return ddpm_ancestral(denoiser, labels, noise, guidance, clip_x0, progress)
    if sampler == "ddim":
        return ddim(denoiser, labels, noise, steps, eta, guidance, clip_x0, progress)
    if sampler == "edm":
        return edm_heun(denoiser, labels, noise, steps, guidance, progress)
    if sampler == "one_step":
        with torch.no_grad():
            return one_step(denoiser, labels, noise.randn(), t_init, guidance)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def ddim_timesteps(T: int, steps: int) -> list[int]:
    """The uniform sub-sequence 0, k, 2k, ... < T with k = T // steps (the authors' 'uniform' skip). When
    ``steps`` does not divide T it has more than ``steps`` entries (T = 1000, steps = 3: 0, 333, 666, 999)."""
    return list(range(0, T, T // steps))


def nfe(sampler: str, steps: int, guidance: float, num_timesteps: int = 1000) -> int:
    """Network evaluations per image (a guided step costs two); DDIM evaluates once per grid timestep."""
    if sampler == "edm":  # Heun: two evaluations per step but the last
        return (2 * steps - 1) * (2 if guidance else 1)
    if sampler == "ddim":
        n = len(ddim_timesteps(num_timesteps, steps))
    else:
        n = {"ddpm": num_timesteps, "one_step": 1}[sampler]
    return n * (2 if guidance else 1)


def _steps(it, progress):
    return progress(it) if progress else it
