"""Geometric augmentation with augmentation labels, as EDM and SiD train on CIFAR-10 (``--augment 0.12``).

Each image is x-flipped with probability 1/2, and with probability ``p`` each it is y-flipped, scaled
(log2 s ~ N(0, 0.2^2)), rotated (angle ~ U(-pi, pi)), anisotropically scaled (log2 ~ N(0, 0.2^2), about an
axis at a random angle half of the time) and translated (N(0, 0.125^2) of the image size per axis). The
network sees what was done through a 9-vector, in EDM's order, so that it can learn the augmented
distribution without leaking it into samples drawn with all-zero labels:

    [xflip, yflip, log2-scale draw, cos(angle) - 1, sin(angle), aniso * cos(r), aniso * sin(r), tx, ty]

Written here rather than taken from a library because no maintained package emits EDM's label vector
(torchvision's and kornia's random affine transforms do not report their draws in this form), and the
labels must match what NVIDIA's networks learned through ``map_augment``. One deviation from EDM: the warp
resamples bilinearly with reflection padding (``grid_sample``), where EDM upsamples 2x with a sym6 wavelet
filter, resamples and downsamples; the transform distribution and the labels are EDM's.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LABEL_DIM = 9
SCALE_STD, ANISO_STD, TRANSLATE_STD, ANISO_ROTATE_PROB = 0.2, 0.2, 0.125, 0.5


def _gate(draw: torch.Tensor, prob: float) -> torch.Tensor:
    """``draw`` where a uniform draw falls below ``prob``, else 0 (the transform is skipped)."""
    keep = torch.rand(draw.shape[-1], device=draw.device) < prob
    return torch.where(keep, draw, torch.zeros_like(draw))


def _rotation(angle: torch.Tensor) -> torch.Tensor:
    c, s = angle.cos(), angle.sin()
    z, o = torch.zeros_like(c), torch.ones_like(c)
    return torch.stack([c, -s, z, s, c, z, z, z, o], 1).view(-1, 3, 3)


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([sx, z, z, z, sy, z, z, z, o], 1).view(-1, 3, 3)


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([o, z, tx, z, o, ty, z, z, o], 1).view(-1, 3, 3)


class GeometricAugment:
    """``augment(images) -> (augmented images, labels (N, 9))``; ``p = 0`` leaves every image as it is
    except the x-flip, which EDM's CIFAR-10 setting applies to half of the images regardless of ``p``."""

    def __init__(self, p: float, yflip: float = 1, scale: float = 1, rotate: float = 1, aniso: float = 1,
                 translate: float = 1):
        """``p``: EDM's overall probability; the others multiply it per transform (EDM's defaults, 1, are
        SiD's CIFAR-10 setting; 0 turns a transform off)."""
        if not 0 <= p <= 1:
            raise ValueError(f"the augmentation probability must lie in [0, 1], got {p}")
        self.p = p
        self.rates = {k: v * p for k, v in dict(yflip=yflip, scale=scale, rotate=rotate, aniso=aniso,
                                                  translate=translate).items()}

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, _, h, w = images.shape
        dev = images.device
        xflip = torch.randint(2, (n,), device=dev).float()
        r = self.rates
        yflip = _gate(torch.randint(2, (n,), device=dev).float(), r["yflip"])
        images = torch.where(xflip.view(-1, 1, 1, 1) > 0, images.flip(3), images)
        images = torch.where(yflip.view(-1, 1, 1, 1) > 0, images.flip(2), images)

        scale = _gate(torch.randn(n, device=dev), r["scale"])
        angle = _gate((torch.rand(n, device=dev) * 2 - 1) * math.pi, r["rotate"])
        aniso = _gate(torch.randn(n, device=dev), r["aniso"])
        axis = _gate((torch.rand(n, device=dev) * 2 - 1) * math.pi, ANISO_ROTATE_PROB)
        shift = _gate(torch.randn(2, n, device=dev), r["translate"])
        # The inverse map, output pixel -> input pixel (centred pixel coordinates, y down), built from the
        # inverses of: scale by s, rotate by the angle, anisotropic scale along the axis, translate.
        s, a = (scale * SCALE_STD).exp2(), (aniso * ANISO_STD).exp2()
        g_inv = (_scaling(1 / s, 1 / s) @ _rotation(angle) @ _rotation(-axis) @ _scaling(1 / a, a)
                 @ _rotation(axis) @ _translation(-shift[0] * w * TRANSLATE_STD, -shift[1] * h * TRANSLATE_STD))
        labels = torch.stack([xflip, yflip, scale, angle.cos() - 1, angle.sin(), aniso * axis.cos(),
                              aniso * axis.sin(), shift[0], shift[1]], 1)
        return warp(images, g_inv), labels


def warp(images: torch.Tensor, g_inv: torch.Tensor) -> torch.Tensor:
    """Resample each image at ``g_inv`` applied to its output pixel centres (pixel units about the image
    centre); identity matrices return the images unchanged, bit for bit."""
    n, _, h, w = images.shape
    moved = ~torch.isclose(g_inv, torch.eye(3, device=g_inv.device)).flatten(1).all(1)
    if not moved.any():
        return images
    # affine_grid works in [-1, 1] coordinates with align_corners=False: pixel u = (2 / size) * centred x.
    to_unit = torch.diag(torch.tensor([2 / w, 2 / h, 1.0], device=images.device, dtype=g_inv.dtype))
    theta = (to_unit @ g_inv[moved] @ torch.linalg.inv(to_unit))[:, :2].to(images.dtype)
    grid = F.affine_grid(theta, [int(moved.sum()), images.shape[1], h, w], align_corners=False)
    out = images.clone()
    out[moved] = F.grid_sample(images[moved], grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    return out
