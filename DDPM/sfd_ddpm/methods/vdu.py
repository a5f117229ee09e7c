"""Variational Diffusion Unlearning (VDU), our documented interpretation (docs/method.md section 6).

VDU (Panda et al.) has no public code. Starting from a pretrained DDPM (weights mu, its EMA weights),
with access only to a small subset D_f of real forget-class images and no retained data, it minimises

    L_VDU(theta) = -lambda_p * min(L_simple(theta; D_f), target)  +  gamma/2 * sum_i Lambda_i (theta_i - mu_i)^2

* **Plasticity inducer** (first term): lowering the ELBO of D_f means *raising* its denoising loss
  L_simple (the batch mean of the pixel-summed eps-loss, t ~ U{0..T-1}). Unbounded, -L_simple diverges
  (the network can make its error arbitrarily large). We bound it with a hinge. ``vdu.hinge=batch``:
  target = ``vdu.target_ratio`` x L0, where L0 is the pretrained model's L_simple on D_f measured once at
  the start (``vdu.target_draws`` fixed noise/timestep draws per image). Once a batch's loss is past the
  target the term is the constant -lambda_p * target and contributes **no gradient**, so only the
  stability term acts and pulls the weights back (:func:`plasticity_term`). ``vdu.hinge=sample`` (default) puts
  the hinge on each sample instead: -lambda_p * mean_i min(l_i, target_ratio * l_i^mu), with l_i^mu the frozen
  pretrained model's loss on the same image, timestep and noise (one extra forward pass). The batch mean
  is typically dominated by small-t samples, whose eps-loss is largest; the per-sample hinge raises the
  loss at every noise level relative to the pretrained model, including the high-noise levels that decide
  the class (on the built-in dataset it forgets stably where the batch hinge oscillates; see
  configs/builtin_vdu.yaml).
* **Stability regulariser** (second term): the negative log of a diagonal Gaussian prior around
  mu with precision Lambda (:func:`stability_term`). Lambda comes from either
  - ``vdu.precision=fisher``: the diagonal Fisher of the eps-loss (:func:`sfd_ddpm.fisher.diagonal_fisher`)
    on ``vdu.fisher_samples`` images **generated** by the pretrained model (DDIM, labels cycling over the
    classes; data-free), at ``vdu.fisher_timesteps`` evenly spaced timesteps (on an EDM network: that many
    draws per image of its training levels ln sigma ~ N(P_mean, P_std^2), images from EDM's sampler); or
  - ``vdu.precision=checkpoints``: Lambda = 1 / (var + eps) with var the unbiased per-parameter variance
    across K >= 2 independently trained checkpoints (``vdu.checkpoints``; the 2025 version of the paper)
    (:func:`checkpoint_precision`).
  **Normalisation** (``vdu.normalise=mean``, default): Lambda is divided by its mean over all parameters,
  so it is scale-free (the raw Fisher scales with T and the pixel count, inverse variances with the
  checkpoints' spread) and gamma is the average per-parameter precision. ``none`` keeps the raw values.

Training is Adam on theta (starting at mu) with ``training.grad_clip`` and an EMA of theta (saved as
``ema``, so the result samples like any pretrained DDPM: ``kind = ddpm``). Works on conditional
models (D_f keeps its real labels) and unconditional ones (``model.conditional=false``: the network
ignores labels). Precision and target are part of the training state, so ``--resume`` is exact
without recomputing them.
"""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoints import CheckpointError, load_into, load_weights
from ..config import with_architecture
from ..data import TensorImages, infinite_loader, load_data, split_by_label, with_flip_resolved
from ..diffusion import Denoiser, eps_loss, schedule_of
from ..distributed import Dist
from ..fisher import diagonal_fisher
from ..networks import build_network
from ..samplers import image_seed, sample
from .common import ema_decay, ema_update, frozen_copy, unwrap, wrap
from .pretrain import Pretrain

PRECISIONS = ("fisher", "checkpoints")
NORMALISATIONS = ("mean", "none")
HINGES = ("batch", "sample")


# ----------------------------------------------------------------------------------------------
# The two terms, as pure functions (tested by hand in tests/test_vdu.py)

