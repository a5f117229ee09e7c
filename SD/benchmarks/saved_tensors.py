#!/usr/bin/env python
"""Bytes a UNet forward keeps for backward (activations and autocast weight copies), on any device.

Counts the storages autograd saves during one forward of the SD v1.5 UNet (random weights, config in
``benchmarks/sd15_unet_config.json``) under bf16 autocast, with a saved-tensor hook; the module's own
parameters are not counted. Three cases, as SFD runs its nets in the generator step:

  trainable_fp32  fp32 weights that need gradients (the generator): bf16 weight copies + activations
  frozen_fp32     fp32 weights without gradients, input needs gradients (the fake score): the same
  frozen_bf16     weights stored in bf16 (the teacher): activations only

The README's memory plan uses these numbers (CPU count: it needs no GPU; kernels differ slightly).

  python benchmarks/saved_tensors.py --latent 64            # 512 px, one sample (~1 min per case on one CPU core)
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

SD_DIR = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = SD_DIR / "benchmarks" / "sd15_unet_config.json"
GIB = 2**30


def saved_bytes(unet: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor,
                amp_dtype: torch.dtype | None) -> int:
    """Bytes of the distinct storages autograd saves in one forward, the module's parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in unet.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    autocast = torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), autocast:
        unet(x, t, encoder_hidden_states=emb, return_dict=False)
    return sum(seen.values())


def build_unet(config: dict, device, case: str):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    unet.set_attn_processor(AttnProcessor2_0())
    if case == "frozen_bf16":
        unet = unet.to(torch.bfloat16)
    return unet.requires_grad_(case == "trainable_fp32")


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--unet-config", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_CONFIG))
@click.option("--latent", type=click.IntRange(min=8), default=64, help="Latent size (image size / 8).")
@click.option("--batch", type=click.IntRange(min=1), default=1)
@click.option("--cases", default="trainable_fp32,frozen_fp32,frozen_bf16", help="Comma-separated cases.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
def main(unet_config, latent, batch, cases, device):
    """Print, per case, the GiB one UNet forward keeps for backward (JSON)."""
    config = {k: v for k, v in json.loads(Path(unet_config).read_text()).items() if not k.startswith("_")}
    out = {"latent": latent, "batch": batch}
    for case in cases.split(","):
        torch.manual_seed(0)
        unet = build_unet(config, device, case)
        n = sum(p.numel() for p in unet.parameters())
        x = torch.randn(batch, config["in_channels"], latent, latent, device=device, requires_grad=True)
        emb = torch.randn(batch, 77, config["cross_attention_dim"], device=device)
        t = torch.full((batch,), 500, device=device)
        got = saved_bytes(unet, x, t, emb, torch.bfloat16)
        out[case] = dict(saved_gib=got / GIB, bf16_weight_copy_gib=2 * n / GIB)
        click.echo(json.dumps({case: out[case]}), err=True)
        del unet
    click.echo(json.dumps(out, indent=2))


if __name__ == "__main__":
    sys.exit(main())
