#!/usr/bin/env python
"""GPU check: SFD iterations/s and peak memory on the real SD v1.5 UNet architecture (random weights).

Builds teacher, fake score and generator from ``benchmarks/sd15_unet_config.json`` (the SD v1.5 UNet,
859.5M parameters) and a text encoder with CLIP ViT-L/14's text configuration (123.1M), all with random
weights (no download), and times the real training step (``sfd_sd.training.SFDStep``: fake-score step,
generator step, the repository's prompt files, kappa 4.5, prompt dropout) as train.py sets it up: teacher
and text encoder stored in bf16, fake score and generator fp32 master weights with Adam, bf16 autocast.
With ``--adapter lora`` (default: both modes) it builds the LoRA mode as train.py's ``adapter=lora`` does
(teacher and generator start frozen in bf16, fake score = the teacher's weights + an adapter, generator =
start + adapter, Adam over adapter tensors only). For each mode, per-GPU batch and gradient-checkpointing
setting it records iterations/s and the peak memory (CUDA: max allocated and reserved; CPU: max RSS of
the process), written as JSON with the computed plan (sfd_sd/memory.py) of the same settings beside it.

  python benchmarks/gpu_check.py --out gpu_check.json                   # full and lora, batch 1 and 2, ckpt on/off
  python benchmarks/gpu_check.py --adapter lora --out lora.json         # LoRA mode only (one 24 GB GPU)
  python benchmarks/gpu_check.py --unet-config tiny.json --resolution 64 --iters 2 --out t.json   # CPU smoke

Random weights give the same cost as trained ones (no data-dependent control flow); the losses are not
meaningful. Sized to finish within a few minutes on one large GPU (2 modes x 4 settings x (build + warm-up +
iters)); a 24 GB GPU measures the LoRA mode (``--adapter lora``), the full mode needs ~40 GB.
"""
from __future__ import annotations

import gc
import json
import platform
import resource
import sys
import time
import zlib
from pathlib import Path

import click
import torch

SD_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(SD_DIR))

from sfd_sd import models  # noqa: E402
from sfd_sd.config import TrainConfig  # noqa: E402
from sfd_sd.denoiser import GuidedDenoiser, PromptEncoder, VPSchedule  # noqa: E402
from sfd_sd.distributed import Dist  # noqa: E402
from sfd_sd.training import Nets, SFDStep, build_prompt_sampler, guidance_settings  # noqa: E402

DEFAULT_CONFIG = SD_DIR / "benchmarks" / "sd15_unet_config.json"
PROMPTS = SD_DIR / "prompts"
GIB = 2**30


class HashTokenizer:
    """Stand-in for CLIP's tokenizer (no vocabulary download): word -> id by CRC32, BOS/EOS, padding.

    The text encoder's cost depends only on the sequence length (77), not on which ids it gets.
    """

    def __init__(self, vocab_size: int, model_max_length: int = 77):
        self.vocab_size, self.model_max_length = vocab_size, model_max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1

    def _ids(self, text: str) -> list[int]:
        return [self.bos] + [zlib.crc32(w.encode()) % (self.vocab_size - 2) for w in text.lower().split()] + [self.eos]

    def __call__(self, texts, padding=None, max_length=None, truncation=False, return_tensors=None):
        if isinstance(texts, str):
            return _Tokens(self._ids(texts))
        rows = []
        for t in texts:
            ids = self._ids(t)
            if truncation:
                ids = ids[:max_length - 1] + [self.eos] if len(ids) > max_length else ids
            rows.append(ids + [self.eos] * (max_length - len(ids)) if padding == "max_length" else ids)
        return _Tokens(torch.tensor(rows))


class _Tokens:
    def __init__(self, input_ids):
        self.input_ids = input_ids


def read_unet_config(path: Path) -> dict:
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


def text_encoder_for(cross_dim: int):
    """CLIP ViT-L/14's text tower for cross_attention_dim 768 (SD v1.5), a 2-layer one otherwise."""
    from transformers import CLIPTextConfig, CLIPTextModel

    if cross_dim == 768:
        cfg = CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                             num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")
    else:
        cfg = CLIPTextConfig(vocab_size=1000, hidden_size=cross_dim, intermediate_size=2 * cross_dim,
                             num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77)
    return CLIPTextModel(cfg)


