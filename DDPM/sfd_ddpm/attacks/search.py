"""Noise search and label-embedding search against a class-conditional generator (see the package doc).

Budgets are counted in gradient steps. Every attack records its state at each budget in ``budgets``
(0 = no attack: the model as it samples normally, on the same noise), so one run gives the whole curve.
Success is judged as ``evaluate.py ua`` judges saved images: the images are rounded to 8 bits and the
classifier's argmax is compared with the forget class.
"""
from __future__ import annotations

import contextlib
import inspect
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion import Denoiser
from ..metrics.folders import quantise
from ..samplers import ddim, one_step

ATTACKS = ("noise", "embedding_forget", "embedding_mean")

# The evaluation DDIM itself, without its no_grad wrapper: the attack differentiates through exactly the
# sampler that draws the model's images (with eta = 0 it draws its noise once, the noise we optimise).
_differentiable_ddim = inspect.unwrap(ddim)


@dataclass(frozen=True)
class Sampling:
    """How the attacked model draws an image from noise z: its one-step generator, or DDIM (eta 0)."""
    sampler: str = "one_step"
    steps: int = 10
    guidance: float = 0.0
    clip_x0: bool = False
    t_init: int = 440

    def __post_init__(self):
        if self.sampler not in ("one_step", "ddim"):
            raise ValueError(f"attack sampler must be one_step or ddim, got {self.sampler!r}")
        if self.steps < 1:
            raise ValueError(f"attack DDIM steps must be >= 1, got {self.steps}")

    def settings(self) -> dict:
        out = asdict(self)
        out.pop("t_init" if self.sampler == "ddim" else "steps")
        return out


class _GivenNoise:
    """The sampler's noise source, returning the (optimised) starting noise z."""

    def __init__(self, z: torch.Tensor):
        self.z = z

    def randn(self) -> torch.Tensor:
        return self.z


