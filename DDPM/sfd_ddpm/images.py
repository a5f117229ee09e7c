"""Image files: lossless PNGs named ``{class:03d}_{index:05d}.png`` and per-class grids.

Images in [-1, 1] are mapped to uint8 by one fixed affine map (no per-image normalisation, which
would distort FID references).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

NAME = re.compile(r"^(\d{3})_(\d{5})\.png$")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_name(label: int, index: int) -> str:
    return f"{label:03d}_{index:05d}.png"


class NonFiniteImages(ValueError):
    """Generated images holding NaN or infinity (a broken model); never written as black PNGs."""


def check_finite_images(x: torch.Tensor, labels, indices) -> None:
    bad = (~torch.isfinite(x.detach())).flatten(1).any(1).nonzero().flatten().tolist()
    if bad:
        first = image_name(int(labels[bad[0]]), int(indices[bad[0]]))
        raise NonFiniteImages(f"{len(bad)} of {len(x)} generated images hold NaN or inf values (e.g. {first}); "
                              f"nothing was written for them: the model is broken (check its checkpoint)")


class UnreadableImage(ValueError):
    """An image file that does not decode (empty, cut short, not an image)."""


def save_images(x: torch.Tensor, labels, indices, out: Path) -> None:
    """Write each image under a temporary name, then rename it: a kill never leaves a PNG cut short under
    its final name, which a restart would count as done (leftover ``.*.tmp`` files are removed by
    checkpoints.remove_stale_temporaries)."""
    check_finite_images(x, labels, indices)
    out.mkdir(parents=True, exist_ok=True)
    for img, c, i in zip(to_uint8(x), labels, indices):
        path = out / image_name(int(c), int(i))
        tmp = out / f".{path.name}.{os.getpid()}.tmp"
        try:
            Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img).save(tmp, format="PNG")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def image_problem(path) -> str | None:
    """None if the file decodes fully, else why not (0 bytes, cut short, not an image)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "is empty (0 bytes)"
        with Image.open(path) as img:
            img.load()  # decodes every pixel: a file cut short fails here, not at open
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's ways of failing
        return f"does not decode ({type(err).__name__}: {err}): empty, cut short or not an image"
    return None


def parse_name(name: str) -> tuple[int, int] | None:
    m = NAME.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def list_images(folder, exclude: set[int] = frozenset(), include: set[int] | None = None) -> list[tuple[Path, int]]:
    """(path, class) for every ``CCC_IIIII.png`` in ``folder``, filtered by class."""
    out = []
    for p in sorted(Path(folder).iterdir()):
        parsed = parse_name(p.name)
        if parsed and parsed[0] not in exclude and (include is None or parsed[0] in include):
            out.append((p, parsed[0]))
    return out


def load_image(path, channels: int | None = None) -> torch.Tensor:
    """A PNG as a (C, H, W) tensor in [-1, 1]. ``channels`` 3 converts grey, palette and RGBA files to RGB
    (alpha dropped), 1 converts to grey; None keeps grey and RGB and turns any other mode into RGB.
    A file that does not decode raises :class:`UnreadableImage` naming it."""
    try:
        img = Image.open(path)
        img.load()
        mode = {1: "L", 3: "RGB"}.get(channels) or (img.mode if img.mode in ("L", "RGB") else "RGB")
        if img.mode != mode:
            img = img.convert(mode)
        a = np.asarray(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:  # PIL's ways of failing
        what = "is empty (0 bytes)" if Path(path).stat().st_size == 0 else f"does not decode ({type(err).__name__}: {err})"
        raise UnreadableImage(f"{path} {what}: an image cut short (e.g. by a killed sample.py) or not an image; "
                              f"delete it and rerun sample.py (or remove it from the folder)") from None
    if a.ndim == 2:
        a = a[..., None]
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 127.5 - 1


def save_grid(x: torch.Tensor, nrow: int, path, scale: int = 1) -> None:
    """One row per class; ``scale`` enlarges small images (nearest neighbour) for viewing."""
    from torchvision.utils import make_grid

    grid = make_grid((x.detach().float().cpu().clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)
    if scale > 1:
        grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
    img = (grid * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
