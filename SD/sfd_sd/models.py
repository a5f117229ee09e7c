"""Loading Stable Diffusion parts and the generator's initial weights.

Everything goes through diffusers/transformers ``from_pretrained``: ``sd_model`` is a hub id
(default ``stable-diffusion-v1-5/stable-diffusion-v1-5``; the ``runwayml`` repository the authors
used was withdrawn) or a local folder with the same layout. Tests build a tiny folder and load it
through exactly this code.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


class ModelLoadError(RuntimeError):
    """A model or checkpoint could not be loaded; the message says what to do."""


@dataclass
class SDParts:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    alphas_cumprod: torch.Tensor  # float64, length num_train_timesteps
    prediction_type: str
    scheduler_config: dict


def check_finite_weights(module_or_state, source: str) -> None:
    """Refuse weights with NaN/inf, naming the tensor (a NaN teacher would otherwise train on garbage)."""
    from .checkpoints import CheckpointError, check_finite

    state = module_or_state.state_dict() if isinstance(module_or_state, torch.nn.Module) else module_or_state
    try:
        check_finite(state, source)
    except CheckpointError as exc:
        raise ModelLoadError(str(exc)) from None


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).exists() or name.count("/") > 1


def check_model_source(sd_model: str, revision: str | None = None) -> None:
    """Fail early and clearly on a local path that does not exist, or on a hub id while the hub is
    unreachable and the model is not in the hub cache (instead of half a minute of retries ending in
    "does not appear to have a file named config.json")."""
    if _looks_local(sd_model):
        if not Path(sd_model).expanduser().is_dir():
            raise ModelLoadError(f"--sd-model {sd_model!r}: local folder not found")
        return
    if _in_hub_cache(sd_model, revision):
        return
    reason = hub_unreachable()
    if reason:
        raise ModelLoadError(
            f"model {sd_model!r}: there is no local folder {str(Path(sd_model).resolve())!r}, and the Hugging Face "
            f"hub is unreachable ({reason}) "
            "with nothing of it in the hub cache. Use a local diffusers folder: sd_model=/path/to/folder "
            f"(generate.py, export.py: --sd-model), made on a machine with network by `hf download {sd_model} "
            "--local-dir /path/to/folder` (SD/README.md, 'Loading models')")


HUB_PROBE_TIMEOUT_S = 5.0


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached now, or None when it answers (any HTTP status)."""
    from huggingface_hub import constants, get_session

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE=1 is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as exc:  # DNS, refused, timeout, proxy: whatever the transport says, there is no hub
        return f"{constants.ENDPOINT} did not answer: {type(exc).__name__}"
    return None


def _in_hub_cache(repo_id: str, revision: str | None) -> bool:
    """Whether some download of this repository sits in the local hub cache; then loading may work
    offline, and from_pretrained itself says what is missing."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())
