"""Read a published SiD-LSG generator pickle without running code from it, and write it as a
diffusers UNet folder (safetensors) once.

SiD-LSG (Zhou et al.) releases its one-step SD generators as pickles of ``{"ema":
UNet2DConditionModel}`` (e.g. ``batch512_cfg4.54.54.5_t625_8380_v2.pkl``, the one SFD fine-tunes:
guidance 4.5, t_init 625, SD v1.5). Unpickling normally imports and calls whatever the file names, so
``RestrictedUnpickler`` resolves only what such a file needs: tensor and parameter rebuilds, plain
containers, torch dtypes, and torch / diffusers ``nn.Module`` classes (plus diffusers' config dict and
attention processors). Anything else is refused with its name before it is called. Storages are read
with ``torch.load(weights_only=True)`` instead of torch's default nested unpickler.

Attention processors hold no weights: they only choose how attention is computed. SiD-LSG's training
enables xformers by default (``--enable_xformers 1``), so its pickles carry ``XFormersAttnProcessor``
objects; those (and the other weightless processors of a UNet2DConditionModel: sliced, added-KV, the
plain ones) are read as diffusers' default processor, by name, without importing xformers. The output
does not depend on them: the converted folder is rebuilt from the config and the weights.
"""
from __future__ import annotations

import importlib
import io
import os
import pickle
import re
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


# Weightless attention processors, by class name (diffusers 0.2x-0.4x); "AddedKV" ones keep their kind.
_PROCESSOR = re.compile(r"(XFormers|Sliced)?Attn(AddedKV)?Processor(2_0|NPU)?")
EXPECTED = ("expected a SiD-LSG generator pickle ({'ema': UNet2DConditionModel}, e.g. "
            "batch512_cfg4.54.54.5_t625_8380_v2.pkl)")


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


def _default_processor(name: str) -> type:
    """diffusers' default processor for an Attention block (SDPA), of the added-KV kind where the name says so."""
    from diffusers.models.attention_processor import AttnAddedKVProcessor2_0, AttnProcessor2_0

    return AttnAddedKVProcessor2_0 if "AddedKV" in name else AttnProcessor2_0


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module.startswith("diffusers.") and _PROCESSOR.fullmatch(name):
            return _default_processor(name)
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
            if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
                return obj
        raise UnsafePickleError(f"refused to load {module}.{name} from the pickle: only tensors, plain containers "
                                "and torch/diffusers network classes are allowed (the file may run code)")


def _not_a_pickle(head: bytes, size: int) -> str | None:
    """What a file that cannot be a SiD-LSG pickle is, judged from its first bytes (None: it may be one)."""
    if size == 0:
        return "an empty file (0 bytes)"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a torch.save checkpoint?)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML page (a failed or redirected download?)"
    return None


def _unreadable(head: bytes, size: int, exc: Exception) -> str:
    """What a file is whose unpickling broke off with ``exc``."""
    if head[:1] != b"\x80":  # pickles of protocol 2 or later start with PROTO
        try:
            head.decode("utf-8")
            return "a text file"
        except UnicodeDecodeError:
            return f"not a pickle (it starts with bytes {head[:8].hex(' ')})"
    return f"a truncated or damaged pickle ({size} bytes; cannot unpickle: {type(exc).__name__}: {exc}; download it again)"


def _unpickle(path: Path):
    with open(path, "rb") as f:
        head, size = f.read(512), os.fstat(f.fileno()).st_size
        what = _not_a_pickle(head, size)
        if what is None:
            f.seek(0)
            try:
                return RestrictedUnpickler(f).load()
            except UnsafePickleError:
                raise
            except Exception as exc:  # noqa: BLE001 - garbage makes the unpickler raise almost any type
                what = _unreadable(head, size, exc)
    raise CheckpointError(f"--pkl {str(path)!r} is {what}; {EXPECTED}")


def load_sid_lsg_pickle(path: str | Path) -> tuple[dict, dict]:
    """(UNet config, state dict) of the ``"ema"`` network in a SiD-LSG pickle, read safely."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"--pkl {str(path)!r}: file not found")
    obj = _unpickle(path)
    net = obj.get("ema") if isinstance(obj, dict) else obj
    if not isinstance(net, torch.nn.Module) or not hasattr(net, "config"):
        raise CheckpointError(f"--pkl {str(path)!r} holds an object of type {type(net).__name__}, not a diffusers network; {EXPECTED}")
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
    save_generator_snapshot(unet, out, info)  # writes sfd_generator.json too, atomically with the weights
    return out
