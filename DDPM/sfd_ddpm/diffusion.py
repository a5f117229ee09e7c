"""Discrete VP diffusion (docs/method.md section 2) and the denoiser interface.

Every loss and sampler in this package is written once against :class:`Denoiser`. A denoiser is a
network (a raw module or a DDP wrapper) and a *noise process* that says what a noise level is and
what the network outputs:

- :class:`VPSchedule` (this module): levels are integer timesteps t, x_t = a_t x_0 + b_t eps, and the
  network ``net(x_t, t, label)`` predicts eps;
- :class:`sfd_ddpm.edm.EDMSchedule`: levels are continuous sigma, x = x_0 + sigma eps, and the
  (preconditioned) network ``net(x, sigma, label)`` returns the denoised D(x; sigma, c).

Both processes answer the same questions (add noise, turn an output into x0 or eps, draw the
pretraining levels, the denoising loss), so losses, samplers and methods never ask which one they run on.
"""
from __future__ import annotations

import torch


class VPSchedule:
    """beta_t, abar_t and the derived a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t), sigma_t = b_t / a_t.

    Timesteps are integer indices 0..T-1, as in Ho et al. and the authors' code.
    """
    samplers, default_sampler = ("ddpm", "ddim", "one_step"), "ddim"

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

    def _gather(self, values: torch.Tensor, t: torch.Tensor | int, dtype: torch.dtype) -> torch.Tensor:
        """Table entries at t, cast from the float64 table to ``dtype`` only at the end (the callers below pass
        the dtype of the images they scale, so float64 sampling keeps the table's full precision)."""
        if not torch.is_tensor(t):
            return values[t].to(dtype)
        return values.to(t.device)[t.long()].to(dtype)

    def a(self, t, dtype: torch.dtype = torch.float32):
        return self._gather(self.abar.sqrt(), t, dtype)

    def b(self, t, dtype: torch.dtype = torch.float32):
        return self._gather((1.0 - self.abar).sqrt(), t, dtype)

    def sigma(self, t, dtype: torch.dtype = torch.float32):
        return self._gather(((1.0 - self.abar) / self.abar).sqrt(), t, dtype)

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x_0 + b_t eps, per-sample t."""
        return _bc(self.a(t, x0.dtype), x0) * x0 + _bc(self.b(t, x0.dtype), x0) * eps

    def sample_t(self, n: int, lo: int, hi: int, device, generator=None) -> torch.Tensor:
        """t ~ U{lo..hi-1}, independently per sample (exclusive upper bound, docs/method.md section 2)."""
        return torch.randint(lo, hi, (n,), device=device, generator=generator)

    # ---- the noise-process interface shared with sfd_ddpm.edm.EDMSchedule ----
    def noise_scale(self, t, dtype: torch.dtype = torch.float32):
        """The coefficient of eps in x_t: pure noise at level t is ``noise_scale(t) * z``."""
        return self.b(t, dtype)

    def x0_from(self, x_t, t, eps):
        """The denoised estimate of an eps-prediction: (x_t - b_t eps) / a_t."""
        return (x_t - _bc(self.b(t, x_t.dtype), x_t) * eps) / _bc(self.a(t, x_t.dtype), x_t)

    def eps_from(self, x_t, t, eps):
        return eps

    def eps_given_x0(self, x_t, t, x0):
        """The eps consistent with a (clipped) x0: (x_t - a_t x0) / b_t."""
        return (x_t - _bc(self.a(t, x_t.dtype), x_t) * x0) / _bc(self.b(t, x_t.dtype), x_t)

    def sample_train(self, n: int, device, generator=None) -> torch.Tensor:
        """Pretraining levels: t ~ U{0..T-1}."""
        return self.sample_t(n, 0, self.num_timesteps, device, generator)

    def sample_range(self, n: int, lo: int, hi: int, device) -> torch.Tensor:
        """Distillation levels between positions lo and hi of the T-step grid: t ~ U{lo..hi-1}."""
        return self.sample_t(n, lo, hi, device)

    def fisher_levels(self, count: int | None = None, generator=None) -> tuple[torch.Tensor, float]:
        """The levels of one sample's diagonal Fisher (sfd_ddpm.fisher) and the weight of their summed loss:
        all T timesteps (``count`` None) or ``count`` evenly spaced ones, the sum scaled to all T (an unbiased
        estimate of sum_t). Deterministic: ``generator`` is not drawn from."""
        T = self.num_timesteps
        t = torch.arange(T) if count is None else torch.linspace(0, T - 1, min(count, T)).round().long().unique()
        return t, T / len(t)

    def grid_steps_range(self) -> tuple[int, int | None]:
        """The step counts :meth:`ddim_grid` accepts: 1..T."""
        return 1, self.num_timesteps

    def start_noise(self, z: torch.Tensor, level) -> torch.Tensor:
        """The sampler's starting point at the top grid level: x_T = z ~ N(0, I) (Ho et al.; DDIM)."""
        return z

    def ddim_grid(self, steps: int) -> list[int]:
        """DDIM's uniform sub-sequence 0, k, 2k, ... (k = T // steps), ascending."""
        return list(range(0, self.num_timesteps, self.num_timesteps // steps))

    def generator_level(self, sfd_cfg: dict) -> int:
        """The one-step generator's level: t* = ``sfd.t_init``."""
        return int(sfd_cfg["t_init"])

    def denoising_loss(self, denoiser: "Denoiser", x0, label, t, eps, guidance: float = 0.0,
                       augment_labels=None) -> torch.Tensor:
        """Per-sample pixel-summed eps-prediction loss ||eps - eps(x_t, t, c)||^2 (Ho et al.), with the
        eps guided with scale w (SiD-LSG trains its fake score guided; w = 0: the plain loss)."""
        if augment_labels is not None:
            raise ValueError("augmentation labels need an EDM (songunet) network with model.augment_dim 9; the "
                             "DDPM UNet has no augmentation input (set sfd.augment=0)")
        x_t = self.add_noise(x0, t, eps)
        return (eps - denoiser.eps(x_t, t, label, guidance)).square().flatten(1).sum(1)


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector (or a scalar) in ``like``'s dtype, broadcast over its remaining dimensions."""
    v = torch.as_tensor(v, device=like.device, dtype=like.dtype)
    if v.dim() == 0:
        return v
    return v.view(-1, *([1] * (like.dim() - 1)))


class NoGuidance(ValueError):
    """Classifier-free guidance asked of a network without a null class."""


class Denoiser:
    """eps(x_t, t, c) and the denoised estimate f(x_t, t, c) at a noise level t (an integer timestep
    or a sigma, as the schedule defines it).

    ``null_label`` is the learned "no class" input used for classifier-free guidance:
    guided output = (1 + w) out(x, c) - w out(x, null) (docs/method.md section 4); the combination is linear, so it
    is the same whether the network predicts eps or x0. With w = 0 only the conditional pass runs.
    ``null_label = None``: the network has no null class (e.g. NVIDIA's EDM checkpoints, trained without
    label dropout) and guidance is refused.
    """

    def __init__(self, net, schedule, null_label: int | None):
        self.net = net
        self.schedule = schedule
        self.null_label = null_label

    def output(self, x_t: torch.Tensor, t, label: torch.Tensor, guidance: float = 0.0,
               augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """The (guided) raw network output: eps for a VP network, D for an EDM network. ``augment_labels``
        (training on augmented images, EDM networks only) go to the network with the images."""
        t = _per_sample(t, x_t)
        if guidance == 0:
            return self.net(x_t, t, label, **_augment(augment_labels))
        check_guidance(self.null_label, guidance)
        null = torch.full_like(label, self.null_label)
        both = None if augment_labels is None else torch.cat([augment_labels, augment_labels])
        out_c, out_u = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([label, null]),
                                **_augment(both)).chunk(2)
        return (1 + guidance) * out_c - guidance * out_u

    def eps(self, x_t: torch.Tensor, t, label: torch.Tensor, guidance: float = 0.0) -> torch.Tensor:
        t = _per_sample(t, x_t)
        return self.schedule.eps_from(x_t, t, self.output(x_t, t, label, guidance))

    def __call__(self, x_t, t, label, guidance: float = 0.0, augment_labels=None) -> torch.Tensor:
        t = _per_sample(t, x_t)
        return self.schedule.x0_from(x_t, t, self.output(x_t, t, label, guidance, augment_labels))

    denoise = __call__

    def predict(self, x_t, t, label, guidance: float = 0.0, clip_x0: bool = False):
        """(x0_hat, eps_hat) from one (guided) evaluation; with ``clip_x0`` x0_hat is clamped to
        [-1, 1] and eps_hat made consistent with it."""
        t = _per_sample(t, x_t)
        out = self.output(x_t, t, label, guidance)
        x0, eps = self.schedule.x0_from(x_t, t, out), self.schedule.eps_from(x_t, t, out)
        if clip_x0:
            x0 = x0.clamp(-1, 1)
            eps = self.schedule.eps_given_x0(x_t, t, x0)
        return x0, eps

    def loss(self, x0, label, t, eps, guidance: float = 0.0, augment_labels=None) -> torch.Tensor:
        """The backbone's per-sample denoising score-matching loss (see the schedule's ``denoising_loss``)
        of the output guided with scale ``guidance`` (0: one conditional pass); ``augment_labels``: x0 are
        augmented images and these labels say how (EDM backbone)."""
        return self.schedule.denoising_loss(self, x0, label, _per_sample(t, x0), eps, guidance, augment_labels)


def _augment(augment_labels) -> dict:
    """The augmentation keyword for the network, only when there are labels (VP networks take none)."""
    return {} if augment_labels is None else {"augment_labels": augment_labels}


def check_guidance(null_label, guidance: float) -> None:
    """Refuse guidance for a network without a null class, with what to do instead."""
    if guidance and null_label is None:
        raise NoGuidance("this network has no null class (it was trained without label dropout, as NVIDIA's "
                         "public EDM checkpoints were), so classifier-free guidance is unavailable; use guidance 0")


def _per_sample(t, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(t):  # a float level (EDM's sigma) takes the images' dtype: float64 stays float64
        dtype = x.dtype if isinstance(t, float) else torch.long
        return torch.full((x.shape[0],), t, device=x.device, dtype=dtype)
    if t.dim() == 0:
        return t.expand(x.shape[0]).to(x.device)
    return t


def eps_loss(denoiser: Denoiser, x0: torch.Tensor, label: torch.Tensor, t: torch.Tensor,
             eps: torch.Tensor) -> torch.Tensor:
    """Per-sample denoising loss of the denoiser's backbone at x_t = noised x0 (pixel sums): the
    eps-prediction loss ||eps - eps(x_t, t, c)||^2 of Ho et al. for the VP DDPM, EDM's weighted
    lambda(sigma) ||D(x; sigma, c) - x0||^2 for an EDM network."""
    return denoiser.loss(x0, label, t, eps)


def schedule_of(cfg: dict):
    """The noise process of a resolved config: discrete VP for ``model.arch=unet2d``, EDM's sigma for songunet."""
    if cfg["model"].get("arch", "unet2d") == "songunet":
        from .edm import EDMSchedule
        return EDMSchedule.from_config(cfg)
    d = cfg["diffusion"]
    return VPSchedule(d["beta_start"], d["beta_end"], d["num_timesteps"])
