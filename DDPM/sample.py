#!/usr/bin/env python
"""Generate class-conditional samples as lossless PNGs named {class:03d}_{index:05d}.png.

Examples (from inside DDPM/):
  python sample.py --ckpt runs/00000-builtin_train --out samples/teacher --classes all --per-class 100 --sampler ddim --steps 50 --guidance 2
  python sample.py --ckpt runs/00001-builtin_sfd --out samples/sfd --classes all --per-class 100 --sampler one_step
  python sample.py --ckpt edm-cifar10-32x32-cond-vp.safetensors --out samples/edm --sampler edm --steps 18
  torchrun --nproc_per_node 8 sample.py --ckpt CKPT --out fid/ --classes 1-9 --per-class 5000 --sampler ddpm

Image (class c, index i) depends only on --seed, c and i: not on the batch size or process count.
Existing files are kept, so an interrupted run can simply be started again.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--ckpt", required=True, type=click.Path(exists=True), metavar="PATH",
              help="A network-*.safetensors file or a run directory (its newest snapshot).")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Output folder.")
@click.option("--classes", default="all", help="Classes to generate: 'all', '0,3,5' or '1-9'.")
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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def main(ckpt, out, classes, per_class, sampler, steps, eta, guidance, clip_x0, seed, batch, no_ema, device):
    """Sample images from a pretrained DDPM or an SFD/SiD one-step generator."""
    import torch
    from tqdm import tqdm

    from sfd_ddpm import distributed
    from sfd_ddpm.checkpoints import CheckpointError, file_hash
    from sfd_ddpm.images import image_name, save_images
    from sfd_ddpm.diffusion import NoGuidance, check_guidance
    from sfd_ddpm.loading import denoiser_for, load_network, parse_classes, resolve_checkpoint
    from sfd_ddpm.samplers import image_seed, nfe, sample

    dist = distributed.init(None if device == "auto" else device)
    try:
        path = resolve_checkpoint(ckpt)
        net, cfg, meta = load_network(path, device=dist.device, use_ema=not no_ema)
        class_list = parse_classes(classes, cfg["data"]["n_classes"])
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
    out = Path(out)
    todo = [(c, i) for c in class_list for i in range(per_class) if not (out / image_name(c, i)).exists()]
    mine = todo[dist.rank::dist.world_size]
    d = cfg["data"]
    shape = (d["channels"], d["image_size"], d["image_size"])
    t_init = denoiser.schedule.generator_level(cfg["sfd"])
    start = time.perf_counter()
    for k in tqdm(range(0, len(mine), batch), disable=not dist.is_main, desc=f"sampling ({sampler})", unit="batch"):
        chunk = mine[k:k + batch]
        labels = torch.tensor([c for c, _ in chunk], device=dist.device)
        seeds = [image_seed(seed, c, i) for c, i in chunk]
        x = sample(denoiser, sampler, labels, seeds, shape, steps=steps, eta=eta, guidance=guidance, t_init=t_init,
                   clip_x0=clip_x0)
        save_images(x, [c for c, _ in chunk], [i for _, i in chunk], out)
    seconds = time.perf_counter() - start
    dist.barrier()
    if dist.is_main:
        settings = {"checkpoint": str(path), "checkpoint_sha256": file_hash(path), "kind": meta["kind"],
                    "step": meta["step"], "ema": not no_ema, "classes": class_list, "per_class": per_class,
                    "sampler": sampler, "steps": steps if sampler in ("ddim", "edm") else None, "eta": eta if sampler == "ddim" else None,
                    "guidance": guidance, "clip_x0": clip_x0 if sampler != "one_step" else None, "t_init": t_init if sampler == "one_step" else None, "seed": seed,
                    "nfe_per_image": nfe(sampler, steps, guidance, cfg["diffusion"]["num_timesteps"]),
                    "generated_now": len(todo), "seconds_rank0": seconds,
                    "images_per_s_rank0": len(mine) / seconds if mine and seconds > 0 else None}
        (out / "settings.json").write_text(json.dumps(settings, indent=2))
        click.echo(f"wrote {len(todo)} images to {out} ({len(class_list) * per_class - len(todo)} already there)")
    distributed.shutdown()


if __name__ == "__main__":
    main()
