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


def check_model_source(sd_model: str) -> None:
    """Fail early and clearly on a local path that does not exist, or on a hub id while the hub is
    unreachable and the model is not in the hub cache (instead of half a minute of retries ending in
    "does not appear to have a file named config.json")."""
    if _looks_local(sd_model):
        if not Path(sd_model).expanduser().is_dir():
            raise ModelLoadError(f"--sd-model {sd_model!r}: local folder not found")
        return
    if _in_hub_cache(sd_model):
        return
    reason = hub_unreachable()
    if reason:
        raise ModelLoadError(
            f"model {sd_model!r}: there is no local folder {str(Path(sd_model).resolve())!r}, and the Hugging Face "
            f"hub is unreachable ({reason}) with nothing of it in the hub cache. Use a local diffusers folder: sd_model=/path/to/folder "
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


def _in_hub_cache(repo_id: str) -> bool:
    """Whether some download of this repository sits in the local hub cache; then loading may work
    offline, and from_pretrained itself says what is missing."""
    from huggingface_hub import constants

    snapshots = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def load_error(what: str, sd_model: str, revision: str | None, exc: Exception) -> ModelLoadError:
    """The message for a model that neither a local folder nor the hub provided (names both)."""
    where = ("" if Path(sd_model).expanduser().exists() else
             f"there is no local folder {str(Path(sd_model).expanduser().resolve())!r}, and as a hub id: ")
    return ModelLoadError(f"could not load {what} from {sd_model!r} (revision {revision!r}): "
                          f"{where}{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")


def load_sd_parts(sd_model: str = DEFAULT_SD_MODEL, revision: str | None = None,
                  load_vae: bool = True, load_unet: bool = True) -> SDParts:
    """Tokenizer, text encoder, VAE, UNet and noise schedule of an SD v1-style model (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_source(sd_model)
    kw = dict(revision=revision)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(sd_model, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(sd_model, subfolder="text_encoder", **kw)
        unet = UNet2DConditionModel.from_pretrained(sd_model, subfolder="unet", **kw) if load_unet else None
        vae = AutoencoderKL.from_pretrained(sd_model, subfolder="vae", **kw) if load_vae else None
        # Only the betas matter here; SD v1.5 ships a PNDM config, which DDPMScheduler accepts.
        sched_cfg = DDPMScheduler.load_config(sd_model, subfolder="scheduler", **kw)
    except (OSError, ValueError) as exc:
        raise load_error("Stable Diffusion parts", sd_model, revision, exc) from exc
    scheduler = DDPMScheduler.from_config(sched_cfg)
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        if module is not None:
            check_finite_weights(module, f"{sd_model} {name}")
    text_encoder.requires_grad_(False).eval()
    if unet is not None:
        unet.requires_grad_(False).eval()
    if vae is not None:
        vae.requires_grad_(False).eval()
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ModelLoadError(f"unsupported prediction_type {prediction_type!r} (need epsilon or v_prediction)")
    return SDParts(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet,
                   alphas_cumprod=scheduler.alphas_cumprod.double(), prediction_type=prediction_type,
                   scheduler_config=dict(sched_cfg))


def _check_same_architecture(state: dict, reference: torch.nn.Module, source: str) -> None:
    ref = reference.state_dict()
    missing = sorted(set(ref) - set(state))
    unexpected = sorted(set(state) - set(ref))
    bad_shape = [k for k in ref if k in state and tuple(state[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or bad_shape:
        raise ModelLoadError(
            f"{source}: weights do not match the teacher UNet's architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {bad_shape[:3]})")


def load_generator_init(init: str, teacher_unet: torch.nn.Module) -> torch.nn.Module:
    """The generator's starting UNet (a new module, fp32, CPU).

    ``init`` is ``"teacher"`` (copy of the teacher UNet) or a diffusers UNet folder (``config.json``
    plus safetensors, or a pipeline folder with ``unet/``), e.g. a SiD-LSG generator converted once
    by ``convert_sid_lsg.py`` or a snapshot of an earlier run. Pickles are not read here.
    """
    from diffusers import UNet2DConditionModel

    generator = copy.deepcopy(teacher_unet)
    if init == "teacher":
        return generator
    path = Path(init).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"generator_init {init!r}: no such folder (a diffusers UNet folder, or 'teacher'); "
                             "convert a SiD-LSG pickle with convert_sid_lsg.py")
    folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"generator_init {init!r}: not a diffusers UNet folder (no config.json)")
    try:
        state = UNet2DConditionModel.from_pretrained(folder).state_dict()
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"generator_init {init!r}: {exc}") from exc
    _check_same_architecture(state, teacher_unet, f"generator_init {init!r}")
    check_finite_weights(state, f"generator_init {init!r}")
    generator.load_state_dict(state)
    return generator


def configure_unet(unet: torch.nn.Module, attention: str = "sdpa", grad_checkpointing: bool = False) -> None:
    """PyTorch SDPA attention (or xformers if asked) and diffusers' real gradient checkpointing."""
    if attention == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
        except Exception as exc:  # xformers missing or incompatible
            raise ModelLoadError(f"--attention xformers: {exc}") from exc
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    if grad_checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


def unet_folder(path: str | Path, what: str) -> Path:
    """The diffusers UNet folder that ``path`` names: the folder itself (a network snapshot) or the
    ``unet/`` of a pipeline folder (an export). Anything else (a VAE, a text encoder, a run dir) is
    refused here, naming what it is, before a model loads or an output is written."""
    path = Path(path).expanduser()
    hint = "give a network-snapshot-* folder of a run or an exported pipeline folder"
    if not path.is_dir():
        raise ModelLoadError(f"{what} {str(path)!r}: not a folder; {hint}")
    folder = path / "unet" if (path / "model_index.json").is_file() and (path / "unet").is_dir() else path
    problem = _not_a_unet(folder)
    if problem:
        raise ModelLoadError(f"{what} {str(path)!r}: not a generator snapshot ({problem}); {hint}")
    return folder


def _not_a_unet(folder: Path) -> str | None:
    """What keeps ``folder`` from being a diffusers UNet2DConditionModel folder (None: nothing)."""
    config = folder / "config.json"
    if not config.is_file():
        return "no config.json"
    try:
        kind = json.loads(config.read_text()).get("_class_name")
    except (ValueError, AttributeError):
        return "its config.json is not a diffusers config"
    if kind != "UNet2DConditionModel":
        return (f"its config.json describes {kind}, not a UNet2DConditionModel" if kind else
                "its config.json names no diffusers model class (a run folder?)")
    if not any(folder.glob("diffusion_pytorch_model*.safetensors")):
        return "no diffusion_pytorch_model*.safetensors weights"
    return None


def load_unet(path: str | Path, what: str, text_encoder: torch.nn.Module, latent_channels: int) -> torch.nn.Module:
    """A generator UNet from ``unet_folder(path)``, checked finite and fit for this text encoder and VAE."""
    from diffusers import UNet2DConditionModel

    folder = unet_folder(path, what)
    try:
        unet = UNet2DConditionModel.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"{what} {str(path)!r}: cannot load its UNet "
                             f"({(str(exc) or type(exc).__name__).splitlines()[0]})") from exc
    unfilled = [name for name, p in unet.named_parameters() if p.is_meta]  # weights missing from the file
    if unfilled:
        raise ModelLoadError(f"{what} {str(path)!r}: its weights file lacks {len(unfilled)} of the UNet's tensors "
                             f"(e.g. {unfilled[0]}); the folder is incomplete or of another architecture")
    width = text_encoder.config.hidden_size
    if unet.config.cross_attention_dim != width or unet.config.in_channels != latent_channels:
        raise ModelLoadError(
            f"{what} {str(path)!r}: a UNet for text width {unet.config.cross_attention_dim} and "
            f"{unet.config.in_channels} latent channels, but the base model has {width} and {latent_channels}; "
            "give the base model it was trained from (--sd-model)")
    check_finite_weights(unet, f"{what} {str(path)!r}")
    return unet


def read_snapshot_info(folder: Path) -> dict:
    """Metadata that ``checkpoints.save_generator_snapshot`` writes beside the UNet weights."""
    info = Path(folder) / "sfd_generator.json"
    return json.loads(info.read_text()) if info.is_file() else {}
