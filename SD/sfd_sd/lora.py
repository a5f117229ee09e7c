"""LoRA mode (``adapter=lora``): fake score and generator as frozen UNets with trainable LoRA adapters.

The only module that imports peft, and only when ``adapter=lora`` (imports are inside the functions).

- **Fake score** = the teacher's weights + a trainable adapter (``sfd_fake``). The fake score is a
  second module tree over the *same* weight tensors as the teacher (no copy), with peft's LoRA
  layers injected into that tree only; the teacher tree has no adapter layers, so a teacher call is
  the base model with the adapter off. (One tree with the adapter switched off by a flag around
  teacher calls would be wrong with gradient checkpointing: the teacher's blocks are recomputed in
  backward, after the flag is switched back on, so their gradients would come from the fake score.
  ``tests/test_lora.py`` checks the teacher's input gradient with checkpointing on and off.)
- **Generator** = the generator start (the converted SiD-LSG UNet, or the teacher's weights when
  ``generator_init=teacher``, again shared) frozen + its own adapter (``sfd_generator``).
- Only adapter tensors are trainable (fp32 master weights); Adam, the EMA, the training state and the
  snapshots hold adapter tensors only. peft initialises B = 0, so the adapted networks start exactly
  as the teacher and the generator start.

A generator snapshot in LoRA mode is a folder with ``pytorch_lora_weights.safetensors`` in the layout
diffusers' ``load_lora_weights`` reads (keys ``unet.<module>.lora_A.weight``; rank, alpha and targets in
the file's metadata) and ``sfd_generator.json`` (base model, generator start, t_init).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

FAKE_ADAPTER = "sfd_fake"
GENERATOR_ADAPTER = "sfd_generator"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def lora_config(cfg):
    """peft's LoraConfig for the run's rank, alpha, targets and dropout (B = 0 at init)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.lora_targets),
                      lora_dropout=cfg.lora_dropout, init_lora_weights=True)


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A new module tree whose base parameters and buffers are the *same tensors* as ``module``'s
    (adapter tensors, if any, are copied)."""
    shared = [p for n, p in module.named_parameters() if ".lora_" not in n] + list(module.buffers())
    memo = {id(t): t for t in shared}
    return copy.deepcopy(module, memo)


def add_adapter(module: torch.nn.Module, config, name: str, seed: int) -> list[torch.nn.Parameter]:
    """Inject a LoRA adapter into ``module`` in place; freeze everything else; return the adapter
    parameters (fp32, trainable). ``seed`` fixes peft's random init of A (B is zero)."""
    from peft import inject_adapter_in_model

    targets = set(config.target_modules)
    names = [n for n, _ in module.named_modules()]
    if not any(n == t or n.endswith("." + t) for n in names for t in targets):
        from .config import ConfigError

        raise ConfigError(f"lora_targets {sorted(targets)}: no module of the network has such a name "
                          f"(e.g. {', '.join(names[-3:])})")
    module.requires_grad_(False)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        if hasattr(module, "add_adapter") and hasattr(module, "_hf_peft_config_loaded"):  # a diffusers model
            module.add_adapter(config, adapter_name=name)
        else:
            inject_adapter_in_model(config, module, adapter_name=name)
            module.peft_config = {name: config}
    finally:
        torch.random.set_rng_state(state)
    params = adapter_parameters(module)
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def adapter_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in module.named_parameters() if ".lora_" in n]


