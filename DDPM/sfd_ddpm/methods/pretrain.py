"""Class-conditional DDPM pretraining (docs/method.md section 4).

eps-loss at t ~ U{0..T-1} with 10% of labels replaced by the learned null class (for classifier-free
guidance), Adam with gradient-norm clipping, EMA of the weights.
"""
from __future__ import annotations

import torch

from ..data import infinite_loader, load_data, split_by_label, with_flip_resolved
from ..diffusion import Denoiser, eps_loss, schedule_of
from ..distributed import Dist
from ..networks import build_network
from ..samplers import image_seed, sample
from .common import ema_decay, ema_update, frozen_copy, grid_labels, unwrap, wrap


class Pretrain:
    kind = "ddpm"

    def __init__(self, cfg: dict, dist: Dist, exclude_classes: tuple[int, ...] = ()):
        cfg = with_flip_resolved(cfg)
        self.cfg, self.dist = cfg, dist
        tr = cfg["training"]
        self.schedule = schedule_of(cfg)
        net = build_network(cfg).to(dist.device).train()
        self.ema = frozen_copy(net)
        self.net = wrap(net, dist)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=tr["lr"], betas=tuple(tr["betas"]), eps=tr["adam_eps"])
        self.denoiser = Denoiser(self.net, self.schedule, unwrap(self.net).null_label)
        if tr["label_dropout"] > 0 and self.denoiser.null_label is None:
            raise ValueError("training.label_dropout > 0 needs a network with a null class: set model.null_class=true "
                             "(or training.label_dropout=0)")
        d = cfg["data"]
        dataset = load_data(d)
        if exclude_classes:  # retraining without the forget classes
            dataset, _ = split_by_label(dataset, list(exclude_classes), d["n_classes"])
        self.dataset = dataset
        self.local_batch = dist.local_batch(tr["batch_size"])

    def start(self, step: int) -> None:
        self.batches = infinite_loader(self.dataset, self.local_batch, self.dist.rank, self.dist.world_size,
                                       self.cfg["seed"], step, self.cfg["data"]["num_workers"])

    def train_step(self, step: int) -> dict[str, float]:
        tr, dev = self.cfg["training"], self.dist.device
        x0, label = next(self.batches)
        x0, label = x0.to(dev), label.to(dev)
        if self.cfg["data"]["random_flip"]:
            flip = torch.rand(x0.shape[0], device=dev) < 0.5
            x0 = torch.where(flip[:, None, None, None], x0.flip(-1), x0)
        drop = torch.rand(x0.shape[0], device=dev) < tr["label_dropout"]
        if self.denoiser.null_label is not None:  # else label_dropout is 0 (checked at the start)
            label = torch.where(drop, torch.full_like(label, self.denoiser.null_label), label)
        t = self.schedule.sample_train(x0.shape[0], dev)
        loss = eps_loss(self.denoiser, x0, label, t, torch.randn_like(x0)).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tr["lr_warmup"] > 0:
            for g in self.opt.param_groups:
                g["lr"] = tr["lr"] * min(1.0, (step + 1) / tr["lr_warmup"])
        if tr["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), tr["grad_clip"])
        self.opt.step()
        ema_update(self.ema, unwrap(self.net), ema_decay(self.cfg, step))
        return {"loss": self.dist.mean(loss.detach()).item()}

    def weights(self) -> dict:
        return {"ema": self.ema.state_dict(), "net": unwrap(self.net).state_dict()}

    def state_dict(self) -> dict:
        return {"net": unwrap(self.net).state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        unwrap(self.net).load_state_dict(sd["net"])
        self.ema.load_state_dict(sd["ema"])
        self.opt.load_state_dict(sd["opt"])

    def sample_grids(self) -> dict:
        g, d = self.cfg["grid"], self.cfg["data"]
        labels, idx = grid_labels(d["n_classes"], g["per_class"], self.dist.device)
        seeds = [image_seed(self.cfg["seed"], int(c), i) for c, i in zip(labels, idx)]
        x = sample(Denoiser(self.ema, self.schedule, self.ema.null_label), g["sampler"], labels, seeds,
                   (d["channels"], d["image_size"], d["image_size"]), steps=g["steps"], eta=g["eta"],
                   guidance=g["guidance"], clip_x0=g["clip_x0"])
        return {"grid": (x, g["per_class"])}
