#!/usr/bin/env python
"""Train a class-conditional DDPM, or distil/forget it with SiD / SFD (or a baseline: retrain, SA, SalUn, ESD, VDU).

Examples (from inside DDPM/):
  python train.py --config configs/builtin_train.yaml
  python train.py --config configs/cifar10_train.yaml training.batch_size=64 --dry-run
  torchrun --nproc_per_node 4 train.py --config configs/cifar10_sfd.yaml sfd.init=runs/00000-cifar10_train/network-0800000.safetensors
  python train.py --resume runs/00003-builtin_sfd
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sfd_ddpm import config as C  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="YAML",
              help="Config file (see configs/). Keys missing from it take the schema defaults.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--outdir", type=click.Path(file_okay=False), default="runs",
              help="Parent folder; each run gets a numbered sub-folder NNNNN-<config name>.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True), metavar="RUN_DIR",
              help="Continue a run exactly from its newest training-state-*.pt with its config.json. Only "
                   "training.n_iters=... may change freely; other changed settings need --allow-changed-settings, "
                   "and method, model.*, diffusion.*, edm.* and the data shape never change.")
@click.option("--allow-changed-settings", is_flag=True,
              help="With --resume: continue with the KEY=VALUE settings that differ from the run's; config.json "
                   "lists each change under `changes` with the iteration it took effect.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="auto = CUDA when available.")
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit without training.")
@click.option("--list-keys", is_flag=True, help="List every config key with its default and meaning, then exit.")
def main(config_path, overrides, outdir, resume_dir, allow_changed_settings, device, dry_run, list_keys):
    """Train with the method named by the config's `method` key: pretrain, sid, sfd, or a baseline
    (retrain, sa, salun, esd, vdu).

    KEY=VALUE pairs override config keys (values are YAML: numbers, true/false, lists [0,1], null),
    e.g. `training.n_iters=1000 sfd.forget=[0,3]`. Unknown keys are errors.
    Your own class folders (data.dataset=folder) are not flipped left-right unless data.random_flip=true.
    Weights are saved as network-NNNNNNN.safetensors (config embedded), sample grids as PNG, losses
    and images/s in log.jsonl, and training-state-*.pt (the newest training.keep_states kept) allow an exact --resume.
    """
    if list_keys:
        click.echo("\n".join(C.describe()))
        return
    try:
        changes = None
        if resume_dir:
            if config_path:
                raise click.UsageError("--resume uses the run's own config.json: drop --config")
            cfg, earlier, changed = C.resume_config(read_run_config(resume_dir), overrides)
            C.check_resume_changes(changed, allow_changed_settings)
            changes = (earlier, changed)
        else:
            if allow_changed_settings:
                raise click.UsageError("--allow-changed-settings goes with --resume RUN_DIR")
            if not config_path:
                raise click.UsageError("give --config YAML (or --resume RUN_DIR)")
            cfg = C.load_config(config_path, overrides)
    except (C.ConfigError, FileNotFoundError, json.JSONDecodeError) as err:
        raise click.ClickException(str(err)) from None
    if dry_run:
        click.echo(C.to_json(cfg))
        return
    run(cfg, config_path, outdir, resume_dir, device, changes)


def read_run_config(run_dir) -> dict:
    path = Path(run_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except OSError as err:
        raise C.ConfigError(f"--resume {run_dir}: cannot read {path} ({err.strerror or err}); is it a run folder?")
    except json.JSONDecodeError as err:
        raise C.ConfigError(f"--resume {run_dir}: {path} is not valid JSON ({err})") from None
    if not isinstance(cfg, dict):
        raise C.ConfigError(f"--resume {run_dir}: {path} does not hold a config mapping")
    return cfg


def check_outdir(outdir) -> None:
    """Fail before any work when --outdir cannot hold a run (a file in its path, or no write permission)."""
    import os

    existing = Path(outdir).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise click.ClickException(f"--outdir {outdir}: {existing} is a file, not a folder; choose another --outdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise click.ClickException(f"--outdir {outdir}: {existing} is not writable; choose another --outdir")


# The checkpoint a method starts from, and whether the method reads training images.
INIT_KEY = {"sfd": ("sfd", "init"), "sid": ("sfd", "init"), "sa": ("baseline", "init"), "salun": ("baseline", "init"),
            "esd": ("baseline", "init"), "vdu": ("vdu", "init")}
READS_IMAGES = ("pretrain", "retrain", "salun", "vdu")
FORGET_KEYS = (("sfd", "forget"), ("baseline", "forget"), ("vdu", "forget"))


def _init_data(cfg) -> dict | None:
    """The ``data`` section of the checkpoint this method starts from (None: no such file yet)."""
    from sfd_ddpm.checkpoints import CheckpointError, read_metadata

    section, key = INIT_KEY.get(cfg["method"], (None, None))
    path = cfg[section][key] if section else None
    if section == "sfd" and not path:
        path = cfg["sfd"]["init_stage1"]
    if not path or not Path(path).is_file():
        return None  # the method reports a missing init itself
    try:
        return read_metadata(path)["config"]["data"]
    except CheckpointError:
        return None


def prepare_data(cfg, saved: dict | None = None) -> dict:
    """Resolve the dataset's classes before any work: a folder dataset is checked against data.root
    (and data.n_classes), its folder names are stored in data.class_names, and forget/override classes
    become indices by data.resolve_class's rule (names, indices, name:X / index:N; a value that is a
    name of one class and the index of another is refused). A method starting from a folder-trained
    checkpoint inherits its folder and class names. ``saved``: the config.json of the run being
    resumed, whose class keys are indices already (kept as they are). Raises ValueError with the fix."""
    import copy

    from sfd_ddpm.data import class_names
    from sfd_ddpm.folder_data import find_classes

    cfg = copy.deepcopy(cfg)
    d, init = cfg["data"], _init_data(cfg)
    if init is not None and init.get("dataset") == "folder":
        if d["dataset"] != "folder":  # the command line left the dataset alone: the checkpoint's folder
            d["dataset"], d["root"] = "folder", init["root"]
        d["class_names"] = init.get("class_names")
    if d["dataset"] == "folder":
        if d["channels"] != 3:
            raise ValueError(f"data.dataset=folder gives RGB images: set data.channels=3 (got {d['channels']})")
        if cfg["method"] in READS_IMAGES or not d["class_names"]:
            found = find_classes(d["root"])
            if d["class_names"] and d["class_names"] != found:
                raise ValueError(f"data.root {d['root']} holds classes {found} but the run / checkpoint was made "
                                 f"with {d['class_names']}; point data.root at the same class folders")
            if init is None and d["n_classes"] != len(found):
                raise ValueError(f"data.n_classes={d['n_classes']} but {d['root']} holds {len(found)} class "
                                 f"folders ({', '.join(found)}); set data.n_classes={len(found)}")
            d["class_names"] = found
    elif init is None and not _names_given(cfg):
        return cfg  # indices only, and no names they could be confused with: the methods check their ranges
    names = class_names(init if init is not None and d["dataset"] != "folder" else cfg)
    for section, key in CLASS_KEYS:
        # Every value of the keys this method reads (ints too: `sfd.forget=[1]` reaches us as an int where
        # evaluate.py --forget 1 is text, and both must name the same class); other keys only when they name.
        if saved is not None and saved.get(section, {}).get(key) == cfg[section][key]:
            continue
        if (section, key) in USED_KEYS.get(cfg["method"], ()) or _names_given_in(cfg[section][key]):
            cfg[section][key] = _resolve_key(cfg[section][key], names, f"{section}.{key}")
    return cfg


# The class keys of the config, and those each method reads.
CLASS_KEYS = FORGET_KEYS + (("sfd", "override"),)
USED_KEYS = {"sfd": (("sfd", "forget"), ("sfd", "override")), "sid": (("sfd", "forget"),),  # sid forgets nothing
             **{m: (("baseline", "forget"),) for m in ("retrain", "sa", "salun", "esd")}, "vdu": (("vdu", "forget"),)}
OVERRIDE_MODES = ("random", "classifier")


def _resolve_key(value, names: list[str], key: str):
    """A forget list / override (class, {forget: override} mapping or mode) with its classes as indices."""
    from sfd_ddpm.data import resolve_class, resolve_classes

    if key == "sfd.override":
        if isinstance(value, dict):
            return {resolve_class(k, names, "sfd.override forget class"): resolve_class(v, names, "sfd.override class")
                    for k, v in value.items()}
        if value in OVERRIDE_MODES or value is None:
            return value
        return resolve_class(value, names, "sfd.override class")
    return resolve_classes(value if isinstance(value, list) else [value], names, f"{key} class")


def _names_given_in(value) -> bool:
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    flat = value if isinstance(value, list) else [value]
    return any(isinstance(x, str) and x not in OVERRIDE_MODES for x in flat)


def _names_given(cfg) -> bool:
    return any(_names_given_in(cfg[s][k]) for s, k in CLASS_KEYS)


def run(cfg, config_path, outdir, resume_dir, device, changes=None):
    from sfd_ddpm import distributed, run_guard
    from sfd_ddpm.checkpoints import CheckpointError
    from sfd_ddpm.methods import get_method
    from sfd_ddpm.preemption import EXIT_PREEMPTED, Preempted
    from sfd_ddpm.training import NonFiniteLoss, new_run_dir, train

    import torch

    if not resume_dir:
        check_outdir(outdir)
    try:
        cfg = prepare_data(cfg, read_run_config(resume_dir) if resume_dir else None)
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    dist = distributed.init(None if device == "auto" else device)
    torch.manual_seed(cfg["seed"])  # the same initial weights on every rank; train() then seeds seed + rank
    run_dir = Path(resume_dir) if resume_dir else None
    locked = preempted = False
    try:
        if run_dir is not None and dist.is_main:  # before any work: a second writer of this run stops here
            locked = bool(run_guard.lock(run_dir))
        method = get_method(cfg["method"])(cfg, dist)  # checks every input; the run folder comes after
        if run_dir is None and dist.is_main:
            run_dir = new_run_dir(outdir, f"{Path(config_path).stem}")
            locked = bool(run_guard.lock(run_dir))
            dist.print0(f"run directory: {run_dir}")
        if dist.is_main:
            run_guard.remove_stale_temporaries(run_dir)  # left by a killed write
        train(method, method.cfg, run_dir, dist, resume=bool(resume_dir), changes=changes)  # with the architecture it adopted
    except Preempted as stop:  # SIGTERM/SIGUSR1: the state is saved; the job scheduler may requeue us
        if dist.is_main:
            click.echo(f"preempted: {stop}", err=True)
        preempted = True
    except (ValueError, FileNotFoundError, CheckpointError, NonFiniteLoss, C.ConfigError, run_guard.RunLocked) as err:
        raise click.ClickException(str(err)) from None
    except OSError as err:
        raise click.ClickException(f"{err.filename or run_dir}: {err.strerror or err}") from None
    finally:
        if locked:
            run_guard.unlock(run_dir)
        if preempted:
            dist.barrier()  # every rank is done before one exits (torchrun then stops the others)
        distributed.shutdown()
    if preempted:
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
