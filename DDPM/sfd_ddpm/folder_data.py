"""The user's own images: ``data.dataset=folder`` with ``data.root=DIR`` in the ImageFolder layout.

``DIR/<class name>/<image>``: one sub-folder per class, class index = position in the sorted folder
names (torchvision's ``find_classes``; hidden folders such as ``.ipynb_checkpoints`` are left out).
Files are recognised by torchvision's image extensions and decoded by PIL; every image is converted
to RGB (grey and palette images repeated, alpha dropped; 16-bit images read at their depth, scaled
to 8 bits), resized so its shorter side is
``image_size`` and centre-cropped to a square (torchvision transforms), then held in memory as uint8.

The held-out split is fixed and the same in every script (train.py, train_classifier.py,
save_dataset.py, the demo): per class, files are ordered by sha256(SPLIT_SEED, class, file name) and
the first max(1, round(TEST_FRACTION * n)) are the test split. It depends only on the file names,
not on which images decode, not on the RNG and not on the order the file system lists them.
(It is not a config key because every method reads the dataset through ``load_dataset`` with the
same arguments; a constant cannot drift between pretraining, the classifier and the references.)

Unreadable files (and files over PIL's decompression-bomb limit) are skipped with a warning naming
how many and why; above MAX_UNREADABLE of the folder
the load is refused (something is wrong with the folder, not with a stray file).
"""
from __future__ import annotations

import hashlib
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

TEST_FRACTION = 0.1
SPLIT_SEED = 0
MAX_UNREADABLE = 0.10


class FolderError(ValueError):
    """A class folder that cannot be used; the message says what to change."""


def find_classes(root) -> list[str]:
    """Sorted class-folder names of ``root`` (errors for a missing folder, no classes, one class)."""
    root = Path(root)
    if not root.is_dir():
        raise FolderError(f"data folder {str(root)!r} not found (data.root / --root): give a folder with one "
                          f"sub-folder of images per class")
    from torchvision.datasets.folder import find_classes as tv_find_classes

    try:
        names, _ = tv_find_classes(str(root))
    except FileNotFoundError:
        names = []
    names = [n for n in names if not n.startswith(".")]
    if not names:
        raise FolderError(f"data folder {str(root)!r} holds no class sub-folders; put each class's images in "
                          f"its own sub-folder (DIR/cat/*.png, DIR/dog/*.png, ...)")
    if len(names) < 2:
        raise FolderError(f"data folder {str(root)!r} holds one class ({names[0]!r}); forgetting a class needs at "
                          f"least two class sub-folders")
    return names


def _image_files(folder: Path) -> list[str]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and has_file_allowed_extension(p.name, IMG_EXTENSIONS))


def held_out_files(cls: str, files: list[str], seed: int = SPLIT_SEED, fraction: float = TEST_FRACTION) -> set[str]:
    """The held-out files of one class: the first max(1, round(fraction * n)) by sha256(seed, class, name)."""
    key = lambda f: hashlib.sha256(f"{seed}/{cls}/{f}".encode()).hexdigest()  # noqa: E731
    n_test = max(1, round(fraction * len(files)))
    return set(sorted(files, key=key)[:n_test])


def scan(root) -> dict:
    """{"classes": names, "files": {split: [(path, label)]}} without decoding anything."""
    root = Path(root)
    names = find_classes(root)
    files: dict[str, list] = {"train": [], "test": []}
    for label, cls in enumerate(names):
        found = _image_files(root / cls)
        if len(found) < 2:
            raise FolderError(f"class folder {str(root / cls)!r} holds {len(found)} image file(s); every class needs "
                              f"at least 2 (one for training, one held out)")
        test = held_out_files(cls, found)
        for f in found:
            files["test" if f in test else "train"].append((str(root / cls / f), label))
    return {"classes": names, "files": files}


def _to_8bit(img):
    """16-bit grey (PIL modes I;16*, and I as older Pillow opens 16-bit PNGs) -> 8-bit L, scaled by
    255/65535 (PIL's own convert clips at 255: every pixel above 255/65535 of the range turns white).
    16-bit colour PNGs already arrive as 8-bit RGB (PIL keeps the high byte)."""
    from PIL import Image

    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257), 0, 255).astype(np.uint8))  # mode L
    return img


