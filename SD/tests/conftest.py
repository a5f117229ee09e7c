"""Shared fixtures: SD/ on sys.path, one CPU thread, a tiny SD model folder built once per session."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

SD_DIR = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
for p in (SD_DIR, TESTS_DIR):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# The suite runs beside other jobs on 2 shared cores; multi-threaded BLAS/OpenMP then spins and
# becomes ~50x slower. One thread per process (subprocesses inherit it).
os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory) -> Path:
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_parts(tiny_sd_dir):
    from sfd_sd.models import load_sd_parts

    return load_sd_parts(str(tiny_sd_dir))


def run_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SD_DIR), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def converted_generator(tmp_path_factory) -> Path:
    """A tiny 'SiD-LSG' generator: pickled as the release is ({'ema': UNet}), then converted."""
    import pickle

    from sfd_sd.sid_lsg import convert
    from tiny_sd import tiny_unet

    root = tmp_path_factory.mktemp("sid-lsg")
    with open(root / "sid_lsg.pkl", "wb") as f:
        pickle.dump({"ema": tiny_unet(seed=7)}, f)
    return convert(root / "sid_lsg.pkl", root / "converted")


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests run first: under `make test -n` no long test is then left to run alone at the
    end while the other workers idle. Whole modules move, so module fixtures are still built once."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
