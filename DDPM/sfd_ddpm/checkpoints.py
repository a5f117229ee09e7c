"""Weights as safetensors with their config; training states for exact resume; atomic writes.

A *weights file* (``.safetensors``) holds one or more named networks (``ema.*``, ``net.*``,
``generator_ema.*`` ...) and, as metadata, the resolved config and the step. It is all a user needs
to sample. A *training state* (``training-state.pt``) adds optimizers, EMA, step and RNG states; it
holds tensors and plain containers only and is loaded with ``torch.load(weights_only=True)``, so it
can never run code.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file, safe_open


class CheckpointError(RuntimeError):
    """A missing, corrupt or mismatched checkpoint; the message names the file and the cause."""


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def remove_stale_temporaries(folder) -> list[Path]:
    """Delete the ``.NAME.XXXX.tmp`` files that atomic_write leaves when its process is killed mid-write
    (call at the start of a run, when no other writer is active in ``folder``)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_weights(path, networks: dict[str, dict], cfg: dict, step: int, kind: str) -> None:
    """Save ``{name: state_dict}`` as one safetensors file with the config as metadata."""
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, sd in networks.items() for k, v in sd.items()}
    meta = {"config": json.dumps(cfg), "step": str(step), "kind": kind, "networks": ",".join(networks)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path) -> dict:
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    if "config" not in meta and meta.get("kind") == "classifier":
        raise CheckpointError(f"{path} is a classifier (from train_classifier.py), not a diffusion checkpoint; "
                              f"give it to evaluate.py as --classifier")
    if "config" not in meta:
        raise CheckpointError(f"{path} has no embedded config; was it written by this project?")
    return {"config": json.loads(meta["config"]), "step": int(meta.get("step", 0)),
            "kind": meta.get("kind", "?"), "networks": meta.get("networks", "").split(",")}


def load_weights(path) -> tuple[dict[str, dict], dict]:
    """Return ``({name: state_dict}, metadata)``."""
    meta = read_metadata(path)
    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None
    check_finite(flat, path)
    nets: dict[str, dict] = {}
    for key, value in flat.items():
        name, sub = key.split(".", 1)
        nets.setdefault(name, {})[sub] = value
    return nets, meta


def check_finite(tensors: dict, source) -> None:
    """Refuse weights holding NaN or infinity: sampling from them gives black images, training NaN losses."""
    for key, value in tensors.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            n = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {key!r} holds {n} non-finite value(s) (NaN or inf); the "
                                  f"checkpoint is unusable, use an earlier snapshot")


def non_finite_tensor(tree, where: str = "") -> str | None:
    """The name of the first floating-point tensor in nested dicts/lists/tuples that holds NaN or inf
    (a training state: networks, EMA, optimizer moments); None when every one is finite."""
    if isinstance(tree, torch.Tensor):
        return where if tree.is_floating_point() and not torch.isfinite(tree).all() else None
    items = tree.items() if isinstance(tree, dict) else enumerate(tree) if isinstance(tree, (list, tuple)) else ()
    for key, value in items:
        found = non_finite_tensor(value, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def load_into(module: torch.nn.Module, state: dict, source: str) -> None:
    """Strict load with a message that says which architecture setting differs."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1:3]
        raise CheckpointError(
            f"{source} does not fit this network: the checkpoint was made with a different architecture "
            f"(compare model.* and data.image_size/channels/n_classes with its embedded config). "
            f"Details: {' '.join(s.strip() for s in first)}") from None


def save_state(path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path) -> dict:
    path = _existing(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"{path} is not a loadable training state ({type(err).__name__}: {err})") from None


def file_hash(path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _existing(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} not found")
    return path