def adapter_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by name (no base weight)."""
    return {n: p.detach() for n, p in module.named_parameters() if ".lora_" in n}


@torch.no_grad()
def load_adapter_state(module: torch.nn.Module, state: dict, source: str) -> None:
    own = dict((n, p) for n, p in module.named_parameters() if ".lora_" in n)
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shape = [n for n in own if n in state and tuple(state[n].shape) != tuple(own[n].shape)]
    if missing or extra or shape:
        from .checkpoints import CheckpointError

        raise CheckpointError(f"{source}: the adapter does not match this run's (missing {missing[:2]}, "
                              f"unexpected {extra[:2]}, other shape {shape[:2]}); resume with the run's lora_rank "
                              "and lora_targets")
    for n, p in own.items():
        p.copy_(state[n])


def build_lora_nets(teacher_unet, gen_base, cfg, frozen_dtype: torch.dtype, device, share_generator_base: bool):
    """(teacher, fake score, generator) UNets and the adapter parameters of fake score and generator.

    The teacher and the bases are frozen and stored in ``frozen_dtype``; adapters are fp32."""
    teacher_unet = teacher_unet.to(device, frozen_dtype).requires_grad_(False).eval()
    fake = shared_copy(teacher_unet)
    gen = shared_copy(teacher_unet) if share_generator_base else gen_base.to(device, frozen_dtype)
    config = lora_config(cfg)
    fake_params = add_adapter(fake, config, FAKE_ADAPTER, cfg.seed * 1_000_003 + 1)
    gen_params = add_adapter(gen, config, GENERATOR_ADAPTER, cfg.seed * 1_000_003 + 2)
    return teacher_unet, fake.eval(), gen.eval(), fake_params, gen_params


def ema_copy(gen_unet: torch.nn.Module) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """The generator EMA: the same base tensors, its own (frozen) copy of the adapter."""
    ema = shared_copy(gen_unet)
    for p in ema.parameters():
        p.requires_grad_(False)
    return ema.eval(), adapter_parameters(ema)


# ------------------------------------------------------------------------- diffusers LoRA files
def metadata(cfg_like: dict) -> dict:
    """LoraConfig fields diffusers reads back from the file (rank, alpha, targets)."""
    return dict(r=int(cfg_like["lora_rank"]), lora_alpha=float(cfg_like["lora_alpha"]),
                target_modules=list(cfg_like["lora_targets"]), lora_dropout=0.0, use_dora=False, bias="none",
                init_lora_weights=True)


def save_adapter(gen_unet: torch.nn.Module, folder: Path, cfg_like: dict,
                 adapter_name: str = GENERATOR_ADAPTER) -> None:
    """Write ``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights`` does (keys
    ``unet.<module>.lora_{A,B}.weight``, the LoraConfig in the metadata)."""
    from diffusers import StableDiffusionPipeline
    from peft import get_peft_model_state_dict

    layers = get_peft_model_state_dict(gen_unet, adapter_name=adapter_name)
    layers = {k: v.detach().float().cpu().contiguous() for k, v in layers.items()}
    StableDiffusionPipeline.save_lora_weights(Path(folder), unet_lora_layers=layers, weight_name=LORA_WEIGHTS,
                                              safe_serialization=True, unet_lora_adapter_metadata=metadata(cfg_like))


def is_adapter_folder(path: str | Path) -> bool:
    return (Path(path) / LORA_WEIGHTS).is_file()


def adapter_info(folder: str | Path) -> dict:
    """Rank, alpha, targets and parameter count of an adapter file (from the file, not the run)."""
    from safetensors import safe_open

    path = Path(folder) / LORA_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        n = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys())
    raw = json.loads(meta.get("lora_adapter_metadata") or "{}")  # diffusers: {"unet.r": 4, ...}
    config = {k.removeprefix("unet."): v for k, v in raw.items()}
    return dict(rank=config.get("r"), alpha=config.get("lora_alpha"), targets=config.get("target_modules"),
                parameters=int(n), bytes=path.stat().st_size)


def load_adapter_merged(unet: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """``unet`` with the adapter file of ``folder`` loaded (diffusers' loader, as ``load_lora_weights``)
    and merged into its weights: a plain UNet again, W + (alpha / r) B A per adapted layer."""
    unet.load_lora_adapter(str(folder), prefix="unet", weight_name=LORA_WEIGHTS, adapter_name=GENERATOR_ADAPTER)
    return merge(unet)


@torch.no_grad()
def merge(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every LoRA layer into its base layer and remove the adapter layers (in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, BaseTunerLayer):
            layer.merge()
            parent = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            setattr(parent, name.rsplit(".", 1)[-1], layer.get_base_layer())
    for attr in ("peft_config",):
        if hasattr(module, attr):
            delattr(module, attr)
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False
    return module


def generator_base_of(info: dict, generator_base: str | None, what: str) -> str:
    """The generator start an adapter was trained on: ``generator_base`` if given, else the one its
    ``sfd_generator.json`` names (a folder on the training machine, or 'teacher')."""
    from .models import ModelLoadError

    base = generator_base or info.get("generator_init")
    if base is None:
        raise ModelLoadError(f"{what}: a LoRA adapter without a recorded generator start; give --generator-base DIR "
                             "(the SiD-LSG generator folder it was trained on, or 'teacher')")
    if base != "teacher" and not Path(base).expanduser().is_dir():
        raise ModelLoadError(f"{what}: the adapter was trained on the generator start {base!r}, which is not a folder "
                             "here; give --generator-base DIR (the converted SiD-LSG generator, convert_sid_lsg.py)")
    return base


def load_adapter_generator(folder: str | Path, teacher_unet: torch.nn.Module, generator_base: str) -> torch.nn.Module:
    """The one-step generator of an adapter folder: its generator start + the adapter, merged (fp32)."""
    from .models import load_generator_init

    base = load_generator_init(generator_base, teacher_unet)
    return load_adapter_merged(base, folder)
