#!/usr/bin/env python
"""What a paper-table script (scripts/common.sh) may reuse, resume or must run, and what it will cost.

    python scripts/stage.py status STAGE_DIR [--config YAML] [KEY=VALUE...]
                                                         none | unfinished RUN_DIR | finished CHECKPOINT
    python scripts/stage.py samples DIR CKPT [SAMPLE_ARGS...]  done | todo
    python scripts/stage.py metric JSON --input FILE... -- EVALUATE_ARGS...   done | todo
    python scripts/stage.py product PATH [ARGS...]             done | todo (a classifier, the FID reference)
    python scripts/stage.py record FILE [ARGS...]              write the command a product was made with
    python scripts/stage.py estimate train|sample|fid ...       GPU-hours, tab, what was counted
    python scripts/stage.py estimate assumptions               the throughputs the estimates assume

A *stage folder* holds the train.py runs of one stage (train.py --outdir STAGE_DIR). A run is
*finished* when it reached its configured length: its config.json's training.n_iters = N and a complete
network-<N>.safetensors exists, with no live process holding its run.lock. A run that stopped earlier
is resumed with `train.py --resume RUN_DIR` (never consumed, never restarted beside it). A run made with
other KEY=VALUE settings than those asked for now is refused rather than reused silently.

This file reads JSON, safetensors headers and file hashes only (no torch import), so every check is
cheap enough to run before each step of a script.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import sys
import tempfile
from pathlib import Path

import click

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
from sfd_ddpm import config as C  # noqa: E402  (yaml only)
from sfd_ddpm.rotation import training_states  # noqa: E402  (pathlib only)

RUN_NAME = re.compile(r"^\d{5}-")
LOCK_FILE = "run.lock"  # sfd_ddpm.run_guard.LOCK_FILE


# -- training stages ---------------------------------------------------------------------------------
def complete_safetensors(path: Path) -> bool:
    """The file's header parses and the file is exactly as long as the tensors it declares (a killed or
    truncated write fails this; snapshots are written atomically, so this is a second line of defence)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        return path.stat().st_size == 8 + n + end
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def lock_holder(run_dir: Path) -> dict | None:
    """The process holding the run's lock, or None (no lock, or its process is gone on this host)."""
    try:
        holder = json.loads((run_dir / LOCK_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"host": "?", "pid": "?"}  # a lock being written: treat as held
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return None  # killed: train.py --resume takes the stale lock over
        except PermissionError:
            pass
        if _zombie(holder["pid"]):
            return None
    return holder


def _zombie(pid: int) -> bool:
    """A killed process not yet reaped by its parent (Linux /proc; elsewhere: assume not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def run_config(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return None


def final_checkpoint(run_dir: Path, cfg: dict) -> Path | None:
    """network-<training.n_iters>.safetensors when it exists complete, else None."""
    path = run_dir / f"network-{int(cfg['training']['n_iters']):07d}.safetensors"
    return path if path.is_file() and complete_safetensors(path) else None


def resumable(run_dir: Path) -> bool:
    return (run_dir / "config.json").is_file() and bool(training_states(run_dir))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, str) and isinstance(b, str) and a != b:  # one path written two ways
        return os.path.realpath(a) == os.path.realpath(b) and (os.sep in a or os.sep in b)
    return a == b


# A method that starts from a checkpoint takes these from it (config.with_architecture), whatever was asked.
ADOPTED = tuple(f"{s}." for s in C.ARCHITECTURE_SECTIONS) + tuple(f"data.{k}" for k in C.ARCHITECTURE_DATA_KEYS)


def differences(cfg: dict, overrides: list[str]) -> list[str]:
    """The KEY=VALUE settings asked for now that the run's config.json does not have."""
    have = _flatten(cfg)
    adopts = cfg.get("method") not in ("pretrain", "retrain")
    asked = {}
    for text in overrides:  # a later KEY=VALUE wins, as in train.py
        asked.update(_flatten(C.parse_override(text)))
    diffs = []
    for key, want in asked.items():
        if adopts and key.startswith(ADOPTED):
            continue
        if key not in have or not _same(have[key], want):
            diffs.append(f"{key}: run has {have.get(key, '(missing)')!r}, asked for {want!r}")
    return diffs


class StageError(click.ClickException):
    pass


def stage_status(stage_dir, overrides: list[str] = (), config: str | None = None) -> tuple[str, Path | None]:
    """("none", None) | ("unfinished", RUN_DIR) | ("finished", CHECKPOINT) for the runs under stage_dir.

    Among the runs made from ``config`` (train.py names a run NNNNN-<config file stem>) with the asked-for
    KEY=VALUE settings, the newest finished one wins, else the newest one that can be resumed. A run still
    being written, or only runs made with other settings, raise StageError."""
    stage_dir = Path(stage_dir)
    runs = sorted(p for p in stage_dir.iterdir() if p.is_dir() and RUN_NAME.match(p.name)) if stage_dir.is_dir() else []
    for run in runs:
        if (holder := lock_holder(run)) is not None:
            raise StageError(f"{run} is being trained by {holder.get('host')} pid {holder.get('pid')}; wait for it "
                             f"to finish (or delete {run / LOCK_FILE} if no such process runs), then rerun")
    finished, unfinished, other = [], [], []
    for run in runs:
        cfg = run_config(run)
        if cfg is None:
            continue  # killed before its first save: nothing to reuse or resume
        diffs = differences(cfg, list(overrides))
        if config is not None and run.name[6:] != Path(config).stem:
            diffs.insert(0, f"made from {run.name[6:]}.yaml, asked for {Path(config).name}")
        ckpt = final_checkpoint(run, cfg)
        if diffs:
            if ckpt or resumable(run):
                other.append((run, diffs))
        elif ckpt:
            finished.append(ckpt)
        elif resumable(run):
            unfinished.append(run)
    if finished:
        return "finished", finished[-1]
    if unfinished:
        return "unfinished", unfinished[-1]
    if other:
        run, diffs = other[-1]
        raise StageError(f"{run} was trained with other settings ({'; '.join(diffs)}); rerun with its settings "
                         f"to reuse it, or move {stage_dir} away to train anew")
    return "none", None


# -- samples, metrics, products ------------------------------------------------------------------------
def file_hash(path, length: int = 16) -> str:
    """sha256 prefix, as sfd_ddpm.checkpoints.file_hash records it in settings.json (not imported from there:
    checkpoints imports torch, and this script runs at every stage of every paper script)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def command_file(samples_dir) -> Path:
    return Path(f"{Path(samples_dir)}.command.json")


def samples_done(samples_dir, ckpt, args: list[str]) -> bool:
    """sample.py finished this folder (settings.json: complete, every class at per_class images) for this
    checkpoint (by content hash) and these sample.py arguments (recorded by `record` after it ran)."""
    settings = _read_json(Path(samples_dir) / "settings.json")
    if not isinstance(settings, dict) or settings.get("complete") is not True:
        return False
    counts = settings.get("images_per_class") or {}
    if not counts or any(n != settings.get("per_class") for n in counts.values()):
        return False
    if (_read_json(command_file(samples_dir)) or {}).get("command") != list(args):
        return False
    return Path(ckpt).is_file() and settings.get("checkpoint_sha256") == file_hash(ckpt)


def metric_done(result, inputs: list[str], args: list[str]) -> bool:
    """evaluate.py wrote ``result`` with exactly these arguments, after every input last changed."""
    record = _read_json(Path(result))
    if not isinstance(record, dict) or record.get("command") != ["evaluate.py", *args]:
        return False
    made = Path(result).stat().st_mtime_ns
    return all(Path(p).exists() and Path(p).stat().st_mtime_ns <= made for p in inputs)


# -- cost estimate ---------------------------------------------------------------------------------------
# Estimates, not measurements: no GPU was available to this project to time these. Each constant is an
# assumption you can replace with your own measurement (python benchmarks/bench.py --size cifar10 on your
# GPU prints images/s of a training step and of one network evaluation); set the EST_* variables.
EST_TRAIN_IMG_S = float(os.environ.get("EST_TRAIN_IMG_S", 400))
"""images/s per GPU of one training step (forward + backward) of the 35.7M-parameter CIFAR-10 UNet at 32 px
in fp32: an order-of-magnitude guess for an A100-class GPU, not a measurement."""
EST_EVAL_IMG_S = float(os.environ.get("EST_EVAL_IMG_S", 3 * EST_TRAIN_IMG_S))
"""network evaluations (one image, forward only) per s per GPU: 3x the training rate (benchmarks/bench.py
measured 3.4x on CPU: 1454.6 ms per evaluation vs 4930.6 ms per training step, batch 16; DDPM README)."""
EST_FID_IMG_S = float(os.environ.get("EST_FID_IMG_S", 1000))
"""images/s per GPU through the feature network (Inception-v3 at 299 px, assumed)."""
EST_EDM_COST = float(os.environ.get("EST_EDM_COST", 55.74 / 35.75))
"""cost of one EDM SongUNet pass relative to the DDPM UNet (assumed proportional to parameters, 55.7M/35.7M)."""
# Training steps (of the same batch) per iteration, by method: counted from the network passes in
# sfd_ddpm/methods; SFD/SiD measured (benchmarks/bench.py --size cifar10 on CPU: 23263.9 ms per SFD
# iteration / 4930.6 ms per pretraining step, DDPM README).
STEP_COST = {"pretrain": 1.0, "retrain": 1.0, "sfd": 4.7, "sid": 4.7,
             "sa": 2.0,      # a forget batch and a replay batch in one pass
             "salun": 2.0,   # a forget batch and a remaining batch
             "esd": None,    # partial DDIM of the frozen model (esd_steps / 2 evaluations on average) + 2 + 1 step
             "vdu": 2.0}


def _config(path, overrides):
    try:
        return C.load_config(path, overrides)
    except (C.ConfigError, FileNotFoundError) as err:
        raise click.ClickException(f"{path}: {err}") from None


def train_estimate(cfg: dict, done_iters: int = 0) -> tuple[float, str]:
    method, tr = cfg["method"], cfg["training"]
    cost = STEP_COST.get(method) or 1.0
    if method == "esd":
        cost = 1.0 + (cfg["baseline"]["esd_steps"] / 2 + 2) / 3  # a training step ~ 3 evaluations
    if cfg["model"].get("arch") == "songunet":
        cost *= EST_EDM_COST
    left = max(tr["n_iters"] - done_iters, 0)
    hours = left * tr["batch_size"] * cost / EST_TRAIN_IMG_S / 3600
    return hours, (f"{method}: {left} of {tr['n_iters']} iterations x batch {tr['batch_size']} x {cost:.2f} "
                   f"training steps per iteration at {EST_TRAIN_IMG_S:g} images/s per GPU")


def nfe(cfg: dict, sampler: str, steps: int | None, guidance: float) -> int:
    """Network evaluations per image (samplers.nfe without importing torch)."""
    per = {"one_step": 1, "ddpm": cfg["diffusion"]["num_timesteps"], "ddim": steps or 100,
           "edm": 2 * (steps or 18) - 1}[sampler]
    return per * (2 if guidance and sampler != "one_step" else 1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main():
    """Reuse, resume or run: the checks and estimates of the paper-table scripts (scripts/common.sh)."""


@main.command()
@click.argument("stage_dir", type=click.Path(file_okay=False))
@click.argument("overrides", nargs=-1)
@click.option("--config", default=None, help="The config file the stage trains (train.py --config).")
def status(stage_dir, overrides, config):
    """none | unfinished RUN_DIR | finished CHECKPOINT for the train.py runs under STAGE_DIR that were
    made from --config with the KEY=VALUE OVERRIDES given (those passed to train.py)."""
    try:
        kind, path = stage_status(stage_dir, overrides, config)
    except C.ConfigError as err:
        raise click.ClickException(str(err)) from None
    click.echo(kind if path is None else f"{kind} {path}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("samples_dir", type=click.Path(file_okay=False))
@click.argument("ckpt", type=click.Path(dir_okay=False))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def samples(samples_dir, ckpt, args):
    """done when SAMPLES_DIR holds the complete output of sample.py --ckpt CKPT --out SAMPLES_DIR ARGS."""
    click.echo("done" if samples_done(samples_dir, ckpt, list(args)) else "todo")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("result", type=click.Path(dir_okay=False))
@click.option("--input", "inputs", multiple=True, help="A file the result depends on (repeat).")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def metric(result, inputs, args):
    """done when evaluate.py ARGS wrote RESULT after every --input last changed."""
    click.echo("done" if metric_done(result, list(inputs), list(args)) else "todo")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("path", type=click.Path())
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def product(path, args):
    """done when PATH exists and was made by ARGS (its PATH.command.json); a PATH made by other
    arguments is an error (it would be reused silently otherwise)."""
    if not Path(path).exists():
        click.echo("todo")
        return
    made = (_read_json(command_file(path)) or {}).get("command")
    if made is not None and made != list(args):
        raise click.ClickException(f"{path} was made by `{' '.join(made)}`, not `{' '.join(args)}`; move it away "
                                   f"to remake it, or rerun with the settings it was made with")
    click.echo("done")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("path", type=click.Path())
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def record(path, args):
    """Write PATH.command.json: the arguments PATH was made with (read by `samples` and `product`)."""
    target = command_file(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    with os.fdopen(fd, "w") as f:  # temp name + rename, as sfd_ddpm.checkpoints.atomic_write (without torch)
        json.dump({"command": list(args)}, f, indent=1)
    os.replace(tmp, target)


@main.group()
def estimate():
    """GPU-hours of one stage at its configured scale: prints HOURS<tab>WHAT WAS COUNTED."""


@estimate.command("assumptions")
def estimate_assumptions():
    click.echo(f"assumed, not measured: EST_TRAIN_IMG_S={EST_TRAIN_IMG_S:g} training images/s per GPU, "
               f"EST_EVAL_IMG_S={EST_EVAL_IMG_S:g} network evaluations/s, EST_FID_IMG_S={EST_FID_IMG_S:g} feature "
               f"images/s, EST_EDM_COST={EST_EDM_COST:.2f} (EDM network / DDPM UNet), SFD/SiD iteration = "
               f"{STEP_COST['sfd']:g} training steps; see scripts/stage.py and set your GPU's numbers")


@estimate.command("train")
@click.argument("config", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--resume", "run_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="A run to resume: its config.json and the iterations its newest training state holds.")
def estimate_train(config, overrides, run_dir):
    if run_dir:
        states = training_states(run_dir)
        done = int(re.search(r"(\d+)", states[-1].name).group(1)) if states else 0
        hours, text = train_estimate(run_config(Path(run_dir)), done)
    else:
        hours, text = train_estimate(_config(config, list(overrides)))
    click.echo(f"{hours:.6g}\t{text}")


@estimate.command("sample")
@click.argument("config")
@click.option("--per-class", type=int, required=True)
@click.option("--sampler", required=True)
@click.option("--steps", type=int, default=None)
@click.option("--guidance", type=float, default=0.0)
def estimate_sample(config, per_class, sampler, steps, guidance):
    cfg = _config(config, [])
    images = per_class * cfg["data"]["n_classes"]
    n = nfe(cfg, sampler, steps, guidance)
    scale = EST_EDM_COST if cfg["model"].get("arch") == "songunet" else 1.0
    hours = images * n * scale / EST_EVAL_IMG_S / 3600
    click.echo(f"{hours:.6g}\t{images} images x {n} NFE at {EST_EVAL_IMG_S / scale:.0f} evaluations/s per GPU")


@estimate.command("fid")
@click.argument("config")
@click.option("--per-class", type=int, required=True, help="Generated images per class.")
def estimate_fid(config, per_class):
    images = per_class * _config(config, [])["data"]["n_classes"]
    hours = images * 2 / EST_FID_IMG_S / 3600  # the UA classifier pass + the FID feature pass
    click.echo(f"{hours:.6g}\t{images} generated images through the classifier and the feature network at "
               f"{EST_FID_IMG_S:g} images/s per GPU; the reference's features are computed once and cached")


if __name__ == "__main__":
    main()
