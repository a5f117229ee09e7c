"""EDM's noise process in sigma space (Karras et al. 2022; docs/method.md section 4), behind the denoiser interface.

Levels are noise standard deviations sigma: x = x0 + sigma eps, and the network (an
:class:`~sfd_ddpm.networks_edm.EDMNetwork`) returns the denoised D(x; sigma, c) directly. This class
answers the same questions as :class:`~sfd_ddpm.diffusion.VPSchedule`, so every loss, sampler and
method runs on it unchanged:

- pretraining levels: ln sigma ~ N(P_mean, P_std^2) (-1.2, 1.2), loss weight
  lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (EDM's loss, eq. 2 / Table 1);
- distillation levels: SiD's rho-schedule sigma(u) = (s_max^(1/rho) + (1 - u)(s_min^(1/rho) - s_max^(1/rho)))^rho
  with u = t / 1000 for t ~ U[t_min, t_max) (SiD: [0, 800), so sigma in about [0.002, 24.4]);
- the one-step generator's level: sigma_init (2.5);
- the sampler's grid: sigma_i = (s_max^(1/rho) + i/(N-1)(s_min^(1/rho) - s_max^(1/rho)))^rho, i < N, and 0.
"""
from __future__ import annotations

import torch

from .diffusion import _bc


class EDMSchedule:
    samplers, default_sampler = ("edm", "one_step"), "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: float = 0.5, P_mean: float = -1.2, P_std: float = 1.2):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"edm.sigma_min and edm.sigma_max must satisfy 0 < sigma_min < sigma_max, "
                             f"got {sigma_min} and {sigma_max}")
        if rho <= 0 or sigma_data <= 0 or P_std <= 0:
            raise ValueError("edm.rho, edm.sigma_data and edm.P_std must be positive")
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.sigma_data, self.P_mean, self.P_std = sigma_data, P_mean, P_std

    @classmethod
    def from_config(cls, cfg: dict) -> "EDMSchedule":
        e = cfg["edm"]
        return cls(e["sigma_min"], e["sigma_max"], e["rho"], e["sigma_data"], e["P_mean"], e["P_std"])

    @property
    def num_timesteps(self):
        """EDM has no discrete timestep grid; the methods ask the schedule for levels in its own terms
        (``sample_train``, ``sample_range``, ``fisher_levels``, ``ddim_grid``), so only code written for
        integer timesteps (the DDPM/DDIM samplers) could reach this, and it stops with a message."""
        raise ValueError("an EDM (songunet) network has continuous noise levels sigma, not discrete DDPM timesteps; "
                         "use its own levels (sample_train, sample_range, fisher_levels, sampler_sigmas) or the "
                         "edm sampler")

    # ---- the noise-process interface (see sfd_ddpm.diffusion) ----
    def add_noise(self, x0: torch.Tensor, sigma, eps: torch.Tensor) -> torch.Tensor:
        """x = x0 + sigma eps, per-sample sigma."""
        return x0 + _bc(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device), x0) * eps

    def noise_scale(self, sigma, dtype: torch.dtype = torch.float32):
        return sigma

    def x0_from(self, x, sigma, out):
        return out  # the network is the denoiser D

    def eps_from(self, x, sigma, out):
        return (x - out) / _bc(sigma, x)

    def eps_given_x0(self, x, sigma, x0):
        return (x - x0) / _bc(sigma, x)

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
        return (sigma ** 2 + self.sigma_data ** 2) / (sigma * self.sigma_data) ** 2

    def denoising_loss(self, denoiser, x0, label, sigma, eps, guidance: float = 0.0,
                       augment_labels=None) -> torch.Tensor:
        """EDM's per-sample loss lambda(sigma) ||D(x0 + sigma eps; sigma, c, a) - x0||^2 (pixel sums), D guided
        with scale w (0: one conditional pass); x0 may be augmented images with augmentation labels a."""
        x = self.add_noise(x0, sigma, eps)
        D = denoiser(x, sigma, label, guidance, augment_labels)
        return self.loss_weight(sigma) * (D - x0).square().flatten(1).sum(1)

    def sample_train(self, n: int, device, generator=None) -> torch.Tensor:
        """ln sigma ~ N(P_mean, P_std^2)."""
        z = torch.randn(n, generator=generator, device=device if generator is None else "cpu")
        return (self.P_mean + self.P_std * z).exp().to(device)

    def fisher_levels(self, count: int | None = None, generator=None) -> tuple[torch.Tensor, float]:
        """The levels of one sample's diagonal Fisher (sfd_ddpm.fisher) and the weight of their summed loss:
        ``count`` (default 100) draws of the training distribution ln sigma ~ N(P_mean, P_std^2) from
        ``generator``, weighted 1 / count, so the gradient is a Monte-Carlo estimate of that of the expected
        loss E_sigma l(x, sigma)."""
        count = 100 if count is None else int(count)
        if count < 1:
            raise ValueError(f"the Fisher needs at least one noise level per sample, got {count}")
        return self.sample_train(count, "cpu", generator), 1.0 / count

    def grid_steps_range(self) -> tuple[int, int | None]:
        """The step counts :meth:`ddim_grid` accepts: at least 2 (sigma_max and sigma_min), no upper bound."""
        return 2, None

    def start_noise(self, z: torch.Tensor, level) -> torch.Tensor:
        """The sampler's starting point at the top grid level sigma: x = sigma z (EDM's Algorithm 1)."""
        return z * level

    def rho_sigma(self, u: torch.Tensor) -> torch.Tensor:
        """sigma(u) = (s_max^(1/rho) + (1 - u)(s_min^(1/rho) - s_max^(1/rho)))^rho: u = 0 -> s_min, u = 1 -> s_max."""
        lo, hi = self.sigma_min ** (1 / self.rho), self.sigma_max ** (1 / self.rho)
        return (hi + (1 - u.double()) * (lo - hi)) ** self.rho

    def sample_range(self, n: int, lo: int, hi: int, device) -> torch.Tensor:
        """SiD's distillation levels: u ~ U[lo/1000, hi/1000), sigma = sigma(u)."""
        if not 0 <= lo < hi <= 1000:
            raise ValueError(f"the level range [{lo}, {hi}) must lie in [0, 1000] (positions u = t / 1000)")
        u = (lo + (hi - lo) * torch.rand(n, device=device)) / 1000
        return self.rho_sigma(u).float()

    def generator_level(self, sfd_cfg: dict) -> float:
        """The one-step generator's level: ``sfd.sigma_init``."""
        return float(sfd_cfg["sigma_init"])

    def sampler_sigmas(self, steps: int) -> list[float]:
        """EDM's N-step grid sigma_0 = s_max > ... > sigma_{N-1} = s_min, then sigma_N = 0 (eq. 5)."""
        if steps < 2:
            raise ValueError(f"the EDM sampler needs at least 2 steps, got {steps}")
        u = 1 - torch.arange(steps, dtype=torch.float64) / (steps - 1)
        return self.rho_sigma(u).tolist() + [0.0]

    def ddim_grid(self, steps: int) -> list[float]:
        """The sampler's grid without the final 0, ascending (as VPSchedule.ddim_grid)."""
        return self.sampler_sigmas(steps)[-2::-1]
