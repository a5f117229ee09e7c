"""Turn a weights file into a ready-to-sample denoiser (pretrained DDPM or SFD/SiD generator)."""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoints import CheckpointError, load_into, load_weights
from .diffusion import Denoiser, schedule_of
from .networks import build_network

# Which network of a weights file to sample from: (with EMA, without EMA) per kind.
DEFAULT_NETWORK = {"ddpm": ("ema", "net"), "sfd": ("generator_ema", "generator")}


def resolve_checkpoint(path) -> Path:
    """A weights file, or a run directory (its newest network-*.safetensors)."""
    path = Path(path)
    if path.is_dir():
        from .training import latest_weights
        return latest_weights(path)
    return path


def load_network(path, name: str | None = None, device="cpu", use_ema: bool = True):
    """Return (network in eval mode, config, metadata) for network ``name`` of a weights file."""
    path = resolve_checkpoint(path)
    nets, meta = load_weights(path)
    cfg = meta["config"]
    if name is None:
        pair = DEFAULT_NETWORK.get(meta["kind"])
        if pair is None:
            raise CheckpointError(f"{path} has unknown kind {meta['kind']!r}")
        name = pair[0] if use_ema else pair[1]
    if name not in nets:
        raise CheckpointError(f"{path} holds networks {sorted(nets)}, not {name!r}")
    net = build_network(cfg)
    load_into(net, nets[name], f"{path} [{name}]")
    net.to(device).eval().requires_grad_(False)
    return net, cfg, meta


def denoiser_for(net, cfg: dict) -> Denoiser:
    return Denoiser(net, schedule_of(cfg), net.null_label)


def parse_classes(text: str, n_classes: int) -> list[int]:
    """'all', '0,3,5' or '0-4'; every class must lie in [0, n_classes)."""
    if text.strip() == "all":
        return list(range(n_classes))
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part:
                lo, hi = (int(v) for v in part.split("-"))
                out += list(range(lo, hi + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"cannot parse class list {text!r} (use e.g. 0,3,5 or 1-9 or all)") from None
    bad = [c for c in out if not 0 <= c < n_classes]
    if bad:
        raise ValueError(f"class {bad[0]} is out of range [0, {n_classes - 1}]")
    return out


@torch.no_grad()
def device_of(net) -> torch.device:
    return next(net.parameters()).device