def sd_alphas_cumprod() -> torch.Tensor:
    """SD v1.5's schedule: scaled-linear betas 0.00085..0.012 over 1000 steps."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def build_step(unet_config: dict, resolution: int, batch_gpu: int, grad_ckpt: bool, device: torch.device,
               amp_dtype: torch.dtype | None, seed: int = 0, adapter: str = "full",
               lora_rank: int = 16) -> tuple[SFDStep, int]:
    """An SFDStep wired as train.py wires it (one process); returns it and the UNet's parameter count.
    ``adapter="lora"``: teacher and generator start frozen in bf16, fake score = teacher + adapter,
    generator = start + adapter (sfd_sd/lora.py), as train.py's adapter=lora."""
    from diffusers import UNet2DConditionModel

    cfg = TrainConfig(remain_prompts=str(PROMPTS / "remain_prompts_small.txt"),
                      forget_prompts=str(PROMPTS / "brad_pitt_prompts.txt"), concept_to_forget="brad pitt",
                      concept_to_override="a middle aged man", resolution=resolution, batch=batch_gpu,
                      batch_gpu=batch_gpu, grad_checkpointing=grad_ckpt, seed=seed, adapter=adapter,
                      lora_rank=lora_rank, lora_alpha=float(lora_rank))
    cfg.check()
    sampler, _, _ = build_prompt_sampler(cfg)
    frozen = amp_dtype or torch.float32
    torch.manual_seed(seed)
    trained = {}
    if adapter == "lora":
        from sfd_sd import lora

        with torch.device(device):
            teacher_unet = UNet2DConditionModel(**unet_config).to(frozen)
            start = UNet2DConditionModel(**unet_config).to(frozen)
            text_encoder = text_encoder_for(unet_config["cross_attention_dim"]).to(frozen)
        for unet in (teacher_unet, start):
            models.configure_unet(unet, "sdpa", grad_ckpt)
        teacher_unet, fake_unet, gen_unet, trained["fake_params"], trained["gen_params"] = lora.build_lora_nets(
            teacher_unet, start, cfg, frozen, device, share_generator_base=False)
        for unet in (fake_unet, gen_unet):
            models.configure_unet(unet, "sdpa", grad_ckpt)
    else:
        with torch.device(device):
            fake_unet = UNet2DConditionModel(**unet_config)  # fp32 master weights, like the generator
            gen_unet = UNet2DConditionModel(**unet_config)
            teacher_unet = UNet2DConditionModel(**unet_config).to(frozen)
            text_encoder = text_encoder_for(unet_config["cross_attention_dim"]).to(frozen)
        for unet in (teacher_unet, fake_unet, gen_unet):
            models.configure_unet(unet, "sdpa", grad_ckpt)
    teacher_unet.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    tokenizer = HashTokenizer(text_encoder.config.vocab_size, text_encoder.config.max_position_embeddings)
    encoder = PromptEncoder(tokenizer, text_encoder, device, frozen, cfg.text_cache)
    schedule = VPSchedule(sd_alphas_cumprod())

    def mk(u):
        return GuidedDenoiser(u, schedule, encoder, "epsilon", amp_dtype)

    nets = Nets(teacher=mk(teacher_unet), fake=mk(fake_unet), generator=mk(gen_unet), ema=None, **trained)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(amp_dtype, "fp32")
    opt_kw = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps_for(precision))
    opt_fake = torch.optim.Adam(nets.params("fake"), lr=cfg.lr_fake, **opt_kw)
    opt_gen = torch.optim.Adam(nets.params("gen"), lr=cfg.lr_gen, **opt_kw)
    scalers = [torch.amp.GradScaler(device.type, enabled=False) for _ in range(2)]
    latent = resolution // 8  # SD's VAE downsamples by 8
    step = SFDStep(cfg, nets, sampler, guidance_settings(cfg), Dist(device=device), opt_fake, opt_gen, *scalers,
                   torch.Generator().manual_seed(seed), torch.Generator(device).manual_seed(seed + 1),
                   (unet_config["in_channels"], latent, latent), precision)
    return step, sum(p.numel() for n, p in gen_unet.named_parameters() if ".lora_" not in n)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(step: SFDStep, warmup: int, iters: int, device: torch.device) -> dict:
    """Warm-up iterations (Adam states, kernels), then timed ones; peak memory over all of them."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    nimg = 0
    for _ in range(warmup):
        losses = step(nimg)
        nimg += step.cfg.batch
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        losses = step(nimg)
        nimg += step.cfg.batch
    _sync(device)
    sec = (time.perf_counter() - start) / iters
    out = dict(sec_per_iter=sec, iters_per_sec=1 / sec, images_per_sec=step.cfg.batch / sec,
               losses_finite=all(torch.isfinite(torch.tensor(v)).item() for v in losses.values()))
    if device.type == "cuda":
        out.update(peak_allocated_gib=torch.cuda.max_memory_allocated(device) / GIB,
                   peak_reserved_gib=torch.cuda.max_memory_reserved(device) / GIB)
    else:
        scale = 1 if sys.platform == "darwin" else 1024
        out.update(peak_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GIB)
    return out


def memory_plan_gib(n_unet: int, n_text: int, n_vae: int = 83_653_863) -> dict:  # full mode, as in the README
    """The README's computed plan (static part and the transients), for comparison with the measurement."""
    static = dict(teacher_bf16=2 * n_unet, fake_fp32_grad_adam=16 * n_unet, generator_fp32_grad_adam=16 * n_unet,
                  text_encoder_bf16=2 * n_text, vae_fp32=4 * n_vae)
    transient = dict(adam_foreach_temporary=4 * n_unet, autocast_bf16_weight_copy_per_trainable_net=2 * n_unet)
    return dict(static={k: v / GIB for k, v in static.items()}, static_total=sum(static.values()) / GIB,
                transient={k: v / GIB for k, v in transient.items()})


