"""What SA, SalUn and ESD share: fine-tune a pretrained DDPM (``baseline.init``) with Adam, gradient-norm
clipping and an EMA, keeping a frozen copy theta* of the starting weights.

The result is saved like a pretraining run (kind ``ddpm``, networks ``ema`` and ``net``), so sample.py,
evaluate.py and every sampler work on it unchanged.
"""
from __future__ import annotations

import torch

from ..checkpoints import CheckpointError, load_into, load_weights
from ..config import with_architecture
from ..diffusion import Denoiser, schedule_of
from ..distributed import Dist
from ..networks import build_network
from .common import ema_decay, ema_update, frozen_copy, unwrap, wrap
from .pretrain import Pretrain


def load_pretrained(cfg: dict, network: str = "ema"):
    """(the network ``network`` of ``baseline.init``, the run's config with its architecture and data keys)."""
    path = cfg["baseline"]["init"]
    if not path:
        raise ValueError(f"method {cfg['method']} needs baseline.init, the pretrained DDPM checkpoint")
    if network not in ("ema", "net"):
        raise ValueError(f"baseline.init_network must be ema or net, got {network!r}")
    nets, meta = load_weights(path)
    if meta["kind"] != "ddpm":
        raise CheckpointError(f"baseline.init must be a pretrained DDPM checkpoint; {path} is {meta['kind']!r}")
    cfg = with_architecture(cfg, meta["config"])
    net = build_network(cfg)
    load_into(net, nets[network], f"{path} [{network}]")
    return net, cfg


class FineTune(Pretrain):
    """Base class: ``self.net`` (trainable, DDP-wrapped), ``self.original`` (frozen theta*), ``self.ema``.

    Inherits weights / state_dict / sample_grids from :class:`Pretrain`; subclasses write ``loss`` and
    call :meth:`update`.
    """

    def __init__(self, cfg: dict, dist: Dist):
        b = cfg["baseline"]
        if not b["forget"]:
            raise ValueError(f"method {cfg['method']} needs at least one class in baseline.forget")
        net, cfg = load_pretrained(cfg, b["init_network"])
        net = net.to(dist.device)
        self.cfg, self.dist = cfg, dist
        bad = [c for c in b["forget"] if not 0 <= c < cfg["data"]["n_classes"]]
        if bad:
            raise ValueError(f"baseline.forget class {bad[0]} is out of range [0, {cfg['data']['n_classes'] - 1}]")
        self.forget = torch.tensor(b["forget"], device=dist.device)
        self.remain = torch.tensor([c for c in range(cfg["data"]["n_classes"]) if c not in b["forget"]],
                                   device=dist.device)
        self.schedule = schedule_of(cfg)
        self.original = frozen_copy(net)          # theta*, eps_0
        self.ema = frozen_copy(net)
        self.net = wrap(net.train(), dist)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=b["lr"], betas=tuple(b["betas"]),
                                    eps=cfg["training"]["adam_eps"])
        null = net.null_label
        self.denoiser = Denoiser(self.net, self.schedule, null)
        self.frozen = Denoiser(self.original, self.schedule, null)
        self.n = dist.local_batch(cfg["training"]["batch_size"])
        self.shape = (cfg["data"]["channels"], cfg["data"]["image_size"], cfg["data"]["image_size"])

    def start(self, step: int) -> None:
        pass

    def random_labels(self, pool: torch.Tensor, n: int) -> torch.Tensor:
        return pool[torch.randint(len(pool), (n,), device=pool.device)]

    def update(self, loss: torch.Tensor, step: int, mask: dict | None = None) -> None:
        """zero_grad -> backward -> (mask) -> norm clip -> Adam step -> EMA, in that order."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if mask is not None:
            for name, p in unwrap(self.net).named_parameters():
                if p.grad is not None:
                    p.grad.mul_(mask[name])
        clip = self.cfg["baseline"]["grad_clip"]
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), clip)
        self.opt.step()
        ema_update(self.ema, unwrap(self.net), ema_decay(self.cfg, step))