def render(denoiser: Denoiser, labels: torch.Tensor, z: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Images from noise z, differentiable in z (and in anything the network reads)."""
    if sampling.sampler == "one_step":
        return one_step(denoiser, labels, z, sampling.t_init, sampling.guidance)
    return _differentiable_ddim(denoiser, labels, _GivenNoise(z), sampling.steps, 0.0, sampling.guidance,
                                sampling.clip_x0)


def label_embedding_table(net) -> nn.Embedding:
    """The network's label-embedding table: ``.class_embedding`` or ``.unet.class_embedding`` (our
    ClassConditionalUNet, through diffusers' UNet2DModel)."""
    net = getattr(net, "module", net)  # DDP
    for holder in (net, getattr(net, "unet", None)):
        table = getattr(holder, "class_embedding", None)
        if isinstance(table, nn.Embedding):
            return table
    raise ValueError(f"{type(net).__name__} has no label-embedding table (an nn.Embedding at .class_embedding or "
                     f".unet.class_embedding); the embedding attack needs one")


@contextlib.contextmanager
def embedding_override(net, label: int, vector: torch.Tensor):
    """Within the block, the network reads ``vector`` wherever it would read row ``label`` of its
    label-embedding table (the null row used for guidance is untouched); gradients reach ``vector``."""
    table = label_embedding_table(net)

    def hook(_module, args, out):
        mask = (args[0] == label)[:, None]
        return torch.where(mask, vector.to(out.dtype).expand_as(out), out)

    handle = table.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _frozen(*modules):
    """No parameter gradients while attacking (only the attack variable is optimised)."""
    params = [p for m in modules for p in m.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, flags):
            p.requires_grad_(flag)


def log_p_forget(classifier, x: torch.Tensor, forget: int) -> torch.Tensor:
    """log p(forget | x) per sample, on images clamped to the data range (as they are saved)."""
    return F.log_softmax(classifier(x.clamp(-1, 1)).float(), dim=1)[:, forget]


@torch.no_grad()
def judge(classifier, x: torch.Tensor, forget: int) -> dict:
    """Success rate (argmax = forget class) and mean p(forget) on the 8-bit images."""
    probs = F.softmax(classifier(quantise(x)).float(), dim=1)
    return {"success_rate": float((probs.argmax(1) == forget).float().mean()),
            "mean_p_forget": float(probs[:, forget].mean()), "n_images": len(x)}


def chi_penalty(z: torch.Tensor) -> torch.Tensor:
    """-log density of the norm r = ||z|| under z ~ N(0, I_D), up to a constant: r^2 / 2 - (D - 1) log r.

    Minimal on the shell r = sqrt(D - 1) where Gaussian noise lives, so the noise keeps a typical norm
    instead of drifting to large values (or collapsing to the mode 0, as a plain ||z||^2 penalty would)."""
    d = z[0].numel()
    r = z.flatten(1).norm(dim=1)
    return 0.5 * r.square() - (d - 1) * torch.log(r)


def _device(net) -> torch.device:
    return next(net.parameters()).device


def _check(denoiser: Denoiser, forget: int, budgets) -> list[int]:
    budgets = sorted({int(b) for b in budgets})
    if not budgets or budgets[0] < 0:
        raise ValueError(f"attack budgets must be gradient-step counts >= 0, got {budgets}")
    n_classes = getattr(getattr(denoiser.net, "module", denoiser.net), "n_classes", None)
    if n_classes is not None and not 0 <= forget < n_classes:
        raise ValueError(f"forget class {forget} is out of range [0, {n_classes - 1}]")
    return budgets


def noise_search(denoiser: Denoiser, classifier, forget: int, sampling: Sampling, shape, *, budgets=(0, 50),
                 n: int = 32, lr: float = 0.05, prior_weight: float = 1.0, seed: int = 0, judge_classifier=None) -> list[dict]:
    """Optimise n noises z (Adam) to maximise log p(forget | x(z)) - prior_weight * chi_penalty(z) / D.

    The penalty is per dimension (D = z's size), so one weight means the same at every resolution; at
    weight 1 the noises' RMS stays within a few percent of 1 over a hundred steps (tests/test_attacks.py).

    Returns one row per budget: success rate, mean p(forget), and the noises' RMS (1 for typical noise)."""
    budgets = _check(denoiser, forget, budgets)
    device = _device(denoiser.net)
    scorer = judge_classifier or classifier
    z = torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed)).to(device).requires_grad_(True)
    labels = torch.full((n,), forget, device=device, dtype=torch.long)
    opt = torch.optim.Adam([z], lr=lr)
    rows = []
    with _frozen(denoiser.net, classifier):
        for step in range(budgets[-1] + 1):
            if step == budgets[-1]:  # the last state needs no gradient
                with torch.no_grad():
                    x = render(denoiser, labels, z, sampling)
            else:
                x = render(denoiser, labels, z, sampling)
            if step in budgets:
                rows.append({"budget": step, **judge(scorer, x.detach(), forget),
                             "noise_rms": float(z.detach().flatten(1).square().mean(1).sqrt().mean())})
            if step == budgets[-1]:
                break
            loss = (-log_p_forget(classifier, x, forget) + prior_weight * chi_penalty(z) / z[0].numel()).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return rows


def embedding_search(denoiser: Denoiser, classifier, forget: int, sampling: Sampling, shape, *, init: str = "forget",
                     budgets=(0, 50), n: int = 32, n_eval: int | None = None, lr: float = 0.05, seed: int = 0,
                     judge_classifier=None) -> list[dict]:
    """Optimise one continuous class embedding v, read in place of row ``forget`` of the label-embedding
    table, to maximise the mean log p(forget | x(z; v)) over fresh noise batches of n.

    ``init``: "forget" starts from the forget class's own row, "mean" from the mean of the class rows
    (null row excluded). Each budget is judged on n_eval held-out noises never used for a gradient, so
    a success is a property of the embedding, not of particular noises. Rows also give
    ``embedding_shift`` = ||v - v_0|| / ||v_0||."""
    if init not in ("forget", "mean"):
        raise ValueError(f"embedding init must be 'forget' or 'mean', got {init!r}")
    budgets = _check(denoiser, forget, budgets)
    net = getattr(denoiser.net, "module", denoiser.net)
    if not getattr(net, "conditional", True):
        raise ValueError("the network is unconditional (it ignores labels): the embedding attack does not apply")
    table = label_embedding_table(net)
    n_classes = getattr(net, "n_classes", table.num_embeddings)
    start = (table.weight[forget] if init == "forget" else table.weight[:n_classes].mean(0)).detach().clone()
    v = start.clone().requires_grad_(True)
    device = _device(denoiser.net)
    scorer = judge_classifier or classifier
    train_noise = torch.Generator().manual_seed(seed)
    z_eval = torch.randn((n_eval or n, *shape), generator=torch.Generator().manual_seed(seed + 7919)).to(device)
    opt = torch.optim.Adam([v], lr=lr)
    rows = []
    with _frozen(denoiser.net, classifier), embedding_override(net, forget, v):
        for step in range(budgets[-1] + 1):
            if step in budgets:
                with torch.no_grad():
                    x = render(denoiser, torch.full((len(z_eval),), forget, device=device), z_eval, sampling)
                rows.append({"budget": step, **judge(scorer, x, forget),
                             "embedding_shift": float((v.detach() - start).norm() / start.norm().clamp_min(1e-12))})
            if step == budgets[-1]:
                break
            z = torch.randn((n, *shape), generator=train_noise).to(device)
            x = render(denoiser, torch.full((n,), forget, device=device), z, sampling)
            loss = -log_p_forget(classifier, x, forget).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return rows