def write_json(path: str, obj: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--unet-config", type=click.Path(exists=True, dir_okay=False), default=str(DEFAULT_CONFIG),
              help="UNet2DConditionModel config (default: SD v1.5's, kept in the repository).")
@click.option("--resolution", type=click.IntRange(min=8), default=512, metavar="PX", help="Image size (latents PX/8).")
@click.option("--batch-gpu", "batches", default="1,2", help="Per-GPU batches to measure (comma-separated).")
@click.option("--checkpointing", "ckpts", type=click.Choice(["on,off", "on", "off"]), default="on,off",
              help="Gradient checkpointing settings to measure.")
@click.option("--adapter", "adapters", type=click.Choice(["full", "lora", "full,lora"]), default="full,lora",
              help="Training mode(s) to measure: full UNets (the paper's) and/or LoRA adapters (adapter=lora).")
@click.option("--lora-rank", type=click.IntRange(1, 1024), default=16, help="LoRA rank for --adapter lora.")
@click.option("--warmup", type=click.IntRange(min=1), default=3, help="Untimed iterations per setting.")
@click.option("--iters", type=click.IntRange(min=1), default=10, help="Timed iterations per setting.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16",
              help="bf16 autocast with fp32 master weights (train.py's default on GPUs), or fp32.")
@click.option("--device", type=click.Choice(["auto", "cuda", "cpu"]), default="auto")
@click.option("--out", type=click.Path(dir_okay=False), required=True, metavar="JSON", help="Where to write the results.")
def main(unet_config, resolution, batches, ckpts, adapters, lora_rank, warmup, iters, precision, device, out):
    """Measure SFD iterations/s and peak memory per per-GPU batch and checkpointing setting."""
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: no CUDA device is visible")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None
    config = read_unet_config(unet_config)
    if resolution % 8 or (resolution // 8) % 2 ** (len(config["block_out_channels"]) - 1):
        raise click.ClickException(f"--resolution {resolution}: latents must be divisible by the UNet's downsampling")
    try:
        batch_list = [int(b) for b in batches.split(",")]
    except ValueError:
        raise click.BadParameter(f"{batches!r} is not a comma-separated list of integers", param_hint="--batch-gpu")
    result = dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        torch=torch.__version__, diffusers=__import__("diffusers").__version__, unet_config=str(unet_config),
        resolution=resolution, precision=f"{precision} autocast, fp32 master weights" if amp_dtype else "fp32",
        warmup=warmup, iters=iters, runs=[])
    settings = [(a, b, c) for a in adapters.split(",") for b in batch_list for c in ckpts.split(",")]
    for adapter, batch, ckpt in settings:
        run = dict(adapter=adapter, batch_gpu=batch, grad_checkpointing=ckpt == "on")
        t0 = time.perf_counter()
        step = None
        try:
            step, n_unet = build_step(config, resolution, batch, ckpt == "on", device, amp_dtype,
                                      adapter=adapter, lora_rank=lora_rank)
            if adapter == "lora":
                run["adapter_parameters"] = sum(p.numel() for p in step.nets.params("gen"))
            result.setdefault("unet_params", n_unet)
            run.update(measure(step, warmup, iters, device))
        except torch.cuda.OutOfMemoryError as exc:
            run.update(oom=True, error=str(exc).splitlines()[0])
        run["wall_sec"] = time.perf_counter() - t0
        result["runs"].append(run)
        click.echo(json.dumps(run), err=True)
        write_json(out, result)  # after every setting: a run cut short still leaves its results
        del step
        _free(device)
    if "unet_params" in result:
        with torch.device("meta"):  # only the parameter count
            text = text_encoder_for(config["cross_attention_dim"])
        result["memory_plan_gib"] = memory_plan_gib(result["unet_params"], sum(p.numel() for p in text.parameters()))
        from sfd_sd import memory

        n_adapter = memory.adapter_parameters(["to_q", "to_k", "to_v", "to_out.0"], lora_rank, config)
        result["memory_plan_gb"] = [memory.plan(a, b, c == "on", n_adapter, resolution, n_unet=result["unet_params"],
                                                n_text=sum(p.numel() for p in text.parameters()))
                                    for a, b, c in settings]
    write_json(out, result)
    click.echo(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.exit(main())
