"""The class-conditional eps-prediction UNet (docs/method.md section 4).

We use diffusers' ``UNet2DModel`` rather than a hand-written copy of Ho et al.'s network: with
block widths ch * ch_mult, ``layers_per_block`` residual blocks, single-head attention at the
chosen resolutions and in the middle, GroupNorm eps 1e-6 and the raw-integer sinusoidal time
embedding, it is the DDPM architecture (CIFAR-10: ~36M parameters). Class conditioning is an
embedding table with one extra row, the learned null class used for classifier-free guidance.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .diffusion import VPSchedule


class ClassConditionalUNet(nn.Module):
    """eps(x_t, t, label); ``label == n_classes`` selects the learned null class."""

    def __init__(self, image_size: int, channels: int, n_classes: int, base_channels: int,
                 channel_mult: list[int], layers_per_block: int, attn_resolutions: list[int],
                 dropout: float, output: str = "eps", schedule=None, conditional: bool = True):
        super().__init__()
        # Unconditional DDPM (VDU's setting): the same network with every label replaced by the null
        # class, i.e. trained as with label dropout 1.0. Samplers and losses keep passing labels.
        self.conditional = conditional
        if output not in ("eps", "v"):
            raise ValueError(f"model.output must be eps or v, got {output!r}")
        self.output = output
        if output == "v":  # eps = b_t x_t + a_t v: needs the schedule's a_t, b_t
            self.register_buffer("a", schedule.abar.sqrt().float(), persistent=False)
            self.register_buffer("b", (1 - schedule.abar).sqrt().float(), persistent=False)
        from diffusers import UNet2DModel  # imported here so `--help` stays fast

        self.n_classes = n_classes
        down, res = [], image_size
        for _ in channel_mult:
            down.append("AttnDownBlock2D" if res in attn_resolutions else "DownBlock2D")
            res //= 2
        up = [name.replace("Down", "Up") for name in reversed(down)]
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=channels, out_channels=channels,
            block_out_channels=tuple(base_channels * m for m in channel_mult),
            layers_per_block=layers_per_block, down_block_types=tuple(down), up_block_types=tuple(up),
            attention_head_dim=None,  # one head per attention layer, as in Ho et al.
            norm_num_groups=math.gcd(32, base_channels), norm_eps=1e-6, dropout=dropout,
            flip_sin_to_cos=False, freq_shift=1,  # sinusoidal embedding of the raw integer t
            num_class_embeds=n_classes + 1,
        )

    @property
    def null_label(self) -> int:
        return self.n_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if label.min() < 0 or label.max() > self.n_classes:
            raise ValueError(f"labels must lie in [0, {self.n_classes}] ({self.n_classes} = null class), "
                             f"got range [{int(label.min())}, {int(label.max())}]")
        if not self.conditional:
            label = torch.full_like(label, self.n_classes)
        out = self.unet(x, t, class_labels=label).sample
        if self.output == "v":
            # The UNet predicts v = a_t eps - b_t x0; eps = b_t x_t + a_t v. Near t = T this makes eps
            # ~ x_t exact by construction, where a plain eps-UNet must learn the identity precisely
            # (its error is amplified by 1/a_t in the denoised estimate). Used for the small built-in model.
            a, b = self.a[t].view(-1, 1, 1, 1), self.b[t].view(-1, 1, 1, 1)
            out = b * x + a * out
        return out


def build_network(cfg: dict) -> nn.Module:
    """Build the network described by a resolved config (``cfg['model']`` and ``cfg['data']``):
    ``model.arch`` unet2d (this module) or songunet (:mod:`sfd_ddpm.networks_edm`)."""
    m, d = cfg["model"], cfg["data"]
    arch = m.get("arch", "unet2d")  # configs saved before the key existed are unet2d
    if arch == "songunet":
        from .networks_edm import build_songunet
        return build_songunet(cfg)
    if arch != "unet2d":
        raise ValueError(f"model.arch must be unet2d or songunet, got {arch!r}")
    return ClassConditionalUNet(
        image_size=d["image_size"], channels=d["channels"], n_classes=d["n_classes"],
        base_channels=m["base_channels"], channel_mult=list(m["channel_mult"]),
        layers_per_block=m["layers_per_block"], attn_resolutions=list(m["attn_resolutions"]),
        dropout=m["dropout"], output=m["output"], schedule=VPSchedule(**cfg["diffusion"]) if m["output"] == "v" else None,
        conditional=m.get("conditional", True),  # configs saved before the key existed are conditional
    )


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
