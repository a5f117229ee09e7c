"""Decoding scaled latents to images and saving PNGs/grids."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoints import atomic_write_bytes


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled SD latents -> uint8 images (N, H, W, 3). The VAE runs in its own dtype."""
    dtype = next(vae.parameters()).dtype
    images = vae.decode(latents.to(dtype) / vae.config.scaling_factor, return_dict=False)[0].float()
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: torch.Tensor | np.ndarray, path: Path) -> None:
    atomic_write_bytes(Path(path), png_bytes(np.asarray(image)))


def save_grid(images: torch.Tensor, rows: int, path: Path) -> torch.Tensor:
    """(rows*cols, H, W, 3) uint8 -> one PNG, row-major; returns the grid (rows*H, cols*W, 3)."""
    n, h, w, c = images.shape
    cols = n // rows
    grid = images[: rows * cols].reshape(rows, cols, h, w, c).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)
    save_png(grid.numpy(), path)
    return grid
