#!/usr/bin/env python
"""Write real dataset images as PNGs named {class:03d}_{index:05d}.png (FID references, inspection).

Example: python save_dataset.py --dataset cifar10 --out refs/cifar10_without_0 --exclude-class 0
Pixels are written exactly (no per-image normalisation).
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--dataset", required=True, type=click.Choice(["builtin", "cifar10", "stl10", "mnist"]),
              help="Which dataset's real images to write.")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for the PNGs, named CCC_IIIII.png by class and index.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", help="Training or test images.")
@click.option("--exclude-class", type=int, multiple=True, help="Leave out this class (repeatable).")
@click.option("--per-class", type=click.IntRange(min=1), default=None, help="At most N images per class [default: all].")
@click.option("--root", default="./data", help="torchvision dataset folder.")
@click.option("--image-size", type=click.IntRange(min=1), default=None, help="Resize to this size [default: the dataset's].")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading a missing dataset.")
def main(dataset, out, split, exclude_class, per_class, root, image_size, no_download):
    """Save real images of a dataset, optionally without some classes."""
    import torch
    from tqdm import tqdm

    from sfd_ddpm.data import load_dataset, targets_of
    from sfd_ddpm.images import save_images

    try:
        ds = load_dataset(dataset, root, image_size, split, download=not no_download)
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
    n_classes = max(targets_of(ds)) + 1
    for c in exclude_class:
        if not 0 <= c < n_classes:
            raise click.ClickException(f"--exclude-class {c} is out of range [0, {n_classes - 1}]")
    counts: dict[int, int] = defaultdict(int)
    chosen = []
    for i, t in enumerate(targets_of(ds)):
        if t in exclude_class or (per_class is not None and counts[t] >= per_class):
            continue
        chosen.append((i, t, counts[t]))
        counts[t] += 1
    for k in tqdm(range(0, len(chosen), 256), desc="saving", unit="batch"):
        part = chosen[k:k + 256]
        x = torch.stack([ds[i][0] for i, _, _ in part])
        save_images(x, [t for _, t, _ in part], [j for _, _, j in part], Path(out))
    click.echo(f"wrote {len(chosen)} images of {len(counts)} classes to {out}")


if __name__ == "__main__":
    main()
