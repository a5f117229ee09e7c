"""ESD (Gandikota et al. 2023; docs/method.md section 5) for a class-conditional DDPM, with the authors' bugs fixed.

    L = || eps_theta(x_t, t, c_f) - [eps_0(x_t, t, null) - eta (eps_0(x_t, t, c_f) - eps_0(x_t, t, null))] ||^2

eps_0 is a frozen copy of the pretrained model. x_t comes from *partially sampling* the forget class
with the frozen model: DDIM (eta 0) on the grid 0, k, 2k, ... (k = T // esd_steps), started from noise
and stopped at a grid timestep t drawn uniformly (one per batch), and the loss is taken at that same t.
The authors evaluated a nearly clean sample at an unrelated timestep, stepped the optimizer before the
backward pass and never zeroed the gradients; here it is zero_grad -> backward -> clip -> step.

On an EDM (songunet) network the grid is EDM's rho schedule of ``esd_steps`` levels sigma_max > ... >
sigma_min (the sampler's grid without its final 0), the partial sampling starts at sigma_max z and takes
DDIM's (Euler's) step x = D + sigma' eps, and the loss is the same eps-space objective at the sigma it
stopped at (eps = (x - D) / sigma).
"""
from __future__ import annotations

import torch

from ..diffusion import Denoiser
from ..distributed import Dist
from .finetune import FineTune


def esd_target(eps_null: torch.Tensor, eps_forget: torch.Tensor, eta: float) -> torch.Tensor:
    """eps_0(null) - eta (eps_0(c_f) - eps_0(null)): negative guidance away from the forget class."""
    return eps_null - eta * (eps_forget - eps_null)


@torch.no_grad()
def partial_ddim(denoiser: Denoiser, labels: torch.Tensor, x: torch.Tensor, steps: int, stop: int,
                 guidance: float = 0.0) -> tuple[torch.Tensor, int]:
    """DDIM (eta 0) from standard normal noise ``x`` (started at the top grid level as the backbone's
    sampler starts: x_T = x on a DDPM, sigma_max x on EDM) down to grid index ``stop``: (x_t, t)."""
    sched = denoiser.schedule
    seq = sched.ddim_grid(steps)
    if not 0 <= stop < len(seq):
        raise ValueError(f"stop index {stop} outside the DDIM grid of {len(seq)} timesteps")
    x = sched.start_noise(x, seq[-1])
    for i in range(len(seq) - 1, stop, -1):
        x0, eps = denoiser.predict(x, seq[i], labels, guidance)
        x = sched.add_noise(x0, seq[i - 1], eps)  # the deterministic DDIM step (eta 0)
    return x, seq[stop]


class ESD(FineTune):
    def __init__(self, cfg: dict, dist: Dist):
        super().__init__(cfg, dist)
        steps = cfg["baseline"]["esd_steps"]
        lo, hi = self.schedule.grid_steps_range()
        if steps < lo or (hi is not None and steps > hi):
            bound = f"in [{lo}, {hi}]" if hi is not None else f"at least {lo} on an EDM network"
            raise ValueError(f"baseline.esd_steps must be {bound}, got {steps}")

    def losses(self) -> dict:
        b, n, dev = self.cfg["baseline"], self.n, self.dist.device
        c_f = self.random_labels(self.forget, n)
        stop = int(torch.randint(b["esd_steps"], ()).item())
        x_t, t = partial_ddim(self.frozen, c_f, torch.randn(n, *self.shape, device=dev), b["esd_steps"], stop,
                              b["esd_guidance"])
        t = torch.full((n,), t, device=dev)
        with torch.no_grad():
            null = torch.full_like(c_f, self.frozen.null_label)
            e_null, e_forget = self.frozen.eps(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([null, c_f])).chunk(2)
            target = esd_target(e_null, e_forget, b["esd_eta"])
        out = self.denoiser.eps(x_t, t, c_f)
        return {"esd": (out - target).square().flatten(1).sum(1).mean()}

    def train_step(self, step: int) -> dict[str, float]:
        loss = self.losses()["esd"]
        self.update(loss, step)
        return {"loss": self.dist.mean(loss.detach()).item()}
