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
        if info.get("adapter") == "lora":  # the LoRA mode's generator adapter alone (lora.py)
            from .lora import save_adapter

            save_adapter(unet, tmp, info)
        else:
            unet.save_pretrained(tmp, safe_serialization=True)
        (tmp / "sfd_generator.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


class CheckpointError(RuntimeError):
    """A state or weights file cannot be used; the message names the file and what to do."""


STATE_KEYS = ("fake_score", "generator", "opt_fake", "opt_gen", "scaler_fake", "scaler_gen", "cur_nimg", "rng", "config")


def check_finite(tensors: dict, source: str) -> None:
    """Refuse weights holding NaN/inf, naming the first such tensor."""
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            bad = int((~torch.isfinite(value)).sum())
            raise CheckpointError(f"{source}: tensor {name!r} holds {bad} non-finite value(s) (NaN/inf) of "
                                  f"{value.numel()}; the file is damaged or comes from a diverged run")


def load_training_state(path: Path) -> dict:
    """A training state, read with ``weights_only=True`` and checked (keys, finite weights)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--resume {str(path)!r}: training state not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad pickle opcodes, I/O errors: all mean "unusable file"
        raise CheckpointError(f"--resume {str(path)!r}: cannot read the training state ({type(exc).__name__}); it "
                              "is truncated or damaged: resume from an earlier training-state-*.pt") from exc
    missing = [k for k in STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"--resume {str(path)!r}: not an SD training state (missing {missing})")
    for key in ("fake_score", "generator", "generator_ema"):
        if state.get(key) is not None:
            check_finite(state[key], f"--resume {str(path)!r} [{key}]")
    return state


def read_state_config(state_path: Path) -> dict:
    """The settings a training state was written with: its run dir's config.json (cheap), else the state's."""
    state_path = Path(state_path)
    cfg_file = state_path.parent / "config.json"
    if cfg_file.is_file():
        return json.loads(cfg_file.read_text())
    return json.loads(load_training_state(state_path)["config"])


def state_nimg(path: Path) -> int:
    return int(Path(path).stem.rsplit("-", 1)[1])


def training_states(run_dir: Path) -> list[Path]:
    """``training-state-<images seen>.pt`` files of a run, oldest first."""
    return sorted(Path(run_dir).glob("training-state-[0-9]*.pt"), key=state_nimg)


def latest_training_state(run_dir: Path) -> Path | None:
    states = training_states(run_dir)
    return states[-1] if states else None


_LOCKS: dict[str, object] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``run.lock`` for this process's lifetime; a second writer of the same run is refused.

    An OS file lock (flock) is released when the process dies, so a killed run leaves no stale lock.
    """
    import fcntl

    key = str(Path(run_dir).resolve())
    if key in _LOCKS:
        return
    f = open(Path(run_dir) / "run.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        who = f.read().strip() or "another process"
        f.close()
        raise CheckpointError(f"{run_dir} is being written by {who}; wait for it to finish or stop it "
                              "(two processes must not write one run)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
    f.flush()
    _LOCKS[key] = f


def release_run_locks() -> None:
    """Release every run lock this process holds (closing the file drops the flock)."""
    while _LOCKS:
        _LOCKS.popitem()[1].close()


def remove_leftover_temps(run_dir: Path) -> list[str]:
    """Delete temp files/folders a killed atomic write left behind (``.NAME.*.tmp``, ``.network-snapshot-*``)."""
    removed = []
    for p in Path(run_dir).glob(".*"):
        if p.is_file() and p.name.endswith(".tmp"):
            p.unlink(missing_ok=True)
        elif p.is_dir() and p.name.startswith(".network-snapshot-"):
            shutil.rmtree(p, ignore_errors=True)
        else:
            continue
        removed.append(p.name)
    return removed
