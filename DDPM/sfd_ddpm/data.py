"""Datasets (images in [-1, 1], integer labels), remain/forget splits and an exactly resumable loader.

* ``builtin``: ten procedural classes (a coloured shape each on a noisy dark background, with
  jittered position, size and colour), generated deterministically from a seed: no files, no
  download. Bold and distinct so a small diffusion model learns them in minutes on a CPU.
* ``cifar10`` (train, 50k), ``stl10`` (labelled train + test, 13k, resized to 64), ``mnist``
  through torchvision, downloaded when missing (``data.download``).
* ``folder``: the user's own images, one sub-folder of ``data.root`` per class (``folder_data.py``),
  with a fixed held-out test split.

Class names (``class_names``) and class arguments given by index or by name (``resolve_classes``)
are handled here, once, for every script.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

DATASETS = ("builtin", "cifar10", "stl10", "mnist", "folder")

# The built-in classes: (name, RGB colour). Shapes are drawn by _shape_mask.
BUILTIN_CLASSES = [
    ("red square", (0.90, 0.15, 0.15)),
    ("green disc", (0.15, 0.80, 0.20)),
    ("blue triangle", (0.20, 0.35, 1.00)),
    ("yellow plus", (0.95, 0.90, 0.10)),
    ("magenta ring", (0.90, 0.20, 0.85)),
    ("cyan stripes", (0.10, 0.85, 0.90)),
    ("orange bars", (1.00, 0.55, 0.05)),
    ("white cross", (0.95, 0.95, 0.95)),
    ("pink diamond", (1.00, 0.60, 0.70)),
    ("olive frame", (0.55, 0.65, 0.10)),
]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
MNIST_CLASSES = [str(d) for d in range(10)]


def class_names(source) -> list[str]:
    """The class names, index order, of a dataset, a config (or its ``data`` section) or a dataset name.

    builtin: the shape names; cifar10 / stl10 / mnist: their label names; folder: the class-folder
    names (``data.class_names`` when the config stores them, else read from ``data.root``)."""
    if isinstance(source, Dataset):
        while isinstance(source, (Subset, _Concat)):
            source = source.dataset if isinstance(source, Subset) else source.parts[0]
        if hasattr(source, "classes"):
            return list(source.classes)
        return [name for name, _ in BUILTIN_CLASSES]
    d = source if isinstance(source, str) else source.get("data", source)
    name = d if isinstance(d, str) else d["dataset"]
    if name == "builtin":
        return [n for n, _ in BUILTIN_CLASSES]
    if name in ("cifar10", "stl10", "mnist"):
        return {"cifar10": CIFAR10_CLASSES, "stl10": STL10_CLASSES, "mnist": MNIST_CLASSES}[name]
    if name == "folder" and not isinstance(d, str):
        if d.get("class_names"):
            return list(d["class_names"])
        from .folder_data import find_classes
        return find_classes(d["root"])
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def resolve_class(value, names: list[str], what: str = "class") -> int:
    """One class -> its index, by one rule whatever its type (YAML reads ``sfd.forget=[1]`` as an int,
    the command line ``--forget 1`` as text: both must mean the same class).

    ``name:X`` is the class named X, ``index:N`` class N. A bare value is read both ways, as a name
    (a class called so) and as an index (a whole number in range): one reading is taken; two readings
    of the same class agree; two readings of different classes are ambiguous and refused, the message
    showing both and how to choose. Every script reads classes through here (train.py's forget and
    override keys, sample.py --classes, evaluate.py --forget/--exclude, save_dataset.py
    --exclude-class, demo.py and compare.py --forget/--override)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{what} {value!r} is neither a class name nor an index; classes: {_listing(names)}")
    text = str(value).strip()
    if text.startswith("name:"):
        return _by_name(text[5:], names, what)
    if text.startswith("index:"):
        if not text[6:].strip().isdigit():
            raise ValueError(f"{what} {text!r}: index: takes a whole number; classes: {_listing(names)}")
        return _by_index(int(text[6:]), names, what)
    as_name = names.index(text) if text in names else None
    if text.lstrip("-").isdigit():
        as_index = int(text)
        if as_name is None:
            return _by_index(as_index, names, what)
        if 0 <= as_index < len(names) and as_index != as_name:
            raise ValueError(
                f"{what} {text} is ambiguous: as a name it is class {as_name} ('{names[as_name]}'), as an index it "
                f"is class {as_index} ('{names[as_index]}'); write name:{text} or index:{as_index}")
    if as_name is None:
        return _by_name(text, names, what)
    return as_name


