"""SalUn (Fan et al. 2024; docs/method.md section 5): saliency-masked random-label unlearning.

1. Mask: accumulate the gradient G of the forget-class eps-loss over real forget images (each batch's
   gradient norm-clipped at ``baseline.grad_clip`` before it is added, as the authors did); the mask keeps
   exactly round(fraction * #weights) weights with the largest |G| (ties broken by index).
2. Unlearning, only the masked weights move (their gradients are multiplied by the mask):
       L = || eps_theta(x_t, t, c_f) - sg[eps_theta(x_t, t, c~)] ||^2 + alpha * l(x_r, c_r)
   with x_t a noised real forget image and c~ a *uniformly random* remaining class per image (the
   authors used the fixed "next" class (c_f + 1) mod 10). Both terms are summed over pixels and averaged
   over the batch; the remain eps-loss keeps the pretraining label dropout.
"""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from ..checkpoints import CheckpointError
from ..data import infinite_loader, load_data, split_by_label
from ..diffusion import Denoiser, eps_loss
from ..distributed import Dist
from .common import unwrap
from .finetune import FineTune


def saliency_mask(grads: dict, fraction: float) -> dict:
    """{name: 0/1 float mask} keeping exactly round(fraction * total) entries with the largest |grad|."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the saliency fraction must be in (0, 1], got {fraction}")
    names = list(grads)
    flat = torch.cat([grads[n].detach().abs().flatten().float() for n in names])
    keep = round(fraction * flat.numel())
    chosen = torch.zeros_like(flat)
    chosen[torch.topk(flat, keep, sorted=False).indices] = 1.0
    out, k = {}, 0
    for n in names:
        size = grads[n].numel()
        out[n] = chosen[k:k + size].view_as(grads[n]).to(grads[n].dtype)
        k += size
    return out


def forget_gradients(net: torch.nn.Module, denoiser: Denoiser, batches, clip: float,
                     generator: torch.Generator) -> dict:
    """Sum over batches of the (norm-clipped) gradient of the mean forget-class eps-loss, net in eval mode."""
    was_training = net.training
    net.eval()
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    device = next(net.parameters()).device
    for x0, label in batches:
        x0, label = x0.to(device), label.to(device)
        t = denoiser.schedule.sample_train(x0.shape[0], "cpu", generator).to(device)
        eps = torch.randn(x0.shape, generator=generator).to(device)
        net.zero_grad(set_to_none=True)
        eps_loss(denoiser, x0, label, t, eps).mean().backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
        for n, p in params.items():
            if p.grad is not None:
                total[n] += p.grad
    net.zero_grad(set_to_none=True)
    net.train(was_training)
    return total


class SalUn(FineTune):
    def __init__(self, cfg: dict, dist: Dist):
        super().__init__(cfg, dist)
        cfg = self.cfg   # with the teacher's data shape (image size, classes), not the YAML's defaults
        d = cfg["data"]
        full = load_data(d)
        self.remain_data, self.forget_data = split_by_label(full, cfg["baseline"]["forget"], d["n_classes"])
        if len(self.forget_data) == 0:
            raise ValueError(f"no training images of the forget classes {cfg['baseline']['forget']}")
        self.mask = None
        if cfg["baseline"]["salun_mask"]:
            self.mask = self._load_mask(cfg["baseline"]["salun_mask"])

    def _load_mask(self, path) -> dict:
        try:
            mask = load_file(str(path))
        except FileNotFoundError:
            raise FileNotFoundError(f"SalUn mask {path} not found") from None
        for name, p in unwrap(self.net).named_parameters():
            if name not in mask or mask[name].shape != p.shape:
                raise CheckpointError(f"SalUn mask {path} does not match the network (parameter {name!r})")
        return {n: m.to(self.dist.device) for n, m in mask.items()}

    def compute_mask(self) -> dict:
        b = self.cfg["baseline"]
        gen = torch.Generator().manual_seed(self.cfg["seed"])  # the same mask on every rank
        order = torch.randperm(len(self.forget_data), generator=gen).tolist()
        bs = self.cfg["training"]["batch_size"]
        chunks = [order[k:k + bs] for k in range(0, len(order), bs)]
        if b["salun_mask_batches"] > 0:
            chunks = chunks[:b["salun_mask_batches"]]

        def batches():
            for idx in chunks:
                items = [self.forget_data[i] for i in idx]
                yield torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])

        net = unwrap(self.net)
        grads = forget_gradients(net, Denoiser(net, self.schedule, net.null_label), batches(), b["grad_clip"], gen)
        return saliency_mask(grads, b["salun_fraction"])

    def start(self, step: int) -> None:
        if self.mask is None:
            self.dist.print0("SalUn: computing the saliency mask on the real forget images")
            self.mask = self.compute_mask()
        seed, r, w, nw = self.cfg["seed"], self.dist.rank, self.dist.world_size, self.cfg["data"]["num_workers"]
        self.remain_batches = infinite_loader(self.remain_data, self.n, r, w, seed, step, nw)
        self.forget_batches = infinite_loader(self.forget_data, self.n, r, w, seed + 1, step, nw)

    def losses(self) -> dict:
        dev = self.dist.device
        x_f, c_f = (v.to(dev) for v in next(self.forget_batches))
        t = self.schedule.sample_train(len(c_f), dev)
        x_t = self.schedule.add_noise(x_f, t, torch.randn_like(x_f))
        out = self.denoiser.eps(x_t, t, c_f)
        with torch.no_grad():
            net = unwrap(self.net)
            pseudo = Denoiser(net, self.schedule, net.null_label).eps(x_t, t, self.random_labels(self.remain, len(c_f)))
        forget = (out - pseudo).square().flatten(1).sum(1).mean()
        x_r, c_r = (v.to(dev) for v in next(self.remain_batches))
        drop = torch.rand(len(c_r), device=dev) < self.cfg["training"]["label_dropout"]
        c_r = torch.where(drop, torch.full_like(c_r, self.denoiser.null_label), c_r)
        remain = eps_loss(self.denoiser, x_r, c_r, self.schedule.sample_train(len(c_r), dev),
                          torch.randn_like(x_r)).mean()
        return {"forget": forget, "remain": remain}

    def train_step(self, step: int) -> dict[str, float]:
        terms = self.losses()
        loss = terms["forget"] + self.cfg["baseline"]["salun_alpha"] * terms["remain"]
        self.update(loss, step, mask=self.mask)
        return {"loss": self.dist.mean(loss.detach()).item(),
                **{k: self.dist.mean(v.detach()).item() for k, v in terms.items()}}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "mask": self.mask}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        self.mask = {n: m.to(self.dist.device) for n, m in sd["mask"].items()}
