"""Run train.py with every way of reading a dataset replaced by a function that fails (used by the
tests to show that the SFD path is data-free through the real entry point)."""
import runpy
import sys
from pathlib import Path

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))

import torchvision.datasets  # noqa: E402

import sfd_ddpm.data as data  # noqa: E402


def refuse(*args, **kwargs):
    raise AssertionError("train.py opened a dataset")


for name in ("load_dataset", "make_builtin", "infinite_loader", "split_by_label"):
    setattr(data, name, refuse)
for name in ("CIFAR10", "STL10", "MNIST", "ImageFolder"):
    setattr(torchvision.datasets, name, refuse)
sys.argv = [str(TREE / "train.py"), *sys.argv[1:]]
runpy.run_path(str(TREE / "train.py"), run_name="__main__")
