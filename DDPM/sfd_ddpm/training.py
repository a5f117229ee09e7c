"""The generic training loop shared by every method: run directory, logging, snapshots, resume.

A method (see ``methods/``) builds its networks and optimizers and implements ``train_step``; this
loop owns everything around it. Only rank 0 writes files. A training state (every rank's RNG state
included) is saved every ``training.state_every`` iterations and at the end, so ``--resume`` continues
exactly; the newest ``training.keep_states`` are kept (``rotation.py``). A non-finite loss stops the
run with a message naming the step and the term, before anything is overwritten. SIGTERM/SIGUSR1
(a cluster's preemption notice) end the current iteration, save its state and raise ``Preempted``
(``preemption.py``).
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as tdist
from tqdm import tqdm

from . import checkpoints, rotation
from .config import to_json
from .distributed import Dist
from .preemption import Preempted, StopSignal



class NonFiniteLoss(RuntimeError):
    pass


def new_run_dir(outdir, desc: str) -> Path:
    """Create ``outdir/NNNNN-desc``, numbered after the runs already there.

    The number is claimed atomically: the scan and the exclusive mkdir happen under a lock on
    ``outdir`` itself (released on close or when the process dies), and a name that appeared
    meanwhile makes the next number be tried, so two runs started together never share a folder or
    a number."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(outdir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for _ in range(1000):
            ids = [int(m.group(1)) for p in outdir.iterdir() if (m := re.match(r"^(\d{5})-", p.name))]
            run = outdir / f"{max(ids, default=-1) + 1:05d}-{desc}"
            try:
                run.mkdir()
                return run
            except FileExistsError:
                continue  # made by a writer that does not take the lock: the rescan counts it
    finally:
        os.close(fd)
    raise FileExistsError(f"could not claim a new run folder in {outdir}")


def snapshot_steps(n_iters: int, every: int, early: int) -> set[int]:
    """Iteration counts after which weights are saved: every ``every``, the end, and ``early``
    log-spaced counts in [1, every) (the authors' early-stage schedule, without its floor-division bug)."""
    steps = set(range(every, n_iters + 1, every)) | {n_iters}
    if early > 0:
        steps |= {int(round(v)) for v in np.exp(np.linspace(0, math.log(every), early + 1))[:-1]}
    return {s for s in steps if 1 <= s <= n_iters}


def _gather(dist: Dist, obj):
    if not dist.enabled:
        return [obj]
    out = [None] * dist.world_size
    tdist.all_gather_object(out, obj)
    return out


def _rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def last_good(run_dir) -> str:
    """Where a run whose weights went non-finite can continue from: the newest finite training state."""
    if run_dir is None:  # a rank other than 0 of a new run: rank 0 names the state
        return "the run's finite training states are kept"
    good = rotation.newest_finite_state(run_dir)
    if good is None:
        return f"no training state in {run_dir} holds finite weights: start a new run with settings that keep it finite"
    states = rotation.training_states(run_dir)
    later = [p.name for p in states[states.index(good) + 1:]] if good in states else []
    move = f"move {', '.join(later)} out of {run_dir}, then " if later else ""
    return (f"the newest training state with finite weights is {good}: {move}continue with `train.py --resume "
            f"{run_dir} --allow-changed-settings KEY=VALUE` (e.g. a lower learning rate)")


def changes_record(changes, start: int) -> list[dict]:
    """config.json's ``changes``: earlier resumes' entries, then {iteration, key, old, new} for this one."""
    earlier, changed = changes or ([], {})
    return [*earlier, *({"iteration": start, "key": k, "old": a, "new": b} for k, (a, b) in changed.items())]


