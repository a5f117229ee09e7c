"""EDM's DDPM++ network (SongUNet) with EDM preconditioning: the second backbone (docs/method.md section 4).

Written here from the EDM paper (Karras et al. 2022, appendix F.2 / Table 7) and the public description
of NVIDIA's networks; the parameter names and shapes are those of NVIDIA's released CIFAR-10 networks
(``VPPrecond`` / ``EDMPrecond`` holding ``model = SongUNet``), so a converted checkpoint
(``convert_edm.py``) loads with a strict ``load_state_dict``.

DDPM++ as used for CIFAR-10 32x32: model_channels 128, channel_mult [2, 2, 2], 4 residual blocks per
resolution, self-attention at 16x16, dropout 0.13, positional noise embedding, 2x2 box resampling
([1, 1] filter), skip connections scaled by sqrt(1/2), and a 9-dimensional augmentation-label input
(zeros when sampling). About 56M parameters.

:class:`EDMNetwork` is what the :class:`~sfd_ddpm.diffusion.Denoiser` sees: ``net(x, sigma, label) -> D``,
the preconditioned denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c). Labels are class
indices; ``n_classes`` is the null class, fed to the network as the all-zero label vector (what EDM's
label dropout feeds it), usable for guidance only when the network was trained with label dropout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PRECONDITIONINGS = ("vp", "edm")
# VP preconditioning constants of NVIDIA's VPPrecond (Song et al.'s VP SDE): beta_d, beta_min, M.
VP_BETA_D, VP_BETA_MIN, VP_M = 19.9, 0.1, 1000


def _xavier(shape, fan_in: int, fan_out: int, gain: float = 1.0) -> torch.Tensor:
    return gain * math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)


class Linear(nn.Module):
    def __init__(self, n_in: int, n_out: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(_xavier((n_out, n_in), n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """A k x k convolution (k = 0: none), optionally preceded by 2x up- or downsampling with the
    separable filter ``resample`` ([1, 1]: nearest-neighbour up / 2x2 average down)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, up: bool = False, down: bool = False,
                 resample=(1, 1), gain: float = 1.0):
        super().__init__()
        self.c_in, self.c_out, self.up, self.down = c_in, c_out, up, down
        fan_in, fan_out = c_in * kernel * kernel, c_out * kernel * kernel
        self.weight = nn.Parameter(_xavier((c_out, c_in, kernel, kernel), fan_in, fan_out, gain)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(c_out)) if kernel else None
        if up or down:
            f = torch.as_tensor(resample, dtype=torch.float32)
            self.register_buffer("resample_filter", (f.outer(f) / f.sum().square())[None, None])
        else:
            self.resample_filter = None

    def forward(self, x):
        f = self.resample_filter
        if f is not None:
            pad = (f.shape[-1] - 1) // 2
            taps = f.to(x.dtype).tile(x.shape[1], 1, 1, 1)
            if self.up:
                x = F.conv_transpose2d(x, taps * 4, groups=x.shape[1], stride=2, padding=pad)
            else:
                x = F.conv2d(x, taps, groups=x.shape[1], stride=2, padding=pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


def group_norm(channels: int, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm with min(32, C / 4) groups, as in DDPM++."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=eps)


class UNetBlock(nn.Module):
    """DDPM++ residual block: GN-SiLU-conv, + embedding bias, GN-SiLU-dropout-conv, skip, x sqrt(1/2);
    optionally single-head self-attention after it (again with a sqrt(1/2)-scaled residual)."""

    def __init__(self, c_in: int, c_out: int, emb: int, up=False, down=False, attention=False,
                 dropout: float = 0.0, resample=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout = c_in, c_out, dropout
        self.norm0 = group_norm(c_in)
        self.conv0 = Conv2d(c_in, c_out, 3, up=up, down=down, resample=resample)
        self.affine = Linear(emb, c_out)
        self.norm1 = group_norm(c_out)
        self.conv1 = Conv2d(c_out, c_out, 3, gain=1e-5)  # near-zero init: each block starts as identity
        self.skip = Conv2d(c_in, c_out, 1, up=up, down=down, resample=resample) if (c_in != c_out or up or down) else None
        self.attention = attention
        if attention:
            self.norm2 = group_norm(c_out)
            self.qkv = Conv2d(c_out, 3 * c_out, 1, gain=math.sqrt(0.2))
            self.proj = Conv2d(c_out, c_out, 1, gain=1e-5)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        h = F.silu(self.norm1(h + self.affine(emb)[:, :, None, None]))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * math.sqrt(0.5)
        if self.attention:
            n, c, height, width = x.shape
            # qkv channels are interleaved per channel: (c, [q, k, v]) as in the released weights
            q, k, v = self.qkv(self.norm2(x)).reshape(n, c, 3, height * width).unbind(2)
            w = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c)).softmax(dim=2).to(q.dtype)
            a = torch.einsum("nqk,nck->ncq", w, v).reshape(n, c, height, width)
            x = (self.proj(a) + x) * math.sqrt(0.5)
        return x


class SongUNet(nn.Module):
    """DDPM++ (Song et al. 2021 as re-implemented for EDM): F(x; c_noise, class vector, augment vector)."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 augment_dim: int = 0, model_channels: int = 128, channel_mult=(2, 2, 2), channel_mult_emb: int = 4,
                 num_blocks: int = 4, attn_resolutions=(16,), dropout: float = 0.13, resample=(1, 1)):
        super().__init__()
        emb, noise_ch = model_channels * channel_mult_emb, model_channels
        self.noise_channels, self.label_dim, self.augment_dim = noise_ch, label_dim, augment_dim
        self.map_label = Linear(label_dim, noise_ch) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_ch, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_ch, emb)
        self.map_layer1 = Linear(emb, emb)
        block = dict(emb=emb, dropout=dropout, resample=resample)

        self.enc = nn.ModuleDict()
        c = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(c, model_channels, 3)
                c = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c, c, down=True, **block)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = UNetBlock(c, model_channels * mult, attention=res in attn_resolutions, **block)
                c = model_channels * mult
        skips = [m.c_out if isinstance(m, Conv2d) else m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c, c, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c, c, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c, c, up=True, **block)
            for i in range(num_blocks + 1):
                attn = i == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{i}"] = UNetBlock(c + skips.pop(), model_channels * mult, attention=attn, **block)
                c = model_channels * mult
        res = img_resolution
        self.dec[f"{res}x{res}_aux_norm"] = group_norm(c)
        self.dec[f"{res}x{res}_aux_conv"] = Conv2d(c, out_channels, 3, gain=1e-5)

    def embed_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        """Transformer-style sinusoidal embedding [sin, cos] of c_noise, frequencies (1/10000)^(i/(C/2-1))."""
        half = self.noise_channels // 2
        freqs = (1 / 10000) ** (torch.arange(half, dtype=torch.float32, device=c_noise.device) / (half - 1))
        angles = c_noise.float().outer(freqs)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    def forward(self, x, c_noise, class_vector=None, augment_vector=None):
        emb = self.embed_noise(c_noise)
        if self.map_label is not None:
            emb = emb + self.map_label(class_vector * math.sqrt(self.label_dim))
        if self.map_augment is not None:
            # No augmentation labels (sampling, and training without EDM's augmentation pipe) means the
            # all-zero vector, which adds exactly zero; feeding it through the layer keeps map_augment in
            # the graph (with a zero gradient), as DistributedDataParallel requires of every parameter.
            if augment_vector is None:
                augment_vector = emb.new_zeros(emb.shape[0], self.augment_dim)
            emb = emb + self.map_augment(augment_vector)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        out = None
        for name, module in self.dec.items():
            if name.endswith("aux_norm"):
                out = F.silu(module(x))
            elif name.endswith("aux_conv"):
                out = module(out)
            else:
                if "_block" in name:  # decoder blocks take the matching encoder activation
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


class EDMNetwork(nn.Module):
    """D(x; sigma, c) = c_skip x + c_out F(c_in x; c_noise, c) (Karras et al., Table 1), with
    ``precond`` vp (VPPrecond: c_skip 1, c_out -sigma, c_in 1/sqrt(1 + sigma^2), c_noise (M-1) t(sigma))
    or edm (c_skip sd^2/(sigma^2+sd^2), c_out sigma sd/sqrt(sigma^2+sd^2), c_in 1/sqrt(sigma^2+sd^2),
    c_noise ln(sigma)/4). State-dict keys: ``model.*``, as NVIDIA's preconditioning wrappers."""

    def __init__(self, model: SongUNet, n_classes: int, precond: str = "vp", sigma_data: float = 0.5,
                 conditional: bool = True, null_class: bool = False):
        super().__init__()
        if precond not in PRECONDITIONINGS:
            raise ValueError(f"edm.precond must be one of {', '.join(PRECONDITIONINGS)}, got {precond!r}")
        self.model, self.n_classes, self.precond, self.sigma_data = model, n_classes, precond, sigma_data
        self.conditional, self.has_null = conditional, null_class

    @property
    def null_label(self) -> int | None:
        return self.n_classes if self.has_null else None

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for a vector of sigmas."""
        if self.precond == "vp":
            t = ((VP_BETA_MIN ** 2 + 2 * VP_BETA_D * (1 + sigma ** 2).log()).sqrt() - VP_BETA_MIN) / VP_BETA_D
            return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), (VP_M - 1) * t
        sd2 = self.sigma_data ** 2
        return (sd2 / (sigma ** 2 + sd2), sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt(),
                1 / (sigma ** 2 + sd2).sqrt(), sigma.log() / 4)

    def class_vector(self, label: torch.Tensor) -> torch.Tensor | None:
        if self.model.label_dim == 0:
            return None
        if label.min() < 0 or label.max() > self.n_classes:
            raise ValueError(f"labels must lie in [0, {self.n_classes}] ({self.n_classes} = null class), "
                             f"got range [{int(label.min())}, {int(label.max())}]")
        return F.one_hot(label.long(), self.n_classes + 1)[:, :self.n_classes].float()  # null -> all zeros

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, label: torch.Tensor,
                augment_labels: torch.Tensor | None = None) -> torch.Tensor:
        """``augment_labels`` (N, augment_dim): what sfd_ddpm.augment did to the images (training on augmented
        images only); None, as in sampling, feeds zeros, which contribute nothing."""
        x, sigma = x.float(), sigma.float().reshape(-1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        if augment_labels is not None and augment_labels.shape[1:] != (self.model.augment_dim,):
            raise ValueError(f"augmentation labels of shape {tuple(augment_labels.shape)} given to a network with "
                             f"augment_dim {self.model.augment_dim} (model.augment_dim must be 9 to train on "
                             "augmented images)")
        F_x = self.model(c_in.view(-1, 1, 1, 1) * x, c_noise, self.class_vector(label), augment_labels)
        return c_skip.view(-1, 1, 1, 1) * x + c_out.view(-1, 1, 1, 1) * F_x


def build_songunet(cfg: dict) -> EDMNetwork:
    """The EDM network of a resolved config (``model.arch=songunet``)."""
    m, d, e = cfg["model"], cfg["data"], cfg["edm"]
    conditional = m.get("conditional", True)
    unet = SongUNet(img_resolution=d["image_size"], in_channels=d["channels"], out_channels=d["channels"],
                    label_dim=d["n_classes"] if conditional else 0, augment_dim=m.get("augment_dim", 0),
                    model_channels=m["base_channels"], channel_mult=list(m["channel_mult"]),
                    num_blocks=m["layers_per_block"], attn_resolutions=list(m["attn_resolutions"]), dropout=m["dropout"])
    return EDMNetwork(unet, d["n_classes"], e["precond"], e["sigma_data"], conditional,
                      null_class=m.get("null_class", True) and conditional)
