"""Bounded disk use: the size of a training state, the disk a run needs, a free-space check, rotation.

A training state holds two fp32 UNets and their two Adam states (weights, m, v: 3 x 4 bytes per
parameter each) plus the EMA if on: about 20.6 GB for SD v1.5 (859.5M parameters; +3.4 GB EMA).
Only the newest ``keep`` states are kept (default 2: the newest and one fallback should the newest be damaged);
generator snapshots (one fp32 UNet, 3.4 GB) are all kept, on their own schedule.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ConfigError

# Tests fake a small filesystem with this variable (bytes); it is not a setting.
FAKE_FREE_ENV = "SFD_FAKE_FREE_BYTES"
STATE_PATTERN = re.compile(r"^training-state-(\d+)\.pt$")


class DiskSpaceError(ConfigError):
    """Not enough free space for the run; the message says how much is needed."""


def count_crossings(start: int, total: int, every: int) -> int:
    """How many saves a schedule ``every`` makes from ``start`` to ``total`` images (the end included)."""
    n = total // every - start // every
    return n + (1 if total % every and total > start else 0)


@dataclass
class DiskPlan:
    state_bytes: int
    snapshot_bytes: int
    states: int  # states the schedule writes
    snapshots: int
    keep: int  # 0 = keep all

    @property
    def states_on_disk(self) -> int:
        """At most keep + 1 at once: the new state is written before the oldest is removed."""
        if self.keep <= 0 or self.states <= self.keep:
            return self.states
        return self.keep + 1

    @property
    def needed_bytes(self) -> int:
        return self.states_on_disk * self.state_bytes + self.snapshots * self.snapshot_bytes

    def describe(self) -> str:
        kept = "all" if self.keep <= 0 else f"the last {self.keep}"
        return (f"disk: one training state {gb(self.state_bytes)}, one snapshot {gb(self.snapshot_bytes)}; "
                f"this run writes {self.states} state(s) (keeps {kept}) and {self.snapshots} snapshot(s): "
                f"needs up to {gb(self.needed_bytes)}")


def gb(n: int) -> str:
    """Bytes in decimal units, 3 significant digits (``19.0 MB``, ``31.0 GB``)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def unet_parameters(sd_model: str, revision: str | None) -> int:
    """Parameter count of the model's UNet from its config alone (built on the meta device: no weights)."""
    from diffusers import UNet2DConditionModel

    from .models import load_error

    try:
        config = UNet2DConditionModel.load_config(sd_model, subfolder="unet", revision=revision)
    except (OSError, ValueError) as exc:
        raise load_error("the UNet config", sd_model, revision, exc) from exc
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    return sum(p.numel() for p in unet.parameters())


def plan_for_run(cfg, start_nimg: int) -> DiskPlan:
    """The disk plan of a training run, before any model is loaded (fp32 UNets, Adam, optional EMA)."""
    fp32 = 4 * unet_parameters(cfg.sd_model, cfg.revision)
    if getattr(cfg, "adapter", "full") == "lora":  # states and snapshots hold adapter tensors only
        from diffusers import UNet2DConditionModel

        from .memory import adapter_parameters

        config = UNet2DConditionModel.load_config(cfg.sd_model, subfolder="unet", revision=cfg.revision)
        fp32 = 4 * adapter_parameters(cfg.lora_targets, cfg.lora_rank,
                                      {k: v for k, v in config.items() if not k.startswith("_")})
    total, snap, state = (max(int(round(k * 1000)), 1) for k in (cfg.duration_kimg, cfg.snap_kimg, cfg.state_kimg))
    one_state = 2 * 3 * fp32 + (fp32 if cfg.ema_halflife_kimg > 0 else 0)  # fake + generator (w, m, v), EMA
    return DiskPlan(state_bytes=one_state, snapshot_bytes=fp32, states=count_crossings(start_nimg, total, state),
                    snapshots=count_crossings(start_nimg, total, snap), keep=cfg.keep_states)


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that will hold ``path`` (its nearest existing ancestor)."""
    fake = os.environ.get(FAKE_FREE_ENV)
    if fake:
        return int(fake)
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(run_dir: Path, plan: DiskPlan) -> None:
    """Refuse a run whose filesystem cannot hold two training states (before anything is written)."""
    free = free_bytes(run_dir)
    if free < 2 * plan.state_bytes:
        raise DiskSpaceError(
            f"not enough free disk for {run_dir}: {gb(free)} free, but two training states need "
            f"{gb(2 * plan.state_bytes)} (the whole run up to {gb(plan.needed_bytes)}). Free space, or choose "
            "another --outdir.")
    if free < plan.needed_bytes:
        print(f"warning: {gb(free)} free on the output filesystem, the run may need up to "
              f"{gb(plan.needed_bytes)}", flush=True)


def training_states(run_dir: Path) -> list[Path]:
    """``training-state-<images>.pt`` files of a run, oldest first (by the number, not by file time)."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := STATE_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def rotate_states(run_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` training states (keep <= 0: delete none); returns the deleted."""
    if keep <= 0:
        return []
    old = training_states(run_dir)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old
