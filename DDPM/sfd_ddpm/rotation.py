"""Training states on disk: one file per save (``training-state-<iteration:07d>.pt``), the newest K kept.

The new state is written completely (atomically) before older ones are removed, so a crash while
saving always leaves a loadable state; K = 2 (default) keeps one fallback should the newest be damaged.
``--resume`` loads the newest; a run written before numbering (``training-state.pt``) still resumes.
"""
from __future__ import annotations

import re
from pathlib import Path

LEGACY_STATE = "training-state.pt"
STATE_PATTERN = re.compile(r"^training-state-(\d+)\.pt$")


def state_path(run_dir, step: int) -> Path:
    return Path(run_dir) / f"training-state-{step:07d}.pt"


def training_states(run_dir) -> list[Path]:
    """Numbered states of a run, oldest first (by iteration, not by name or file time)."""
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := STATE_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_state(run_dir) -> Path:
    """The state ``--resume`` continues from (the legacy single file if there is no numbered one)."""
    states = training_states(run_dir)
    return states[-1] if states else Path(run_dir) / LEGACY_STATE


def newest_finite_state(run_dir) -> Path | None:
    """The newest training state that loads and whose tensors are all finite (None: there is none)."""
    from .checkpoints import CheckpointError, load_state, non_finite_tensor

    for path in reversed(training_states(run_dir) or [Path(run_dir) / LEGACY_STATE]):
        try:
            if path.is_file() and non_finite_tensor(load_state(path)["method"]) is None:
                return path
        except (CheckpointError, KeyError, TypeError):
            continue  # damaged: look further back
    return None


def rotate_states(run_dir, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` numbered states (keep <= 0: none); returns the deleted paths."""
    if keep <= 0:
        return []
    old = training_states(run_dir)[:-keep]
    for p in old:
        p.unlink(missing_ok=True)
    return old
