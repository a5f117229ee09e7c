#!/usr/bin/env python
"""Diagonal Fisher of a pretrained DDPM's eps-loss on its own samples (Selective Amnesia's F).

Samples --samples images (spread evenly over all classes) from the checkpoint with DDIM, then
F_i = 1/N sum_n (sum_t d l(x_n, t, c_n) / d theta_i)^2 over every --timesteps-stride-th timestep (the
sum scaled to all T), in chunks of --chunk timesteps (sfd_ddpm.fisher.diagonal_fisher). Writes a
safetensors file keyed by parameter name, with its settings as metadata; train.py reads it through
baseline.sa_fisher.

On an EDM (songunet) checkpoint the samples come from EDM's Heun sampler (--steps steps) and each image's
gradient averages over --levels draws of its training levels ln sigma ~ N(P_mean, P_std^2) (the
expectation over the backbone's own noise levels; --timesteps-stride is DDPM-only).

Real scale (SA on CIFAR-10): --samples 1000 or more, --timesteps-stride 1 (all 1000 timesteps); on one
GPU this takes hours, so a stride of 10 is a reasonable approximation.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--ckpt", required=True, type=click.Path(exists=True), help="Pretrained DDPM (network-*.safetensors or run dir).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FISHER.safetensors", help="Output file.")
@click.option("--samples", type=click.IntRange(min=1), default=1000, help="Generated images N (all classes, evenly).")
@click.option("--timesteps-stride", type=click.IntRange(min=1), default=1, help="Use every K-th timestep.")
@click.option("--levels", type=click.IntRange(min=1), default=100,
              help="EDM networks: sigma draws per image (ln sigma ~ N(P_mean, P_std^2)).")
@click.option("--chunk", type=click.IntRange(min=1), default=100, help="Timesteps per backward pass (memory only).")
@click.option("--steps", type=click.IntRange(min=1), default=100, help="DDIM steps for the samples.")
@click.option("--guidance", type=click.FloatRange(min=0), default=0.0, help="Guidance w for the samples.")
@click.option("--network", type=click.Choice(["ema", "net"]), default="ema",
              help="Which weights: ema (default; matches baseline.init_network) or net (raw).")
@click.option("--seed", type=int, default=0, help="Seed of the samples and of the Fisher noise.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto")
def main(ckpt, out, samples, timesteps_stride, levels, chunk, steps, guidance, network, seed, device):
    """Compute the diagonal Fisher for Selective Amnesia (method sa)."""
    import torch
    from safetensors.torch import save_file

    from sfd_ddpm.checkpoints import CheckpointError, file_hash
    from sfd_ddpm.fisher import diagonal_fisher
    from sfd_ddpm.loading import denoiser_for, load_network, resolve_checkpoint
    from sfd_ddpm.samplers import image_seed, sample

    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    try:
        path = resolve_checkpoint(ckpt)
        net, cfg, meta = load_network(path, name=network, device=dev)
    except CheckpointError as err:
        raise click.ClickException(str(err)) from None
    if meta["kind"] != "ddpm":
        raise click.ClickException(f"{path} is a {meta['kind']!r} checkpoint; the Fisher needs a pretrained DDPM")
    den = denoiser_for(net, cfg)
    discrete = "ddim" in den.schedule.samplers  # DDPM timesteps; otherwise EDM's continuous sigma
    if discrete:
        T = cfg["diffusion"]["num_timesteps"]
        if timesteps_stride > T or steps > T:
            raise click.BadParameter(f"must be at most T = {T}", param_hint="--timesteps-stride/--steps")
    elif timesteps_stride != 1:
        raise click.BadParameter("an EDM network has no timesteps; give the number of sigma draws with --levels",
                                 param_hint="--timesteps-stride")
    d = cfg["data"]
    shape = (d["channels"], d["image_size"], d["image_size"])
    labels = torch.arange(samples) % d["n_classes"]
    seeds = [image_seed(seed, int(c), i // d["n_classes"]) for i, c in enumerate(labels.tolist())]
    t0 = time.perf_counter()
    x = torch.cat([sample(den, den.schedule.default_sampler, labels[k:k + 256].to(dev), seeds[k:k + 256], shape, steps=steps,
                          guidance=guidance, clip_x0=True) for k in range(0, samples, 256)])
    net.requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    fisher = diagonal_fisher(den, x, labels.to(dev), timesteps=list(range(0, T, timesteps_stride)) if discrete else None,
                             levels=levels, chunk=chunk, generator=gen, progress=True)
    settings = {"checkpoint": str(path), "checkpoint_sha256": file_hash(path), "network": network,
                "samples": samples, "timesteps_stride": timesteps_stride if discrete else None,
                "levels": None if discrete else levels, "ddim_steps": steps,
                "guidance": guidance, "seed": seed, "seconds": round(time.perf_counter() - t0, 1)}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_file({n: f.contiguous().cpu() for n, f in fisher.items()}, str(out), metadata={"settings": json.dumps(settings)})
    total = sum(float(f.sum()) for f in fisher.values())
    click.echo(f"wrote {out}: {len(fisher)} tensors, sum F = {total:.4g} ({settings['seconds']} s)")


if __name__ == "__main__":
    main()
