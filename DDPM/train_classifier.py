#!/usr/bin/env python
"""Train the dataset classifier used by evaluate.py (unlearning accuracy, remaining-class accuracy,
classifier-feature FID) and by SFD's sfd.override=classifier.

Examples (from inside DDPM/):
  python train_classifier.py --dataset builtin --out classifiers/builtin_small_cnn.safetensors
  python train_classifier.py --dataset cifar10 --out classifiers/cifar10_resnet34.safetensors --device cuda
  python train_classifier.py --dataset stl10 --out classifiers/stl10_resnet34.safetensors --no-pretrained

CIFAR-10 / STL-10 follow docs/method.md section 7 and the authors' recipe: ImageNet ResNet-34, fc replaced by
Linear(512, 10), images resized to 224 px inside the model, inputs in [-1, 1], Adam (lr 1e-5, fc at
10x, weight decay 5e-4), batch 128, 10 epochs, random horizontal flips. STL-10 uses its labelled
train + test images (13k) split 12000/1000 by a permutation seeded with 1234.
The built-in dataset gets a small CNN that reaches >= 98% in well under a minute on a CPU.

Your own images (``--dataset folder --root DIR``, one sub-folder per class): a small CNN (width 32)
trained for about --target-steps optimisation steps whatever the folder's size (so a small folder
gets many epochs), with random crops (reflect padding of image_size/8), Adam with a cosine
learning-rate decay, and no left-right flips unless --hflip (a mirrored digit or letter is not a real
image, and a classifier trained on mirrored ones reads them as correct); tested on the fixed held-out
split (10% of each class, the same split train.py pretrains without). Below 0.95 test accuracy it warns loudly: the classifier then judges
UA and remaining-class accuracy poorly.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Defaults per architecture; every one can be overridden on the command line.
RECIPES = {
    "resnet34": {"epochs": 10, "lr": 1e-5, "head_lr_mult": 10.0, "weight_decay": 5e-4},
    "small_cnn": {"epochs": 3, "lr": 2e-3, "head_lr_mult": 1.0, "weight_decay": 0.0},
}
STL_SPLIT_SEED, STL_TEST_SIZE = 1234, 1000
# Your own images: a step budget instead of an epoch count, augmentation, cosine decay.
FOLDER_RECIPE = {"target_steps": 3000, "min_epochs": 10, "width": 32, "crop_pad_fraction": 1 / 8, "cosine": True}


def load_splits(dataset: str, root: str, download: bool, builtin_per_class: int, image_size: int | None = None,
                mirror: str | None = None, mirror_md5: str | None = None):
    """(train, test) datasets of (image in [-1, 1], label) at the dataset's native resolution."""
    import torch
    from torch.utils.data import Subset

    from sfd_ddpm.data import load_dataset

    if dataset == "builtin":
        return (load_dataset("builtin", split="train", image_size=16, builtin_per_class=builtin_per_class),
                load_dataset("builtin", split="test", image_size=16))
    if dataset == "folder":
        return (load_dataset("folder", root, image_size, split="train"),
                load_dataset("folder", root, image_size, split="test"))
    if dataset == "cifar10":
        return (load_dataset("cifar10", root, split="train", download=download, mirror=mirror, mirror_md5=mirror_md5),
                load_dataset("cifar10", root, split="test", download=download, mirror=mirror, mirror_md5=mirror_md5))
    full = load_dataset("stl10", root, download=download, mirror=mirror, mirror_md5=mirror_md5)  # labelled train + test
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(STL_SPLIT_SEED)).tolist()
    return Subset(full, perm[:-STL_TEST_SIZE]), Subset(full, perm[-STL_TEST_SIZE:])


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
# Main options
@click.option("--dataset", required=True, type=click.Choice(["builtin", "cifar10", "stl10", "folder"]),
              help="Dataset to classify (its native resolution: 16, 32 or 64 px); folder = your own images "
                   "under --root, one sub-folder per class, at --image-size.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.safetensors",
              help="Where to write the classifier (weights + metadata).")
@click.option("--arch", type=click.Choice(["auto", "small_cnn", "resnet34"]), default="auto",
              help="auto = small_cnn for builtin, resnet34 otherwise.")
@click.option("--pretrained/--no-pretrained", default=None,
              help="Start ResNet-34 from torchvision's ImageNet weights (downloaded or from the torch hub cache). "
                   "[default: pretrained for resnet34]")
