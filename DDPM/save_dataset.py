#!/usr/bin/env python
"""Write real dataset images as PNGs named {class:03d}_{index:05d}.png (FID references, inspection).

Examples:
  python save_dataset.py --dataset cifar10 --out refs/cifar10_without_0 --exclude-class 0
  python save_dataset.py --dataset folder --root my_images --image-size 32 --split test --exclude-class cat --out refs/mine
Pixels are written exactly (no per-image normalisation). For --dataset folder, --split test is the
held-out split the classifier is tested on and train.py never trains on (the FID reference).
"""
from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--dataset", required=True, type=click.Choice(["builtin", "cifar10", "stl10", "mnist", "folder"]),
              help="Which dataset's real images to write (folder = your class folders under --root).")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="Folder for the PNGs, named CCC_IIIII.png by class and index.")
@click.option("--split", type=click.Choice(["train", "test"]), default="train", help="Training or test images.")
@click.option("--exclude-class", multiple=True, metavar="CLASS",
              help="Leave out this class, by name or index (repeatable; name:X / index:N force one reading).")
@click.option("--per-class", type=click.IntRange(min=1), default=None, help="At most N images per class [default: all].")
@click.option("--root", default="./data", help="torchvision dataset folder; for folder, the folder of class sub-folders.")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Resize to this size [default: the dataset's; 32 for folder].")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading a missing dataset.")
@click.option("--mirror", default=None, metavar="URL",
              help="Download cifar10/stl10/mnist from this base URL (http:// or https://, the files under their "
                   "usual names) instead of their home sites (data.mirror).")
@click.option("--mirror-md5", default=None, metavar="MD5",
              help="md5 of a re-packed cifar10/stl10 archive on --mirror, checked instead of torchvision's sums.")
def main(dataset, out, split, exclude_class, per_class, root, image_size, no_download, mirror, mirror_md5):
    """Save real images of a dataset, optionally without some classes."""
    import torch
    from tqdm import tqdm

    from sfd_ddpm.data import class_names, load_dataset, resolve_classes, targets_of
    from sfd_ddpm.images import save_images

    try:
        ds = load_dataset(dataset, root, image_size, split, download=not no_download, mirror=mirror,
                          mirror_md5=mirror_md5)
        names = class_names(ds)
        if dataset != "folder":
            names = names[:max(targets_of(ds)) + 1]
        exclude_class = resolve_classes(list(exclude_class), names, "--exclude-class")
    except (ValueError, FileNotFoundError) as err:
        raise click.ClickException(str(err)) from None
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