def plasticity_term(loss: torch.Tensor, target, lambda_p: float) -> torch.Tensor:
    """-lambda_p * mean(min(loss, target)): raises ``loss`` up to ``target``, then is constant with zero
    gradient, so it can never diverge. ``loss`` is the batch L_simple (a scalar, ``vdu.hinge=batch``) or the
    per-sample losses with per-sample targets (``vdu.hinge=sample``)."""
    return -lambda_p * torch.minimum(loss, torch.as_tensor(target, dtype=loss.dtype, device=loss.device)).mean()


def stability_term(params: dict[str, torch.Tensor], mu: dict[str, torch.Tensor],
                   precision: dict[str, torch.Tensor], gamma: float) -> torch.Tensor:
    """gamma/2 * sum_i Lambda_i (theta_i - mu_i)^2 over every named parameter; gradient gamma Lambda (theta - mu)."""
    total = sum((precision[n] * (p - mu[n]).square()).sum() for n, p in params.items())
    return 0.5 * gamma * total


def checkpoint_precision(states: list[dict[str, torch.Tensor]], eps: float) -> dict[str, torch.Tensor]:
    """Lambda = 1 / (var + eps), var = the unbiased per-parameter variance across K >= 2 state dicts."""
    if len(states) < 2:
        raise ValueError(f"vdu.precision=checkpoints needs at least 2 checkpoints in vdu.checkpoints, got {len(states)}")
    keys = set(states[0])
    for s in states[1:]:
        if set(s) != keys:
            raise ValueError("the checkpoints in vdu.checkpoints have different parameter names (different architectures)")
    out = {}
    for n in states[0]:
        stack = torch.stack([s[n].float() for s in states])
        out[n] = 1.0 / (stack.var(dim=0, unbiased=True) + eps)
    return out


def normalise_precision(precision: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """``mean``: divide by the mean over all parameters (scale-free; gamma = average precision); ``none``."""
    if how == "none":
        return precision
    if how != "mean":
        raise ValueError(f"vdu.normalise must be one of {', '.join(NORMALISATIONS)}, got {how!r}")
    total = sum(p.sum() for p in precision.values())
    count = sum(p.numel() for p in precision.values())
    mean = float(total) / count
    if not mean > 0:
        raise ValueError("the precision is zero everywhere (e.g. identical checkpoints with eps 0); cannot normalise it")
    return {n: p / mean for n, p in precision.items()}


def forget_subset(dataset, forget: list[int], n_classes: int, size: int, seed: int) -> TensorImages:
    """D_f: ``size`` real images of the forget classes, chosen by ``seed``; only these are read."""
    _, forget_set = split_by_label(dataset, forget, n_classes)
    if size < 1:
        raise ValueError(f"vdu.forget_subset must be at least 1, got {size}")
    if size > len(forget_set):
        raise ValueError(f"vdu.forget_subset={size} but the dataset holds only {len(forget_set)} images of "
                         f"classes {forget}")
    pick = torch.randperm(len(forget_set), generator=torch.Generator().manual_seed(seed))[:size].tolist()
    items = [forget_set[i] for i in pick]
    return TensorImages(torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items]))


# ----------------------------------------------------------------------------------------------