def _decode(path: str, image_size: int) -> tuple[np.ndarray | None, str]:
    """((S, S, 3) uint8, "") or (None, why) when the file cannot be used: PIL cannot read it, or it is
    larger than PIL's decompression-bomb limit (Image.MAX_IMAGE_PIXELS; a warning between 1x and 2x of
    it is refused too: a training image that size is almost surely a broken or hostile file)."""
    import warnings

    import torchvision.transforms as T
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                img = _to_8bit(img)
                if img.mode in ("P", "PA", "LA", "La"):  # palette/alpha: through RGBA so transparency converts cleanly
                    img = img.convert("RGBA")
                img = img.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return None, f"over PIL's decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels"
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        return None, type(err).__name__
    img = T.CenterCrop(image_size)(T.Resize(image_size)(img))
    return np.asarray(img, dtype=np.uint8), ""


@lru_cache(maxsize=4)
def _load(root: str, image_size: int, mtime_key: tuple) -> dict:
    info = scan(root)
    out, bad = {}, []
    for split, entries in info["files"].items():
        arrays, labels = [], []
        for path, label in entries:
            a, why = _decode(path, image_size)
            if a is None:
                bad.append((path, why))
            else:
                arrays.append(a)
                labels.append(label)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous() if arrays else \
            torch.empty(0, 3, image_size, image_size, dtype=torch.uint8)
        out[split] = (x, torch.tensor(labels, dtype=torch.long))
    total = sum(len(e) for e in info["files"].values())
    if bad:
        listed = ", ".join(f"{os.path.basename(p)}: {why}" for p, why in bad[:3]) + (" ..." if len(bad) > 3 else "")
        if len(bad) > MAX_UNREADABLE * total:
            raise FolderError(f"{len(bad)} of {total} image files in {root} are unreadable ({listed}), more than "
                              f"{MAX_UNREADABLE:.0%}; fix or remove them")
        print(f"warning: skipped {len(bad)} unreadable image file(s) of {total} in {root} ({listed})", file=sys.stderr)
    for split, (_, y) in out.items():
        counts = torch.bincount(y, minlength=len(info["classes"]))
        empty = [info["classes"][c] for c in range(len(counts)) if counts[c] == 0]
        if empty and split == "train":
            raise FolderError(f"class folder(s) {empty} of {root} have no readable training image; add images "
                              f"(each class needs at least 2 readable ones)")
        if empty:
            print(f"warning: class folder(s) {empty} of {root} have no readable held-out image; their test "
                  f"accuracy and FID references are missing", file=sys.stderr)
    return {"classes": info["classes"], "splits": out, "unreadable": len(bad), "total": total}


def _mtime_key(root: Path) -> tuple:
    return tuple((p.name, p.stat().st_mtime_ns) for p in sorted(root.iterdir()) if p.is_dir())


def load_folder(root, image_size: int, split: str = "train"):
    """A TensorImages of the ``split`` images of ``root`` in [-1, 1] with ``classes`` (the folder names)."""
    from .data import TensorImages

    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose train or test")
    root = Path(root).resolve()
    find_classes(root)  # the clear errors first
    data = _load(str(root), int(image_size), _mtime_key(root))
    x, y = data["splits"][split]
    ds = TensorImages(x.float() / 127.5 - 1, y)
    ds.classes = list(data["classes"])
    ds.root = str(root)
    ds.unreadable = data["unreadable"]
    return ds


def split_record() -> dict:
    """How the held-out split was drawn (stored with classifiers and results)."""
    return {"rule": "per class: files ordered by sha256(seed/class/name), first max(1, round(fraction * n)) held out",
            "test_fraction": TEST_FRACTION, "seed": SPLIT_SEED}


def config_overrides(root, image_size: int) -> list[str]:
    """The train.py KEY=VALUE overrides that train a teacher on a class folder (n_classes from the folder)."""
    names = find_classes(root)
    return ["data.dataset=folder", f"data.root={Path(root).resolve()}", f"data.n_classes={len(names)}",
            f"data.image_size={int(image_size)}", "data.channels=3"]


def reference_images(root, image_size: int, forget, per_class: int) -> torch.Tensor:
    """Real held-out (test-split) images of the remaining classes, at most ``per_class`` each, in [-1, 1]
    (the FID reference for a folder dataset, like demo_report.reference_images for the built-in one)."""
    forget = {int(c) for c in ([forget] if isinstance(forget, int) else forget)}
    ds = load_folder(root, image_size, "test")
    keep = [i for c in range(len(ds.classes)) if c not in forget
            for i in [j for j, t in enumerate(ds.targets) if t == c][:per_class]]
    return ds.images[keep]
