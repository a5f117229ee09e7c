"""Convert a published SiD-LSG one-step generator pickle into a diffusers UNet folder, once.

  python SD/convert_sid_lsg.py --pkl batch512_cfg4.54.54.5_t625_8380_v2.pkl --out SD/checkpoints/sid-lsg-sd15-cfg4.5-t625

The pickle is read with a restricted unpickler (tensors, plain containers and torch/diffusers network
classes only; anything else is refused by name and nothing from the file runs). The output is
``config.json`` + ``diffusion_pytorch_model.safetensors``: set ``generator_init`` to it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sfd_sd.checkpoints import CheckpointError  # noqa: E402


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--pkl", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="SiD-LSG generator pickle ({'ema': UNet2DConditionModel}).")
@click.option("--out", required=True, type=click.Path(file_okay=False), metavar="DIR", help="Output UNet folder.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder.")
def main(pkl, out, overwrite):
    """Convert a SiD-LSG generator pickle to a diffusers UNet folder (safetensors)."""
    from sfd_sd.sid_lsg import convert

    if Path(out).exists() and not overwrite:
        raise click.ClickException(f"--out {out!r} exists; pass --overwrite to replace it")
    try:
        folder = convert(pkl, out)
    except CheckpointError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {folder} (config.json + safetensors); use generator_init={folder}")


if __name__ == "__main__":
    sys.exit(main())
