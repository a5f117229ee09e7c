"""Image folders for evaluation: listing with class filters, batched loading, 8-bit quantisation."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from ..images import load_image, parse_name


def quantise(x: torch.Tensor) -> torch.Tensor:
    """Round images in [-1, 1] to the 256 levels a PNG would store (the fixed map of images.to_uint8),
    so metrics on in-memory tensors equal those on the saved files."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def list_pngs(folder, exclude=(), include=None, require_class_names: bool = False) -> list[tuple[Path, int | None]]:
    """(path, class) for every ``*.png`` in ``folder``, sorted by name; class is None for names that are
    not ``CCC_IIIII.png``. Filtering by class needs class names on every file, as does ``require_class_names``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} not found")
    entries = []
    for p in sorted(folder.glob("*.png")):
        parsed = parse_name(p.name)
        entries.append((p, parsed[0] if parsed else None))
    unnamed = [p.name for p, c in entries if c is None]
    if unnamed and (exclude or include is not None or require_class_names):
        raise ValueError(f"{folder}: {len(unnamed)} PNGs (e.g. {unnamed[0]!r}) are not named CCC_IIIII.png, "
                         f"so their class is unknown")
    exclude = set(exclude)
    return [(p, c) for p, c in entries
            if c not in exclude and (include is None or c in set(include))]


def model_channels(model) -> int | None:
    """The input channels a classifier expects (from its architecture arguments), if it says."""
    return getattr(model, "arch_kwargs", {}).get("in_channels")


def iter_batches(entries, batch_size: int, channels: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images in [-1, 1] (B, C, H, W), labels (B,), -1 where unknown) from ``list_pngs`` entries; ``channels``
    converts every file to grey (1) or RGB (3) as the model needs (see images.load_image)."""
    for k in range(0, len(entries), batch_size):
        part = entries[k:k + batch_size]
        images = [load_image(p, channels) for p, _ in part]
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) > 1:
            raise ValueError(f"images of different shapes {sorted(shapes)} in one folder (e.g. {part[0][0]})")
        yield torch.stack(images), torch.tensor([-1 if c is None else c for _, c in part])


def iter_tensor_batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for k in range(0, len(images), batch_size):
        yield images[k:k + batch_size]