def run_attacks(denoiser: Denoiser, classifier, forget: int, sampling: Sampling, shape, *, attacks=ATTACKS,
                budgets=(0, 50), n: int = 32, n_eval: int | None = None, lr: float = 0.05, prior_weight: float = 1.0,
                seed: int = 0, judge_classifier=None) -> dict:
    """Run the chosen attacks; returns {"attacks": {name: rows}, "at_budget": {name: last row},
    "embedding_best": the better of the two embedding starts at the largest budget (or None)}."""
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
    out = {}
    for name in attacks:
        if name == "noise":
            out[name] = noise_search(denoiser, classifier, forget, sampling, shape, budgets=budgets, n=n, lr=lr,
                                     prior_weight=prior_weight, seed=seed, judge_classifier=judge_classifier)
        else:
            out[name] = embedding_search(denoiser, classifier, forget, sampling, shape, init=name.split("_")[1],
                                         budgets=budgets, n=n, n_eval=n_eval, lr=lr, seed=seed,
                                         judge_classifier=judge_classifier)
    last = {name: rows[-1] for name, rows in out.items()}
    emb = [last[a] for a in ("embedding_forget", "embedding_mean") if a in last]
    best = max(emb, key=lambda r: (r["success_rate"], r["mean_p_forget"])) if emb else None
    return {"attacks": out, "at_budget": last, "embedding_best": best}


def default_sampling(kind: str, cfg: dict, steps: int = 10) -> Sampling:
    """What each kind of checkpoint is attacked through: an SFD/SiD generator through its one-step map,
    a DDPM-kind model through the evaluation sampler of the comparison (DDIM, guidance 2, x0 clipped)
    shortened to ``steps``."""
    if kind == "sfd":
        return Sampling("one_step", t_init=int(cfg.get("sfd", {}).get("t_init", 440)))
    return Sampling("ddim", steps=steps, guidance=2.0, clip_x0=True)



def attack_checkpoint(ckpt, classifier, forget: int, *, network: str | None = None, sampler: str = "auto",
                      steps: int = 10, guidance: float | None = None, clip_x0: bool | None = None, device="cpu",
                      **attack_kw) -> dict:
    """Load a weights file (or run folder) as ``sample.py`` does and run :func:`run_attacks` on it.

    ``sampler="auto"`` attacks each model through how it is sampled (:func:`default_sampling`);
    ``guidance`` / ``clip_x0`` of None keep that choice's values. Returns the results with the sampling
    settings and the checkpoint's identity."""
    from ..checkpoints import file_hash
    from ..loading import denoiser_for, load_network, resolve_checkpoint

    path = resolve_checkpoint(ckpt)
    net, cfg, meta = load_network(path, name=network, device=device)
    base = default_sampling(meta["kind"], cfg, steps)
    if sampler not in ("auto", base.sampler):
        base = Sampling(sampler, steps=steps, t_init=base.t_init)
    sampling = Sampling(base.sampler, steps=steps, t_init=base.t_init,
                        guidance=base.guidance if guidance is None else guidance,
                        clip_x0=base.clip_x0 if clip_x0 is None else clip_x0)
    d = cfg["data"]
    shape = (d["channels"], d["image_size"], d["image_size"])
    out = run_attacks(denoiser_for(net, cfg), classifier, forget, sampling, shape, **attack_kw)
    out["checkpoint"] = {"path": str(path), "sha256": file_hash(path), "kind": meta["kind"], "step": meta["step"],
                         "network": network or "default (EMA)"}
    out["sampling"] = sampling.settings()
    return out
