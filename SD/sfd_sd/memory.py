"""The computed GPU memory plan of an SD training run, full mode and LoRA mode (README: 'Precision and memory').

Static part (held the whole run), bytes per parameter:
- full: teacher bf16 (2), fake score and generator fp32 weights + grads + Adam m, v (16 each);
- lora: one bf16 base shared by teacher and fake score (2), the generator start bf16 (2; shared too
  with ``generator_init=teacher``), two fp32 adapters with grads and Adam (16 per adapter parameter);
- both: text encoder bf16, VAE fp32, optional generator EMA (fp32 copy of what trains).
Transients: Adam's foreach temporary (4 bytes per trained parameter, while a net steps), autocast's
bf16 copies of fp32 weights (2 bytes per parameter of each fp32 net used in a backward: none for a bf16
base), activations and a backward workspace. Activations per sample at 512 px are the counts
``benchmarks/saved_tensors.py`` made on CPU for the SD v1.5 UNet (generator 0.84, fake score 0.63,
teacher 0.72 GiB per forward; a generator-step term runs the generator on n samples, teacher and fake
score on 2n): 3.8 GB per sample; the adapter layers keep their own bf16 input copy, estimated at +25%
(not counted); with checkpointing only block inputs and one block's recomputation are kept, estimated
at 0.5 GB per sample. They scale with the pixel count (resolution / 512)^2. An estimate to be checked
with ``benchmarks/gpu_check.py``, not a measurement.
"""
from __future__ import annotations

import json
from pathlib import Path

# SD v1.5 (benchmarks/sd15_unet_config.json; CLIP ViT-L/14 text tower; the KL VAE), checked by tests.
SD15_UNET = 859_520_964
SD15_TEXT = 123_060_480
SD15_VAE = 83_653_863
SD15_CONFIG = Path(__file__).resolve().parents[1] / "benchmarks" / "sd15_unet_config.json"
GB = 1e9

ACT_PER_SAMPLE_GB = 3.8  # generator-step term, no checkpointing, per sample of n, 512 px
ACT_CKPT_PER_SAMPLE_GB = 0.5  # with checkpointing (block inputs + one block recomputed)
LORA_ACT_FACTOR = 1.25  # adapter layers' own input copies (estimate)
WORKSPACE_GB = 1.0  # backward workspace (attention, cuBLAS), an allowance


def adapter_parameters(targets, rank: int, unet_config: dict | None = None) -> int:
    """LoRA parameters for ``targets`` at ``rank`` on the UNet of ``unet_config`` (default SD v1.5),
    counted on the meta device (no weights): r (in + out) per Linear, r (in k k + out) per Conv."""
    import torch
    from diffusers import UNet2DConditionModel

    if unet_config is None:
        unet_config = {k: v for k, v in json.loads(SD15_CONFIG.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config)
    n = 0
    for name, m in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(m, torch.nn.Linear):
            n += rank * (m.in_features + m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            n += rank * (m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels)
    return n


def plan(adapter: str, batch_gpu: int, grad_checkpointing: bool, n_adapter: int = 0, resolution: int = 512,
         ema: bool = False, share_generator_base: bool = False, n_unet: int = SD15_UNET, n_text: int = SD15_TEXT,
         n_vae: int = SD15_VAE) -> dict:
    """Static items, transients and the expected peak in GB (bf16 autocast, fp32 master weights)."""
    if adapter == "full":
        static = {"teacher UNet bf16": 2 * n_unet, "fake score fp32 + grads + Adam": 16 * n_unet,
                  "generator fp32 + grads + Adam": 16 * n_unet}
        trained, autocast_copies = n_unet, (1 if grad_checkpointing else 2) * 2 * n_unet
        ema_bytes = 4 * n_unet
    else:
        static = {"teacher = fake score base, bf16 (shared)": 2 * n_unet,
                  "generator start bf16" + (" (shared with the teacher)" if share_generator_base else ""):
                      0 if share_generator_base else 2 * n_unet,
                  "two adapters fp32 + grads + Adam": 2 * 16 * n_adapter}
        trained, autocast_copies = n_adapter, 2 * 2 * n_adapter
        ema_bytes = 4 * n_adapter
    static["text encoder bf16 + VAE fp32"] = 2 * n_text + 4 * n_vae
    if ema:
        static["generator EMA fp32"] = ema_bytes
    pixels = (resolution / 512) ** 2
    per_sample = ACT_CKPT_PER_SAMPLE_GB if grad_checkpointing else ACT_PER_SAMPLE_GB
    if adapter == "lora":
        per_sample *= LORA_ACT_FACTOR
    activations = per_sample * batch_gpu * pixels * GB
    adam_temp = 4 * trained
    backward = autocast_copies + activations + WORKSPACE_GB * GB
    static_total = sum(static.values())
    return dict(adapter=adapter, batch_gpu=batch_gpu, grad_checkpointing=grad_checkpointing, resolution=resolution,
                adapter_parameters=n_adapter if adapter == "lora" else 0,
                static_gb={k: round(v / GB, 3) for k, v in static.items()}, static_total_gb=round(static_total / GB, 2),
                adam_temporary_gb=round(adam_temp / GB, 3), autocast_copies_gb=round(autocast_copies / GB, 3),
                activations_gb=round(activations / GB, 2), workspace_gb=WORKSPACE_GB,
                peak_gb=round((static_total + max(adam_temp, backward)) / GB, 1))


def plan_for_config(cfg, batch_gpu: int | None = None) -> dict:
    """The plan of a run's settings on SD v1.5 (the model is not loaded: a dry run reports it)."""
    import os

    n = adapter_parameters(cfg.lora_targets, cfg.lora_rank) if cfg.adapter == "lora" else 0
    if batch_gpu is None:  # the micro-batch of one process (torchrun sets WORLD_SIZE, also for a dry run)
        try:
            batch_gpu = cfg.batch_layout(int(os.environ.get("WORLD_SIZE", "1")))[1]
        except Exception:  # an uneven split is reported when training starts
            batch_gpu = cfg.batch_gpu or cfg.batch
    p = plan(cfg.adapter, batch_gpu, cfg.grad_checkpointing, n, cfg.resolution,
             ema=cfg.ema_halflife_kimg > 0, share_generator_base=cfg.generator_init == "teacher")
    p["note"] = ("computed for the SD v1.5 architecture with bf16 autocast (README: 'Precision and memory'); "
                 "an estimate, measure with benchmarks/gpu_check.py")
    return p


def table(rank: int = 16, targets=("to_q", "to_k", "to_v", "to_out.0")) -> list[dict]:
    """The README's rows: full and LoRA x checkpointing on/off x per-GPU batch 1/2, 512 px, bf16."""
    n = adapter_parameters(list(targets), rank)
    return [plan(a, b, c, n) for a in ("full", "lora") for c in (True, False) for b in (1, 2)]


def markdown(rows: list[dict]) -> str:
    lines = ["| mode | per-GPU batch | checkpointing | static GB | + transient GB | expected peak GB |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['adapter']} | {r['batch_gpu']} | {'on' if r['grad_checkpointing'] else 'off'} | "
                     f"{r['static_total_gb']:.1f} | {r['peak_gb'] - r['static_total_gb']:.1f} | {r['peak_gb']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown(table()))
