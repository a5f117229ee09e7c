#!/usr/bin/env python
"""Generate class-conditional samples as lossless PNGs named {class:03d}_{index:05d}.png.

Examples (from inside DDPM/):
  python sample.py --ckpt runs/00000-builtin_train --out samples/teacher --classes all --per-class 100 --sampler ddim --steps 50 --guidance 2
  python sample.py --ckpt runs/00001-builtin_sfd --out samples/sfd --classes all --per-class 100 --sampler one_step
  python sample.py --ckpt edm-cifar10-32x32-cond-vp.safetensors --out samples/edm --sampler edm --steps 18
  torchrun --nproc_per_node 8 sample.py --ckpt CKPT --out fid/ --classes 1-9 --per-class 5000 --sampler ddpm

Image (class c, index i) has its own noise stream, seeded from --seed, c and i: its noise draws are
bit-identical whatever the batch size or process count, and its pixels agree within one 8-bit level
(float kernels round differently for different batch shapes). Each PNG is written under a temporary
name and renamed when complete, and existing files are kept, so an interrupted run can simply be
started again; on a restart the newest images are decoded fully and any that are cut short (by a
kill under an earlier version, or a file system that lost data) are made again. settings.json says
"complete": false until every image is there, and evaluate.py refuses such a folder. A folder holds
the images of one checkpoint and one set of sampler settings (its settings.json): adding to a folder
written with others is refused, and --overwrite deletes its images first.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))


def plan(class_list, per_class: int, done, rank: int, world_size: int) -> list[tuple[int, int]]:
    """The (class, index) pairs this rank generates: every missing image once, dealt round-robin."""
    todo = [(c, i) for c in class_list for i in range(per_class) if (c, i) not in done]
    return todo[rank::world_size]


def class_list_of(text: str, cfg: dict) -> tuple[list[int], list[str] | None]:
    """(class indices, the model's class names or None) for --classes given by index or by name."""
    from sfd_ddpm.data import class_names, resolve_classes

    n = cfg["data"]["n_classes"]
    try:
        names = class_names(cfg)
    except (ValueError, KeyError):  # e.g. a folder model whose folder is not on this machine
        names = None
    if names is not None and len(names) != n:  # a model trained on a subset of a dataset's labels
        names = None
    return resolve_classes(text, names or [str(i) for i in range(n)], "--classes class"), names


# A kill cuts short only the files being written when it lands (one per process), i.e. the newest ones.
VERIFY_NEWEST = 256

PROVENANCE_KEYS = ("checkpoint_sha256", "kind", "step", "ema", "sampler", "steps", "eta", "guidance", "clip_x0",
                   "t_init", "seed")


def images_per_class(out: Path) -> dict[str, int]:
    from sfd_ddpm.images import parse_name

    counts: dict[str, int] = {}
    for p in sorted(out.glob("*.png")):
        if (parsed := parse_name(p.name)) is not None:
            counts[str(parsed[0])] = counts.get(str(parsed[0]), 0) + 1
    return counts


def write_settings(out: Path, settings: dict) -> None:
    from sfd_ddpm.checkpoints import atomic_write

    atomic_write(out / "settings.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))


def remove_broken_images(pngs: list[Path], n: int = VERIFY_NEWEST) -> list[str]:
    """Delete those of the ``n`` newest images (by modification time) that do not decode fully, so that they
    are made again; -> 'name: problem' for each."""
    from sfd_ddpm.images import image_problem

    broken = []
    for p in sorted(pngs, key=lambda q: q.stat().st_mtime_ns)[-n:]:
        problem = image_problem(p)
        if problem is not None:
            p.unlink()
            broken.append(f"{p.name} {problem}")
    return broken


def prepare_folder(out: Path, provenance: dict, overwrite: bool, dist) -> list[str]:
    """Make ``out`` ready for images of ``provenance`` before any sampling: refuse a folder whose
    images came from another checkpoint or other settings (unless ``overwrite``: then delete them),
    create it, prove it writable and record the provenance in settings.json straight away, so the
    folder's settings.json describes its images even if this run is killed. Images left cut short by an
    earlier run are deleted (to be made again); -> their names and problems (rank 0)."""
    from sfd_ddpm.images import parse_name

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; choose another --out")
    pngs = [p for p in out.glob("*.png") if parse_name(p.name)] if out.is_dir() else []
    settings_file = out / "settings.json"
    old = None
    if settings_file.is_file():
        try:
            old = json.loads(settings_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
    if not overwrite and pngs:  # without images there is nothing to mislabel
        if old is None:
            raise ValueError(f"--out {out} holds {len(pngs)} images but no settings.json, so their checkpoint and "
                             f"settings are unknown; use another --out or --overwrite to delete them")
        changed = [k for k in PROVENANCE_KEYS if old.get(k) != provenance[k]]
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {provenance[k]!r}" for k in changed)
            raise ValueError(f"--out {out} holds images made with another checkpoint or settings ({detail}); "
                             f"use another --out, or --overwrite to delete them and start clean")
    dist.barrier()  # every rank has checked the folder before rank 0 changes it
    if dist.is_main:
        if overwrite:
            for p in pngs:
                p.unlink()
            settings_file.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        from sfd_ddpm.checkpoints import remove_stale_temporaries
        remove_stale_temporaries(out)
        broken = [] if overwrite else remove_broken_images(pngs)
        kept = old if old and pngs and not overwrite else {}
        write_settings(out, {**kept, **provenance, "images_per_class": images_per_class(out), "complete": False})
    dist.barrier()
    return broken if dist.is_main else []


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--ckpt", required=True, type=click.Path(exists=True), metavar="PATH",
              help="A network-*.safetensors file or a run directory (its newest snapshot).")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Output folder.")
@click.option("--classes", default="all",
              help="Classes to generate: 'all', '0,3,5', '1-9' or class names ('cat,dog': folder names for "
                   "data.dataset=folder models); name:X / index:N force one reading, and a value that names one "
                   "class and indexes another (folders named 1, 2, 3) is refused.")
@click.option("--per-class", type=click.IntRange(min=1), default=10, help="Images per class.")
@click.option("--sampler", type=click.Choice(["ddpm", "ddim", "one_step", "edm"]), default=None,
              help="ddpm = 1000-step ancestral, ddim, one_step = SFD/SiD generator, edm = EDM's Heun sampler "
                   "(EDM networks). [default: one_step for SFD/SiD checkpoints, else ddim (DDPM) or edm (EDM)]")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="DDIM steps, or EDM Heun steps (2 * steps - 1 evaluations). [default: 100 DDIM, 18 EDM]")
@click.option("--eta", type=click.FloatRange(min=0), default=0.0, help="DDIM eta (1 = ancestral noise).")
@click.option("--guidance", type=click.FloatRange(min=0), default=0.0,
              help="Classifier-free guidance w: eps = (1+w) eps(x,c) - w eps(x,null).")
@click.option("--clip-x0", is_flag=True, help="Clamp the denoised estimate to [-1, 1] at every step (ddpm/ddim).")
@click.option("--seed", type=int, default=0, help="Base seed of the per-image noise streams.")
@click.option("--batch", type=click.IntRange(min=1), default=256, help="Images per forward pass (per process).")
@click.option("--no-ema", is_flag=True, help="Sample from the raw weights instead of the EMA.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", help="auto = CUDA when available.")
@click.option("--overwrite", is_flag=True,
              help="Delete the images and settings.json already in --out first (needed when they were made "
                   "by another checkpoint or with other settings).")
def main(ckpt, out, classes, per_class, sampler, steps, eta, guidance, clip_x0, seed, batch, no_ema, device, overwrite):
    """Sample images from a pretrained DDPM or an SFD/SiD one-step generator."""
    import torch
    from tqdm import tqdm

    from sfd_ddpm import distributed
    from sfd_ddpm.checkpoints import CheckpointError, file_hash
    from sfd_ddpm.diffusion import NoGuidance, check_guidance
    from sfd_ddpm.images import NonFiniteImages, image_name, save_images
    from sfd_ddpm.loading import denoiser_for, load_network, resolve_checkpoint
    from sfd_ddpm.samplers import image_seed, nfe, sample

    dist = distributed.init(None if device == "auto" else device)
    try:
        path = resolve_checkpoint(ckpt)
        net, cfg, meta = load_network(path, device=dist.device, use_ema=not no_ema)
        class_list, names = class_list_of(classes, cfg)
        check_guidance(net.null_label, guidance)
    except NoGuidance as err:
        raise click.ClickException(f"{err} (--guidance 0)") from None
    except (CheckpointError, ValueError) as err:
        raise click.ClickException(str(err)) from None
    denoiser = denoiser_for(net, cfg)
    sampler = sampler or ("one_step" if meta["kind"] == "sfd" else denoiser.schedule.default_sampler)
    if sampler not in denoiser.schedule.samplers:
        raise click.ClickException(f"--sampler {sampler} does not fit {path} (an {cfg['model'].get('arch', 'unet2d')} "
                                   f"network); use one of {', '.join(denoiser.schedule.samplers)}")
    steps = steps or (18 if sampler == "edm" else 100)
    if sampler == "one_step" and meta["kind"] != "sfd":
        raise click.ClickException(f"{path} is a pretrained DDPM; one_step needs an SFD/SiD checkpoint")
    if sampler != "one_step" and meta["kind"] == "sfd":
        raise click.ClickException(f"{path} is a one-step generator; use --sampler one_step")
    t_init = denoiser.schedule.generator_level(cfg["sfd"])  # t* (DDPM) or sigma_init (EDM)
    provenance = {"checkpoint_sha256": file_hash(path), "kind": meta["kind"], "step": meta["step"], "ema": not no_ema,
                  "sampler": sampler, "steps": steps if sampler in ("ddim", "edm") else None,
                  "eta": eta if sampler == "ddim" else None, "guidance": guidance,
                  "clip_x0": clip_x0 if sampler != "one_step" else None,
                  "t_init": t_init if sampler == "one_step" else None, "seed": seed}
    out = Path(out)
    try:
        broken = prepare_folder(out, provenance, overwrite, dist)
    except OSError as err:
        raise click.ClickException(f"cannot write to --out {out}: {err.strerror or err}; choose a writable folder") from None
    except ValueError as err:
        raise click.ClickException(str(err)) from None
    for problem in broken:
        click.echo(f"WARNING: {out / problem}; deleted, it is made again", err=True)
    done = {(c, i) for c in class_list for i in range(per_class) if (out / image_name(c, i)).exists()}
    n_todo = len(class_list) * per_class - len(done)
    mine = plan(class_list, per_class, done, dist.rank, dist.world_size)
    d = cfg["data"]
    shape = (d["channels"], d["image_size"], d["image_size"])
    start = time.perf_counter()
    for k in tqdm(range(0, len(mine), batch), disable=not dist.is_main, desc=f"sampling ({sampler})", unit="batch"):
        chunk = mine[k:k + batch]
        labels = torch.tensor([c for c, _ in chunk], device=dist.device)
        seeds = [image_seed(seed, c, i) for c, i in chunk]
        x = sample(denoiser, sampler, labels, seeds, shape, steps=steps, eta=eta, guidance=guidance, t_init=t_init,
                   clip_x0=clip_x0)
        try:
            save_images(x, [c for c, _ in chunk], [i for _, i in chunk], out)
        except NonFiniteImages as err:
            raise click.ClickException(f"{path}: {err}") from None
    seconds = time.perf_counter() - start
    dist.barrier()
    if dist.is_main:
        settings = {"checkpoint": str(path), **provenance, "classes": class_list, "class_names": names,
                    "per_class": per_class,
                    "images_per_class": images_per_class(out), "complete": True,
                    "nfe_per_image": nfe(sampler, steps, guidance, cfg["diffusion"]["num_timesteps"]),
                    "generated_now": n_todo, "seconds_rank0": seconds,
                    "images_per_s_rank0": len(mine) / seconds if mine and seconds > 0 else None}
        write_settings(out, settings)
        click.echo(f"wrote {n_todo} images to {out} ({len(done)} already there)")
    distributed.shutdown()


if __name__ == "__main__":
    main()
