"""Atomic writes, generator snapshots and the exact-resume training state.

- Snapshots are diffusers UNet folders (``config.json`` + safetensors) with a small
  ``sfd_generator.json`` (t_init, base model, images seen), loadable by ``UNet2DConditionModel
  .from_pretrained`` and by ``generate.py``. No pickles.
- The training state holds only tensors and plain Python values, and is read back with
  ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_torch_save(obj, path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_generator_snapshot(unet: torch.nn.Module, folder: Path, info: dict) -> Path:
    """Write ``unet`` as a diffusers folder atomically (temp folder, then rename)."""
    folder = Path(folder)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "sfd_generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def load_training_state(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {str(path)!r}: training state not found")
    return torch.load(path, map_location="cpu", weights_only=True)


def latest_training_state(run_dir: Path) -> Path | None:
    states = sorted(Path(run_dir).glob("training-state-*.pt"))
    return states[-1] if states else None