def _by_index(index: int, names: list[str], what: str) -> int:
    if not 0 <= index < len(names):
        raise ValueError(f"{what} {index} is out of range [0, {len(names) - 1}] (classes: {_listing(names)})")
    return index


def _by_name(text: str, names: list[str], what: str) -> int:
    if text in names:
        return names.index(text)
    import difflib
    close = difflib.get_close_matches(text, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValueError(f"{what} {text!r} is neither a class name nor an index{hint}; classes: {_listing(names)}")


def _listing(names: list[str]) -> str:
    shown = ", ".join(f"{i}={n}" for i, n in enumerate(names[:12]))
    return shown + (f", ... ({len(names)} in all)" if len(names) > 12 else "")


def resolve_classes(values, names: list[str], what: str = "class") -> list[int]:
    """A list of classes (each by resolve_class's rule), or a text 'all' / '0,3' / '1-9' / 'cat,dog'."""
    if isinstance(values, (int, bool)):
        values = [values]
    if isinstance(values, str):
        text = values.strip()
        if text == "all":
            return list(range(len(names)))
        values = []
        for part in (p.strip() for p in text.split(",")):
            lo, dash, hi = part.partition("-")
            if part not in names and dash and lo.isdigit() and hi.isdigit():
                values += list(range(resolve_class(lo, names, what), resolve_class(hi, names, what) + 1))
            elif part:
                values.append(part)
    return [resolve_class(v, names, what) for v in values]


def _shape_mask(cls: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Boolean masks for a batch of shapes, in coordinates (u, v) scaled to the shape's radius."""
    au, av = np.abs(u), np.abs(v)
    box = np.maximum(au, av) <= 1
    rad = np.sqrt(u ** 2 + v ** 2)
    masks = [
        box,                                                        # square
        rad <= 1.05,                                                # disc
        (v >= -0.9) & (v <= 0.9) & (au <= (v + 0.9) * 0.6),         # triangle
        ((au <= 0.38) & (av <= 1)) | ((av <= 0.38) & (au <= 1)),   # plus
        (rad >= 0.55) & (rad <= 1.05),                              # ring
        box & (np.floor((v + 1) * 2) % 2 == 0),                     # horizontal stripes
        box & (np.floor((u + 1) * 2) % 2 == 0),                     # vertical bars
        box & ((np.abs(u - v) <= 0.45) | (np.abs(u + v) <= 0.45)),  # diagonal cross
        au + av <= 1.15,                                            # diamond
        box & (np.maximum(au, av) >= 0.55),                         # hollow frame
    ]
    return np.stack(masks)[cls, np.arange(len(cls))]


def make_builtin(n_per_class: int, image_size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministically generate ``n_per_class`` images of each built-in class, in [-1, 1]."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(BUILTIN_CLASSES)), n_per_class)
    n, s = labels.size, image_size
    centre = s / 2 - 0.5 + rng.uniform(-1, 1, (n, 2)) * s * 0.12
    radius = s * rng.uniform(0.30, 0.40, n)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float64)
    u = (xx[None] - centre[:, 0, None, None]) / radius[:, None, None]
    v = (yy[None] - centre[:, 1, None, None]) / radius[:, None, None]
    mask = _shape_mask(labels, u, v)
    colours = np.array([c for _, c in BUILTIN_CLASSES])[labels] + rng.normal(0, 0.05, (n, 3))
    background = rng.uniform(0.05, 0.25, (n, 1, 1, 1)) + rng.normal(0, 0.04, (n, 3, s, s))
    img = np.where(mask[:, None], colours[:, :, None, None], background)
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)
    x = torch.from_numpy(img * 2 - 1).float()
    return x, torch.from_numpy(labels).long()


# data.random_flip=null: flip where a mirrored image is still a real one (the authors' CIFAR-10/STL-10
# setting), not on digits and the user's folders, whose classes may differ by left and right.
FLIP_BY_DEFAULT = {"builtin": True, "cifar10": True, "stl10": True, "mnist": False, "folder": False}


def with_flip_resolved(cfg: dict) -> dict:
    """A copy of ``cfg`` whose ``data.random_flip`` is true or false (null: the dataset's convention), so
    that the run's config.json and checkpoints record what training did."""
    import copy

    cfg = copy.deepcopy(cfg)
    d = cfg["data"]
    if d["dataset"] not in DATASETS:
        raise ValueError(f"unknown dataset {d['dataset']!r}; choose one of {', '.join(DATASETS)}")
    if d.get("random_flip") is None:
        d["random_flip"] = FLIP_BY_DEFAULT[d["dataset"]]
    return cfg


class TensorImages(Dataset):
    """In-memory images with a ``targets`` list (the interface the splits below rely on)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.targets = images, labels.tolist()

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.images[i], self.targets[i]


def load_dataset(name: str, root: str = "./data", image_size: int | None = None, split: str = "train",
                 download: bool = True, builtin_per_class: int = 1000, mirror: str | None = None,
                 mirror_md5: str | None = None) -> Dataset:
    """A dataset of (image in [-1, 1], label). ``split`` is train or test (folder: the held-out split).

    cifar10 / stl10 / mnist come from torchvision, fetched into ``root`` when missing and ``download``
    is on, from their home sites or from ``mirror`` (``data.mirror``); under torchrun rank 0 alone
    fetches and the other ranks wait for it. Missing and not fetched: FileNotFoundError whose one-line
    message says where it was looked for and how to place the files by hand."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}; choose train or test")
    if name == "folder":
        from .folder_data import load_folder
        return load_folder(root, image_size or 32, split)
    if name == "builtin":
        per_class = builtin_per_class if split == "train" else max(100, builtin_per_class // 5)
        return TensorImages(*make_builtin(per_class, image_size or 16, seed=0 if split == "train" else 1))
    from .distributed import main_rank_first

    return main_rank_first(lambda: _open_torchvision(name, root, image_size, split, download, mirror, mirror_md5))


def load_data(d: dict, split: str = "train") -> Dataset:
    """``load_dataset`` with the settings of a config's ``data`` section."""
    return load_dataset(d["dataset"], d["root"], d["image_size"], split, d["download"], d["builtin_per_class"],
                        d.get("mirror"), d.get("mirror_md5"))


def torchvision_source(name: str, mirror: str | None = None, mirror_md5: str | None = None):
    """torchvision's dataset class for ``name``, fetching from ``mirror`` (a base URL holding the files
    under their usual names) when given. ``mirror_md5`` is the md5 of a re-packed cifar10/stl10 archive
    on the mirror: the archive is checked against it instead of torchvision's sums (and its files are
    then trusted). The subclass keeps torchvision's class name: MNIST's folder is named after it."""
    from torchvision import datasets as tv

    base = {"cifar10": tv.CIFAR10, "stl10": tv.STL10, "mnist": tv.MNIST}[name]
    if mirror_md5 and not mirror:
        raise ValueError("data.mirror_md5 is the md5 of the archive on data.mirror: set data.mirror too")
    if mirror_md5 and name == "mnist":
        raise ValueError("data.mirror_md5 applies to cifar10 / stl10 archives; mnist's four files are checked "
                         "against torchvision's sums: serve the original files on the mirror")
    if not mirror:
        return base
    mirror = mirror.rstrip("/") + "/"
    attrs: dict = {"mirrors": [mirror]} if name == "mnist" else {"url": mirror + base.filename}
    if mirror_md5:
        attrs.update(tgz_md5=mirror_md5.lower(), train_list=[[f, None] for f, _ in base.train_list],
                     test_list=[[f, None] for f, _ in base.test_list])
        if name == "cifar10":
            attrs["meta"] = {**base.meta, "md5": None}
    return type(base.__name__, (base,), attrs)


def manual_placement(name: str, root: str) -> str:
    """How to place a torchvision dataset under ``root`` by hand (the layout torchvision expects)."""
    from torchvision import datasets as tv

    if name == "mnist":
        files = ", ".join(f for f, _ in tv.MNIST.resources)
        return f"download {files} from {tv.MNIST.mirrors[0]} into {root}/MNIST/raw/"
    cls = tv.CIFAR10 if name == "cifar10" else tv.STL10
    inside = ("data_batch_1 ... data_batch_5, test_batch, batches.meta" if name == "cifar10" else
              "train_X.bin, train_y.bin, test_X.bin, test_y.bin, unlabeled_X.bin, ...")
    return (f"download {cls.url} into {root} (extracted on first use; with downloads off extract it there "
            f"yourself: {root}/{cls.base_folder}/{inside})")


def _open_torchvision(name, root, image_size, split, download, mirror, mirror_md5) -> Dataset:
    import tarfile

    import torchvision.transforms as T

    source = torchvision_source(name, mirror, mirror_md5)
    made_root = not Path(root).exists()
    size = image_size or {"cifar10": 32, "stl10": 64, "mnist": 28}[name]
    tf = T.Compose([T.Resize(size), T.ToTensor(), T.Normalize(0.5, 0.5)])  # [0,1] -> [-1,1]
    try:
        if name != "stl10":
            return source(root, train=split == "train", transform=tf, download=download)
        # STL-10 as in the paper: the labelled train (5k) + test (8k) splits, 1300 images per class.
        parts = [source(root, split=s, transform=tf, download=download) for s in ("train", "test")]
        for p in parts:
            p.targets = p.labels.tolist()
        return _Concat(parts)
    except (RuntimeError, OSError, EOFError, tarfile.TarError) as err:  # offline (URLError), corrupt, missing
        where = str(Path(root).resolve())
        if made_root and not any(p.is_file() for p in Path(root).rglob("*")):  # torchvision's empty folders
            import shutil
            shutil.rmtree(root, ignore_errors=True)
        url = source.mirrors[0] if name == "mnist" else source.url
        why = (f"could not be downloaded from {url} ({getattr(err, 'reason', None) or err})" if download else
               "download is off (data.download=false / --no-download)")
        raise FileNotFoundError(f"{name} not found under {where} and {why}; {manual_placement(name, where)}, or "
                                f"point data.root (--root in the other scripts) at the folder that holds it") from None


class _Concat(Dataset):
    def __init__(self, parts):
        self.parts = parts
        self.targets = [t for p in parts for t in p.targets]
        self.offsets = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        return self.parts[k][i - int(self.offsets[k])]


def targets_of(dataset: Dataset) -> list[int]:
    if isinstance(dataset, Subset):
        parent = targets_of(dataset.dataset)
        return [parent[i] for i in dataset.indices]
    return list(dataset.targets)


def split_by_label(dataset: Dataset, forget: list[int], n_classes: int) -> tuple[Subset, Subset]:
    """(remain, forget) subsets: items whose label is / is not in ``forget``."""
    for c in forget:
        if not 0 <= c < n_classes:
            raise ValueError(f"forget class {c} is out of range [0, {n_classes - 1}]")
    targets = targets_of(dataset)
    remain_idx = [i for i, t in enumerate(targets) if t not in forget]
    forget_idx = [i for i, t in enumerate(targets) if t in forget]
    return Subset(dataset, remain_idx), Subset(dataset, forget_idx)


class InfiniteSampler(Sampler):
    """Endless shuffled indices for one rank, starting at any position: exactly resumable.

    Epoch e is a permutation seeded by (seed, e); rank r takes every world-th index from offset r.
    ``start`` skips that many indices of this rank's stream (step * local batch on resume).
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, seed: int = 0, start: int = 0):
        self.n, self.rank, self.world, self.seed, self.start = n, rank, world, seed, start

    def __iter__(self):
        per_epoch = len(range(self.rank, self.n, self.world))
        epoch, pos = divmod(self.start, per_epoch)
        while True:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            yield from perm[self.rank::self.world][pos:].tolist()
            epoch, pos = epoch + 1, 0


def infinite_loader(dataset: Dataset, local_batch: int, rank: int, world: int, seed: int, start_step: int,
                    num_workers: int):
    """Batches from an InfiniteSampler; the loader never touches the global RNG (exact resume)."""
    sampler = InfiniteSampler(len(dataset), rank, world, seed, start=start_step * local_batch)
    loader = DataLoader(dataset, batch_size=local_batch, sampler=sampler, num_workers=num_workers,
                        drop_last=True, generator=torch.Generator().manual_seed(seed),
                        persistent_workers=num_workers > 0)
    return iter(loader)