@click.option("--imagenet-weights", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Local copy of torchvision's ResNet-34 ImageNet state dict (resnet34-b627a593.pth), for offline use.")
# Hyperparameters
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Training epochs. [default: 10 resnet34, 3 small_cnn; folder: from --target-steps]")
@click.option("--target-steps", type=click.IntRange(min=1), default=None,
              help="Folder data: train for about this many optimisation steps (epochs = steps / batches per "
                   "epoch, at least 10), so small folders get more epochs. [default: 3000 for folder]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, metavar="LR",
              help="Adam learning rate of the body. [default: 1e-5 resnet34, 2e-3 small_cnn]")
@click.option("--head-lr-mult", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Learning-rate multiplier of the final fc layer. [default: 10 resnet34, 1 small_cnn]")
@click.option("--weight-decay", type=click.FloatRange(min=0), default=None,
              help="Adam weight decay. [default: 5e-4 resnet34, 0 small_cnn]")
@click.option("--batch", type=click.IntRange(min=1), default=128, help="Batch size.")
@click.option("--hflip/--no-hflip", default=None,
              help="Random left-right flips. [default: on for cifar10/stl10 (the authors' recipe); off for "
                   "builtin and folder, where a class may differ by left and right: --hflip for folders of "
                   "scenes or objects]")
@click.option("--crop-pad", type=click.IntRange(min=0), default=None, metavar="PX",
              help="Random-crop augmentation: reflect-pad by PX and crop back at a random offset (0 = off). "
                   "[default: image_size/8 for folder, 0 otherwise]")
@click.option("--resize", type=click.IntRange(min=16), default=224, metavar="PX",
              help="ResNet-34 input size (images are resized inside the model).")
@click.option("--width", type=click.IntRange(min=4), default=None,
              help="small_cnn channels of its first stage. [default: 16; 32 for folder]")
# Data
@click.option("--root", default="./data", metavar="DIR",
              help="torchvision dataset folder; for --dataset folder, the folder of class sub-folders.")
@click.option("--image-size", type=click.IntRange(min=8), default=32, metavar="PX",
              help="Folder data: images are resized and centre-cropped to PX (use the teacher's data.image_size).")
@click.option("--no-download", is_flag=True, help="Fail instead of downloading a missing dataset.")
@click.option("--mirror", default=None, metavar="URL",
              help="Download cifar10/stl10/mnist from this base URL (http:// or https://, the files under their "
                   "usual names) instead of their home sites (data.mirror).")
@click.option("--mirror-md5", default=None, metavar="MD5",
              help="md5 of a re-packed cifar10/stl10 archive on --mirror, checked instead of torchvision's sums.")
@click.option("--builtin-per-class", type=click.IntRange(min=10), default=500,
              help="Built-in training images per class (the test split is fixed: 200 per class).")
@click.option("--limit-train", type=click.IntRange(min=1), default=None, metavar="N",
              help="Train on a seeded random N images only (smoke tests).")
@click.option("--limit-test", type=click.IntRange(min=1), default=None, metavar="N",
              help="Measure test accuracy on the first N test images only (smoke tests).")
@click.option("--seed", type=int, default=0, help="Seed of initialisation, shuffling and flips.")
# Performance
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="auto = CUDA when available.")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, help="Data-loading processes (torchvision datasets).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def main(dataset, out, arch, pretrained, imagenet_weights, epochs, target_steps, lr, head_lr_mult, weight_decay, batch,
         hflip, crop_pad, resize, width, root, image_size, no_download, mirror, mirror_md5, builtin_per_class, limit_train,
         limit_test, seed, device, num_workers, no_progress):
    """Train a classifier, print its test accuracy and save it as safetensors with its settings."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from sfd_ddpm.classifiers import (accuracy, build_classifier, classifier_quality_note, epochs_for_steps, fit,
                                      imagenet_resnet34_state, save_classifier)
    from sfd_ddpm.data import class_names

    folder = dataset == "folder"
    if target_steps is not None and not folder:
        raise click.UsageError("--target-steps is for --dataset folder (the other datasets have fixed recipes)")
    arch = ("small_cnn" if dataset in ("builtin", "folder") else "resnet34") if arch == "auto" else arch
    if pretrained is None:
        pretrained = arch == "resnet34"
    if arch == "small_cnn" and (pretrained or imagenet_weights):
        raise click.UsageError("small_cnn has no ImageNet weights: drop --pretrained / --imagenet-weights")
    if imagenet_weights and not pretrained:
        raise click.UsageError("--imagenet-weights contradicts --no-pretrained")
    recipe = dict(RECIPES[arch])
    for key, value in (("epochs", epochs), ("lr", lr), ("head_lr_mult", head_lr_mult), ("weight_decay", weight_decay)):
        if value is not None:
            recipe[key] = value
    hflip = dataset in ("cifar10", "stl10") if hflip is None else hflip
    width = width or (FOLDER_RECIPE["width"] if folder else 16)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda but CUDA is not available")

    try:
        imagenet_state = imagenet_resnet34_state(imagenet_weights) if pretrained else None
        train_set, test_set = load_splits(dataset, root, not no_download, builtin_per_class, image_size, mirror,
                                          mirror_md5)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise click.ClickException(str(err)) from None
    if limit_train is not None and limit_train < len(train_set):
        keep = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:limit_train]
        train_set = Subset(train_set, keep.tolist())
    if limit_test is not None and limit_test < len(test_set):
        test_set = Subset(test_set, list(range(limit_test)))
    x0, _ = test_set[0]
    in_channels, image_size = x0.shape[0], x0.shape[-1]
    names = class_names(train_set)
    if folder:
        crop_pad = round(image_size * FOLDER_RECIPE["crop_pad_fraction"]) if crop_pad is None else crop_pad
        if epochs is None:
            recipe["epochs"] = epochs_for_steps(len(train_set), batch, target_steps or FOLDER_RECIPE["target_steps"],
                                                FOLDER_RECIPE["min_epochs"])
    crop_pad = crop_pad or 0

    torch.manual_seed(seed)
    model = build_classifier(arch, len(names), in_channels, width=width, resize=resize, imagenet_state=imagenet_state)
    workers = 0 if dataset in ("builtin", "folder") else num_workers  # in memory already
    train_loader = DataLoader(train_set, batch_size=batch, shuffle=True, num_workers=workers, drop_last=False,
                              generator=torch.Generator().manual_seed(seed))
    test_loader = DataLoader(test_set, batch_size=max(batch, 256), num_workers=workers)
    settings = {"arch": arch, "pretrained": pretrained, "imagenet_weights": imagenet_weights, **recipe,
                "batch": batch, "hflip": hflip, "crop_pad": crop_pad, "cosine": folder, "seed": seed, "n_train": len(train_set), "n_test": len(test_set),
                "device": device, "torch": torch.__version__}
    if arch == "resnet34":
        settings["resize"] = resize
    if dataset == "builtin":
        settings["builtin_per_class"] = builtin_per_class
    if folder:
        from sfd_ddpm.folder_data import split_record
        settings.update(root=str(Path(root).resolve()), split=split_record(), width=width,
                        target_steps=None if epochs else target_steps or FOLDER_RECIPE["target_steps"],
                        unreadable_images=getattr(train_set, "unreadable", 0))
    if dataset == "stl10":
        settings["split"] = f"labelled train+test, {len(train_set)}/{len(test_set)}, randperm seed {STL_SPLIT_SEED}"
    click.echo(f"training {arch} on {dataset} ({len(train_set)} train / {len(test_set)} test images, "
               f"{image_size} px) on {device}")
    try:
        result = fit(model, train_loader, epochs=recipe["epochs"], lr=recipe["lr"],
                     head_lr_mult=recipe["head_lr_mult"], weight_decay=recipe["weight_decay"], hflip=hflip,
                     crop_pad=crop_pad, cosine=folder, device=device, seed=seed, progress=not no_progress, log=click.echo)
    except FloatingPointError as err:
        raise click.ClickException(str(err)) from None
    test_acc = accuracy(model, test_loader, device, progress=not no_progress)
    settings.update(train_seconds=round(result["seconds"], 1), final_train_loss=result["final_loss"])
    save_classifier(out, model, architecture=arch, dataset=dataset, image_size=image_size,
                    test_accuracy=test_acc, training=settings, class_names=names)
    click.echo(f"test accuracy {test_acc:.4f} ({len(test_set)} images); trained in {result['seconds']:.0f} s; "
               f"saved {out}")
    note = classifier_quality_note({"test_accuracy": test_acc})
    if note:
        bar = "!" * 78
        click.echo(f"{bar}\nWARNING: {note}\n{bar}", err=True)


if __name__ == "__main__":
    main()