class VDU:
    kind = "ddpm"  # the result is a DDPM: sample.py / evaluate.py treat it like a pretrained model

    def __init__(self, cfg: dict, dist: Dist, pretrained: nn.Module | None = None, forget_data=None):
        """``pretrained`` (a network) and ``forget_data`` (a TensorImages D_f) replace loading them from
        ``vdu.init`` and the dataset (tests use them)."""
        self.cfg, self.dist = cfg, dist
        v = cfg["vdu"]
        if v["precision"] not in PRECISIONS:
            raise ValueError(f"vdu.precision must be one of {', '.join(PRECISIONS)}, got {v['precision']!r}")
        if v["hinge"] not in HINGES:
            raise ValueError(f"vdu.hinge must be one of {', '.join(HINGES)}, got {v['hinge']!r}")
        if v["normalise"] not in NORMALISATIONS:
            raise ValueError(f"vdu.normalise must be one of {', '.join(NORMALISATIONS)}, got {v['normalise']!r}")
        if v["precision"] == "checkpoints" and len(v["checkpoints"]) < 2:
            raise ValueError("vdu.precision=checkpoints needs at least 2 files in vdu.checkpoints")
        if v["target_ratio"] <= 0 or v["lambda_p"] < 0 or v["gamma"] < 0:
            raise ValueError("vdu.target_ratio must be > 0 and vdu.lambda_p, vdu.gamma >= 0")
        if not v["forget"]:
            raise ValueError("vdu.forget needs at least one class")
        if pretrained is None:
            pretrained, cfg = self._load_pretrained(cfg)
        cfg = self.cfg = with_flip_resolved(cfg)  # for the teacher's dataset
        n_classes = cfg["data"]["n_classes"]
        bad = [c for c in v["forget"] if not 0 <= int(c) < n_classes]
        if bad:
            raise ValueError(f"vdu.forget class {bad[0]} is out of range [0, {n_classes - 1}]")
        dev = dist.device
        self.schedule = schedule_of(cfg)
        self.mu_net = frozen_copy(pretrained).to(dev)  # mu, and the model that measures L0 and the Fisher
        net = pretrained.to(dev).train()
        self.ema = frozen_copy(net)
        self.net = wrap(net, dist)
        self.denoiser = Denoiser(self.net, self.schedule, unwrap(self.net).null_label)
        tr = cfg["training"]
        self.opt = torch.optim.Adam(self.net.parameters(), lr=v["lr"], betas=tuple(v["betas"]), eps=tr["adam_eps"])
        self.mu = {n: p.detach() for n, p in self.mu_net.named_parameters()}
        if forget_data is None:
            d = cfg["data"]
            dataset = load_data(d)
            forget_data = forget_subset(dataset, [int(c) for c in v["forget"]], n_classes, v["forget_subset"], cfg["seed"])
        self.forget_data = forget_data
        self.local_batch = min(dist.local_batch(tr["batch_size"]), len(forget_data))
        self.precision: dict | None = None
        self.target: float | None = None

    @staticmethod
    def _load_pretrained(cfg: dict) -> tuple[nn.Module, dict]:
        """(the pretrained DDPM's EMA weights, the run's config with its architecture, diffusion and dataset
        settings)."""
        v = cfg["vdu"]
        if not v["init"]:
            raise ValueError("set vdu.init to the pretrained DDPM checkpoint (network-*.safetensors)")
        nets, meta = load_weights(v["init"])
        if meta["kind"] != "ddpm":
            raise CheckpointError(f"vdu.init must be a pretrained DDPM checkpoint; {v['init']} is {meta['kind']!r}")
        cfg = with_architecture(cfg, meta["config"])
        net = build_network(cfg)
        load_into(net, nets["ema"], f"{v['init']} [ema]")
        return net, cfg

    # ------------------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        if self.target is None:
            self.target = self.cfg["vdu"]["target_ratio"] * self.pretrained_loss()
        if self.precision is None:
            self.precision = self.compute_precision()
        self.dist.print0(f"VDU: |D_f| = {len(self.forget_data)}, pretrained L_simple on D_f = "
                         f"{self.target / self.cfg['vdu']['target_ratio']:.4g}, hinge target = {self.target:.4g}")
        self.batches = infinite_loader(self.forget_data, self.local_batch, self.dist.rank, self.dist.world_size,
                                       self.cfg["seed"], step, 0)

    @torch.no_grad()
    def pretrained_loss(self) -> float:
        """L0: the pretrained model's mean L_simple on D_f over fixed draws (the same on every rank)."""
        g = torch.Generator().manual_seed(self.cfg["seed"] + 7)
        den = Denoiser(self.mu_net, self.schedule, self.mu_net.null_label)
        x_all, y_all = self.forget_data.images, torch.tensor(self.forget_data.targets)
        total, count, dev = 0.0, 0, self.dist.device
        for _ in range(self.cfg["vdu"]["target_draws"]):
            for x, y in zip(x_all.split(256), y_all.split(256)):
                t = self.schedule.sample_train(len(x), "cpu", g)
                eps = torch.randn(x.shape, generator=g)
                total += float(eps_loss(den, x.to(dev), y.to(dev), t.to(dev), eps.to(dev)).sum())
                count += len(x)
        return total / count

    def compute_precision(self) -> dict[str, torch.Tensor]:
        v, dev = self.cfg["vdu"], self.dist.device
        if v["precision"] == "checkpoints":
            states = []
            for path in v["checkpoints"]:
                nets, _ = load_weights(path)
                if "ema" not in nets:
                    raise CheckpointError(f"{path} holds no 'ema' network; vdu.checkpoints must be pretrained DDPMs")
                probe = build_network(self.cfg)
                load_into(probe, nets["ema"], f"{path} [ema]")  # architecture check with a clear message
                states.append({n: p.detach() for n, p in probe.named_parameters()})
            raw = checkpoint_precision(states, v["precision_eps"])
        else:
            raw = self._fisher()
        return {n: p.to(dev) for n, p in normalise_precision(raw, v["normalise"]).items()}

    def _fisher(self) -> dict[str, torch.Tensor]:
        """Diagonal Fisher on images generated by the pretrained model (no real data)."""
        v, d, dev = self.cfg["vdu"], self.cfg["data"], self.dist.device
        n, n_classes = v["fisher_samples"], d["n_classes"]
        if n < 1 or v["fisher_timesteps"] < 1:
            raise ValueError("vdu.fisher_samples and vdu.fisher_timesteps must be at least 1")
        labels = torch.arange(n, device=dev) % n_classes
        seeds = [image_seed(self.cfg["seed"] + 99, int(c), i) for i, c in enumerate(labels)]
        den = Denoiser(self.mu_net, self.schedule, self.mu_net.null_label)
        shape = (d["channels"], d["image_size"], d["image_size"])
        sampler = self.schedule.default_sampler  # DDIM on a DDPM, EDM's Heun sampler on an EDM network
        images = torch.cat([sample(den, sampler, labels[k:k + 256], seeds[k:k + 256], shape, steps=v["fisher_steps"])
                            for k in range(0, n, 256)])
        probe = frozen_copy(self.mu_net).requires_grad_(True)  # eval mode: no dropout in the Fisher
        return diagonal_fisher(Denoiser(probe, self.schedule, probe.null_label), images, labels,
                               levels=v["fisher_timesteps"], chunk=50,
                               generator=torch.Generator().manual_seed(self.cfg["seed"] + 11))

    # ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        v, tr, dev = self.cfg["vdu"], self.cfg["training"], self.dist.device
        x0, label = next(self.batches)
        x0, label = x0.to(dev), label.to(dev)
        if self.cfg["data"]["random_flip"]:
            flip = torch.rand(x0.shape[0], device=dev) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        t = self.schedule.sample_train(x0.shape[0], dev)
        eps = torch.randn_like(x0)
        per_sample = eps_loss(self.denoiser, x0, label, t, eps)
        forget_loss = per_sample.mean()
        # Each rank clamps its own batch (the same rule on every rank); DDP averages the gradients.
        if v["hinge"] == "sample":  # per-sample target: target_ratio x the pretrained loss on the same (x, t, eps)
            with torch.no_grad():
                ref = eps_loss(Denoiser(self.mu_net, self.schedule, self.mu_net.null_label), x0, label, t, eps)
            plasticity = plasticity_term(per_sample, v["target_ratio"] * ref, v["lambda_p"])
        else:
            plasticity = plasticity_term(forget_loss, self.target, v["lambda_p"])
        params = dict(unwrap(self.net).named_parameters())
        stability = stability_term(params, self.mu, self.precision, v["gamma"])
        loss = plasticity + stability
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tr["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), tr["grad_clip"])
        self.opt.step()
        ema_update(self.ema, unwrap(self.net), ema_decay(self.cfg, step))
        return {"loss": self.dist.mean(loss.detach()).item(),
                "forget_loss": self.dist.mean(forget_loss.detach()).item(),
                "stability": self.dist.mean(stability.detach()).item()}

    # ------------------------------------------------------------------------------------------
    def weights(self) -> dict:
        return {"ema": self.ema.state_dict(), "net": unwrap(self.net).state_dict()}

    def state_dict(self) -> dict:
        return {"net": unwrap(self.net).state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
                "precision": {n: p.cpu() for n, p in self.precision.items()},
                "target": torch.tensor(self.target, dtype=torch.float64)}

    def load_state_dict(self, sd: dict) -> None:
        unwrap(self.net).load_state_dict(sd["net"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])
        self.precision = {n: p.to(self.dist.device) for n, p in sd["precision"].items()}
        self.target = float(sd["target"])

    sample_grids = Pretrain.sample_grids  # the same EMA grid as pretraining