def train(method, cfg: dict, run_dir: Path | None, dist: Dist, resume: bool = False, changes=None) -> dict:
    """Run ``method`` from its current state to ``training.n_iters``; returns the last log record.
    ``changes``: on resume, (the changes config.json recorded before, {key: (old, new)} of this resume)."""
    tr = cfg["training"]
    n_iters = tr["n_iters"]
    start = 0
    if resume:
        path = rotation.latest_state(run_dir)
        state = checkpoints.load_state(path)
        bad = checkpoints.non_finite_tensor(state.get("method"))
        if bad is not None:  # a resume would only continue from NaN
            raise checkpoints.CheckpointError(f"{path}: tensor {bad!r} holds non-finite values (NaN or inf); "
                                              f"{last_good(run_dir)}")
        start = int(state["step"])
        if n_iters < start:
            raise ValueError(f"training.n_iters={n_iters} is below iteration {start}, where {path.name} stands; "
                             f"give training.n_iters >= {start}")
        method.load_state_dict(state["method"])
        rngs = state["rng"]
        if len(rngs) != dist.world_size:
            raise ValueError(f"the run was saved with {len(rngs)} processes; resume it with the same number "
                             f"(got {dist.world_size}) for an exact continuation")
        _set_rng_state(rngs[dist.rank])
        if dist.is_main:
            from .run_guard import truncate_log
            truncate_log(run_dir, start)  # the iterations after the saved state are redone and logged again
        dist.print0(f"resumed {run_dir} at iteration {start}")
    else:
        torch.manual_seed(cfg["seed"] + dist.rank)
    method.start(start)

    snaps = snapshot_steps(n_iters, tr["snapshot_every"], tr["early_snapshots"])
    record = changes_record(changes, start)
    if record:  # config.json holds the settings in effect; `changes` leads back to the original ones
        cfg = {**cfg, "changes": record}
    if dist.is_main and run_dir is not None:
        checkpoints.atomic_write(run_dir / "config.json", lambda tmp: Path(tmp).write_text(to_json(cfg)))
    bar = tqdm(total=n_iters, initial=start, disable=not dist.is_main, desc=cfg["method"], unit="it",
               dynamic_ncols=True)
    record, t_last, step_last = {}, time.perf_counter(), start
    t_start = time.perf_counter()
    with StopSignal() as stop:
        for step in range(start, n_iters):
            losses = method.train_step(step)
            for term, value in losses.items():
                if not math.isfinite(value):
                    raise NonFiniteLoss(f"non-finite loss at iteration {step}: {term} = {value}; the run stopped; "
                                        f"{last_good(run_dir)}")
            done = step + 1
            if done % tr["log_every"] == 0 or done == n_iters:
                now = time.perf_counter()
                record = {"step": done, "images_seen": done * tr["batch_size"],
                          "images_per_s": (done - step_last) * tr["batch_size"] / max(now - t_last, 1e-9),
                          "seconds": now - t_start, **{k: float(v) for k, v in losses.items()}}
                t_last, step_last = now, done
                if dist.is_main and run_dir is not None:
                    with open(run_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                bar.set_postfix({k: f"{v:.4g}" for k, v in losses.items()})
            if done in snaps:
                _snapshot(method, cfg, run_dir, dist, done)
            if done % tr["state_every"] == 0 or done == n_iters:
                _save_state(method, run_dir, dist, done, tr["keep_states"])
            bar.update(1)
            if done < n_iters and stop.agreed(dist):
                _stop(method, cfg, run_dir, dist, done, stop, bar)
    bar.close()
    return record


def _stop(method, cfg, run_dir, dist, done: int, stop: StopSignal, bar) -> None:
    """Save the state of iteration ``done`` (unless its scheduled save just did) and raise Preempted."""
    tr = cfg["training"]
    if done % tr["state_every"]:
        _save_state(method, run_dir, dist, done, tr["keep_states"])
    bar.close()
    raise Preempted(f"stopped by {stop.received or 'a signal to another rank'} after iteration {done} of "
                    f"{tr['n_iters']}; its training state is saved: continue with `train.py --resume {run_dir}`",
                    done)


def _refuse_non_finite(tensors, run_dir, done: int) -> None:
    """Stop before writing weights or a state that hold NaN or inf (checked on every rank, which hold the
    same weights, so all of them stop together): a NaN snapshot would pass for a finished result, a NaN
    state would rotate a finite one away."""
    bad = checkpoints.non_finite_tensor(tensors)
    if bad is not None:
        raise NonFiniteLoss(f"tensor {bad!r} became non-finite (NaN or inf) by iteration {done}; nothing of that "
                            f"iteration was saved; {last_good(run_dir)}")


def _snapshot(method, cfg, run_dir, dist, done: int) -> None:
    weights = method.weights()
    _refuse_non_finite(weights, run_dir, done)
    if dist.is_main and run_dir is not None:
        checkpoints.save_weights(run_dir / f"network-{done:07d}.safetensors", weights, cfg, done, method.kind)
        for name, (images, nrow) in method.sample_grids().items():
            from .images import save_grid
            save_grid(images, nrow, run_dir / f"{name}-{done:07d}.png", scale=max(1, 64 // images.shape[-1]))
    dist.barrier()


def _save_state(method, run_dir, dist, done: int, keep: int) -> None:
    rngs = _gather(dist, _rng_state())
    state = method.state_dict()
    _refuse_non_finite(state, run_dir, done)
    if dist.is_main and run_dir is not None:
        checkpoints.save_state(rotation.state_path(run_dir, done), {"step": done, "rng": rngs, "method": state})
        rotation.rotate_states(run_dir, keep)  # only after the new state is complete
    dist.barrier()


def latest_weights(run_dir) -> Path:
    """The newest ``network-*.safetensors`` of a run directory (by iteration, not file time)."""
    files = sorted(Path(run_dir).glob("network-*.safetensors"))
    if not files:
        raise checkpoints.CheckpointError(f"no network-*.safetensors in {run_dir}")
    return files[-1]
