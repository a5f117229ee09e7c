#!/usr/bin/env python
"""Convert an NVIDIA EDM (or SiD) network pickle into a safetensors checkpoint of this project.

Examples (from inside DDPM/):
  python convert_edm.py --pkl edm-cifar10-32x32-cond-vp.pkl --out edm-cifar10-32x32-cond-vp.safetensors
  python convert_edm.py --pkl sid-cifar10-cond-generator.pkl --out sid-cifar10-cond.safetensors --role generator

Where to get the files: NVIDIA's pretrained EDM networks are listed in the README of
https://github.com/NVlabs/edm ("Pre-trained models"), e.g.
https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl (class-conditional
CIFAR-10, DDPM++ trained with EDM's preconditioning and loss, FID 1.79; the converter reads the
preconditioning class from the file); SiD's one-step generators are linked from the
README of https://github.com/mingyuanzhou/SiD.

The pickles are read with a restricted unpickler (sfd_ddpm/edm_pickle.py): only tensors, plain
containers and the persistence records are accepted, the Python source that NVIDIA's
torch_utils.persistence embeds in them is never executed, and anything else is refused by name.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

PRECOND = {"VPPrecond": "vp", "EDMPrecond": "edm"}
# DDPM++ (what our SongUNet implements); other SongUNet settings (NCSN++) are refused
DDPMPP = {"embedding_type": "positional", "encoder_type": "standard", "decoder_type": "standard",
          "channel_mult_noise": 1, "resample_filter": [1, 1], "channel_mult_emb": 4}


def config_of(net_record, dataset: str, role: str, sigma_init: float) -> dict:
    """Our resolved config for the network in the pickle (DDPM++ SongUNet, VP or EDM preconditioning)."""
    from sfd_ddpm import config as C
    from sfd_ddpm.edm_pickle import init_kwargs
    from sfd_ddpm.networks_edm import VP_BETA_D, VP_BETA_MIN, VP_M

    if net_record.class_name not in PRECOND:
        raise ValueError(f"the network is a {net_record.class_name}; only VPPrecond and EDMPrecond networks "
                         f"(DDPM++ SongUNet) can be converted")
    outer = init_kwargs(net_record)
    model = net_record.state.get("_modules", {}).get("model")
    if model is None or model.class_name != "SongUNet":
        found = None if model is None else model.class_name
        raise ValueError(f"the preconditioned model is {found!r}; only SongUNet (DDPM++) is supported")
    inner = {**outer, **init_kwargs(model)}
    for key, want in DDPMPP.items():
        got = inner.get(key, want)
        if (list(got) if isinstance(want, list) else got) != want:
            raise ValueError(f"the SongUNet has {key}={got!r}; only DDPM++ ({key}={want!r}) is supported")
    if PRECOND[net_record.class_name] == "vp":
        got = (outer.get("beta_d", VP_BETA_D), outer.get("beta_min", VP_BETA_MIN), outer.get("M", VP_M))
        if tuple(float(v) for v in got) != (VP_BETA_D, VP_BETA_MIN, VP_M):
            raise ValueError(f"VPPrecond with beta_d, beta_min, M = {got}; only the defaults "
                             f"{(VP_BETA_D, VP_BETA_MIN, VP_M)} are supported")
    label_dim = int(inner.get("label_dim", 0))
    cfg = C.load_config(None)
    cfg["method"] = "pretrain" if role == "teacher" else "sid"
    cfg["data"].update(dataset=dataset, image_size=int(inner["img_resolution"]), channels=int(inner["img_channels"]),
                       n_classes=label_dim or 10)
    cfg["model"].update(arch="songunet", base_channels=int(inner.get("model_channels", 128)),
                        channel_mult=[int(v) for v in inner.get("channel_mult", [1, 2, 2, 2])],
                        layers_per_block=int(inner.get("num_blocks", 4)),
                        attn_resolutions=[int(v) for v in inner.get("attn_resolutions", [16])],
                        dropout=float(inner.get("dropout", 0.10)), augment_dim=int(inner.get("augment_dim", 0)),
                        conditional=label_dim > 0, null_class=float(inner.get("label_dropout", 0)) > 0)
    cfg["edm"].update(precond=PRECOND[net_record.class_name], sigma_data=float(outer.get("sigma_data", 0.5)))
    cfg["sfd"]["sigma_init"] = sigma_init
    return cfg


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--pkl", required=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="NVIDIA EDM or SiD network pickle (torch_utils.persistence format).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.safetensors",
              help="Where to write the converted weights (config embedded).")
@click.option("--network", default="ema", help="Which entry of the pickle's dict to convert.")
@click.option("--role", type=click.Choice(["teacher", "generator"]), default="teacher",
              help="teacher = a diffusion model (sfd.init of SFD/SiD, sample.py --sampler edm); generator = a SiD "
                   "one-step generator (sample.py --sampler one_step).")
@click.option("--dataset", type=click.Choice(["cifar10", "stl10", "mnist", "builtin"]), default="cifar10",
              help="The dataset the network was trained on (recorded in the config for evaluation).")
@click.option("--sigma-init", type=click.FloatRange(min=0, min_open=True), default=2.5,
              help="--role generator: the generator's noise level sigma_init (SiD: 2.5).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
def main(pkl, out, network, role, dataset, sigma_init, overwrite):
    """Convert an EDM/SiD network pickle to safetensors without executing any code from it."""
    from sfd_ddpm.checkpoints import CheckpointError, load_into, save_weights
    from sfd_ddpm.edm_pickle import UnsafePickle, load_pickle, network_of, state_dict
    from sfd_ddpm.networks import build_network, count_parameters

    if Path(out).exists() and not overwrite:
        raise click.ClickException(f"--out {out!r} exists; pass --overwrite to replace it")
    try:
        record = network_of(load_pickle(pkl), network, pkl)
        try:
            cfg = config_of(record, dataset, role, sigma_init)
        except ValueError as err:
            raise ValueError(f"{pkl} [{network}]: {err}") from None
        net = build_network(cfg)
        load_into(net, state_dict(record), f"{pkl} [{network}]")
    except (UnsafePickle, ValueError, CheckpointError, OSError) as err:
        raise click.ClickException(str(err)) from None
    name, kind = ("ema", "ddpm") if role == "teacher" else ("generator_ema", "sfd")
    save_weights(out, {name: net.state_dict()}, cfg, 0, kind)
    click.echo(f"wrote {out}: {cfg['model']['arch']} ({count_parameters(net) / 1e6:.2f}M parameters, "
               f"{cfg['edm']['precond']} preconditioning, {cfg['data']['n_classes']} classes, "
               f"null class: {cfg['model']['null_class']}) as {kind} network '{name}'")


if __name__ == "__main__":
    main()
