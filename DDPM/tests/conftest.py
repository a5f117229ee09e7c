"""Shared fixtures: a tiny config and helpers to run the entry scripts as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # One thread per worker under `make test -n`: workers already fill the cores, and oversubscribed
    # OpenMP threads spin instead of working.
    import torch

    torch.set_num_threads(1)

# Tiny settings: a ~20k-parameter UNet on the built-in dataset, a few iterations.
TINY = [
    "data.dataset=builtin", "data.image_size=16", "data.builtin_per_class=40", "data.num_workers=0",
    "model.base_channels=8", "model.channel_mult=[1,2]", "model.layers_per_block=1", "model.attn_resolutions=[8]",
    "model.dropout=0.0", "training.batch_size=8", "training.log_every=1", "training.snapshot_every=4",
    "training.state_every=2", "grid.steps=2", "grid.per_class=2",
]


def run_script(script: str, *args, env=None, check=True, cwd=TREE, timeout=600) -> subprocess.CompletedProcess:
    """Run an entry script of the tree in a subprocess (as a user would) and return the result."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, script, *map(str, args)], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def torchrun(script: str, *args, nproc: int = 2, cwd=TREE, timeout=600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                           script, *map(str, args)], cwd=cwd, env=env, text=True, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A tiny pretrained DDPM checkpoint (a few iterations: an architecture to test against)."""
    out = tmp_path_factory.mktemp("teacher")
    run_script("train.py", "--config", "configs/builtin_train.yaml", "--outdir", out, *TINY, "training.n_iters=4")
    (run,) = out.iterdir()
    return run / "network-0000004.safetensors"


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests run first: under `make test -n` no long test is then left to run alone at the
    end while the other workers idle. Whole modules move, so module fixtures are still built once."""
    slow_modules = {item.module.__name__ for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module.__name__ not in slow_modules)
