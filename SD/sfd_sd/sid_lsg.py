"""Read a published SiD-LSG generator pickle without running code from it, and write it as a
diffusers UNet folder (safetensors) once.

SiD-LSG (Zhou et al.) releases its one-step SD generators as pickles of ``{"ema":
UNet2DConditionModel}`` (e.g. ``batch512_cfg4.54.54.5_t625_8380_v2.pkl``, the one SFD fine-tunes:
guidance 4.5, t_init 625, SD v1.5). Unpickling normally imports and calls whatever the file names, so
``RestrictedUnpickler`` resolves only what such a file needs: tensor and parameter rebuilds, plain
containers, torch dtypes, and torch / diffusers ``nn.Module`` classes (plus diffusers' config dict and
attention processors). Anything else is refused with its name before it is called. Storages are read
with ``torch.load(weights_only=True)`` instead of torch's default nested unpickler.
"""
from __future__ import annotations

import importlib
import io
import json
import pickle
from pathlib import Path

import torch

from .checkpoints import CheckpointError, check_finite

_SAFE = {
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("diffusers.configuration_utils", "FrozenDict"),
}
# Classes of older diffusers releases (SiD-LSG files were written with 0.27) -> what they are now.
_RENAMED = {"LoRACompatibleConv": torch.nn.Conv2d, "LoRACompatibleLinear": torch.nn.Linear}


class UnsafePickleError(CheckpointError):
    """The pickle names something outside the allow-list; nothing from it was called."""


def _load_storage_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=True)


def _diffusers_class(module: str, name: str):
    """The class in the installed diffusers, also when it moved since the file was written."""
    candidates = [module]
    tail = module.rsplit(".", 1)[-1]
    candidates += [f"diffusers.models.unets.{tail}", f"diffusers.models.transformers.{tail}",
                   "diffusers.models.attention_processor", "diffusers.models.attention", "diffusers.models.resnet",
                   "diffusers.models.embeddings", "diffusers.models.activations"]
    for cand in candidates:
        try:
            obj = getattr(importlib.import_module(cand), name, None)
        except ImportError:
            continue
        if obj is not None:
            return obj
    return None


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _SAFE:
            return super().find_class(module, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_bytes
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("diffusers.") and name in _RENAMED:
            return _RENAMED[name]
        if module.startswith("torch.nn.modules.") or module.startswith("diffusers."):
            obj = (_diffusers_class(module, name) if module.startswith("diffusers.")
                   else getattr(importlib.import_module(module), name, None))
            if isinstance(obj, type) and (issubclass(obj, torch.nn.Module) or
                                          (module.startswith("diffusers.") and name.startswith("AttnProcessor"))):
                return obj
        raise UnsafePickleError(f"refused to load {module}.{name} from the pickle: only tensors, plain containers "
                                "and torch/diffusers network classes are allowed (the file may run code)")


def load_sid_lsg_pickle(path: str | Path) -> tuple[dict, dict]:
    """(UNet config, state dict) of the ``"ema"`` network in a SiD-LSG pickle, read safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--pkl {str(path)!r}: file not found")
    try:
        with open(path, "rb") as f:
            obj = RestrictedUnpickler(f).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or not a pickle
        raise CheckpointError(f"--pkl {str(path)!r}: cannot unpickle ({type(exc).__name__}: {exc})") from exc
    net = obj.get("ema") if isinstance(obj, dict) else obj
    if not isinstance(net, torch.nn.Module) or not hasattr(net, "config"):
        raise CheckpointError(f"--pkl {str(path)!r}: expected {{'ema': UNet2DConditionModel}}, found "
                              f"{type(net).__name__}")
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    state = {k: v.detach().float().contiguous() for k, v in net.state_dict().items()}
    check_finite(state, f"--pkl {str(path)!r}")
    return config, state


def convert(pkl: str | Path, out: str | Path, source_note: str | None = None) -> Path:
    """Write the SiD-LSG generator as a diffusers UNet folder (config.json + safetensors)."""
    from diffusers import UNet2DConditionModel

    from .checkpoints import save_generator_snapshot

    config, state = load_sid_lsg_pickle(pkl)
    unet = UNet2DConditionModel.from_config(config)
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"--pkl {str(pkl)!r}: weights do not fit a UNet2DConditionModel built from its config "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = dict(converted_from=Path(pkl).name, note=source_note or "SiD-LSG generator ('ema'), converted by "
                "convert_sid_lsg.py")
    save_generator_snapshot(unet, out, info)
    (out / "sfd_generator.json").write_text(json.dumps(info, indent=2) + "\n")
    return out
