"""Images for prompts x seeds: the one-step generator, or the original model's own sampler.

Per-seed determinism: every image's starting noise comes from its own ``torch.Generator`` seeded
with the image's seed, so an image does not depend on the batch it was drawn in nor on how many
processes split the work.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from . import images, models
from .config import slug
from .denoiser import GuidedDenoiser, PromptEncoder, VPSchedule, one_step_generate


def prompt_dirs(prompts: Sequence[str]) -> list[str]:
    """A folder name per prompt: a readable slug, with a short hash when slugs would collide."""
    slugs = [slug(p, 80) for p in prompts]
    out = []
    for p, s in zip(prompts, slugs):
        if slugs.count(s) > 1 or len(slug(p, 10_000)) > 80:
            s = f"{s}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
        out.append(s)
    if len(set(out)) != len(out):
        raise ValueError("duplicate prompts: give each prompt once")
    return out


def seed_noise(seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def work_batches(n_prompts: int, seeds: Sequence[int], batch: int) -> list[list[tuple[int, int]]]:
    """(prompt index, seed) items in batches of at most ``batch``, never mixing prompts."""
    out = []
    for pi in range(n_prompts):
        for i in range(0, len(seeds), batch):
            out.append([(pi, s) for s in seeds[i:i + batch]])
    return out


class OneStepSampler:
    """Generator snapshot -> images in one network evaluation (SPEC section 3, G_theta)."""

    def __init__(self, network: str | Path, sd_model: str, revision: str | None, t_init: int,
                 resolution: int, device: torch.device, amp_dtype: torch.dtype | None):
        from diffusers import UNet2DConditionModel

        parts = models.load_sd_parts(sd_model, revision, load_unet=False)
        try:
            unet = UNet2DConditionModel.from_pretrained(network)
        except (OSError, ValueError) as exc:
            raise models.ModelLoadError(f"--network {str(network)!r}: {exc}") from exc
        models.check_finite_weights(unet, f"--network {str(network)!r}")
        models.configure_unet(unet, "sdpa", False)
        self.vae = parts.vae.to(device)
        encoder = PromptEncoder(parts.tokenizer, parts.text_encoder.to(device), device)
        self.generator = GuidedDenoiser(unet.to(device).eval(), VPSchedule(parts.alphas_cumprod), encoder,
                                        parts.prediction_type, amp_dtype)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (unet.config.in_channels, resolution // factor, resolution // factor)
        self.t_init, self.device = t_init, device
        self.settings = dict(sampler="one-step", network_evaluations=1, t_init=t_init)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        z = seed_noise(seeds, self.latent_shape).to(self.device)
        return images.decode_latents(self.vae, one_step_generate(self.generator, z, prompts, self.t_init))


class TeacherSampler:
    """The original model through its diffusers pipeline and usual multi-step scheduler."""

    def __init__(self, sd_model: str, revision: str | None, steps: int, guidance: float, negative_prompt: str,
                 resolution: int, device: torch.device, dtype: torch.dtype):
        from diffusers import StableDiffusionPipeline

        models.check_model_source(sd_model)
        try:
            self.pipe = StableDiffusionPipeline.from_pretrained(
                sd_model, revision=revision, dtype=dtype, safety_checker=None, requires_safety_checker=False)
        except (OSError, ValueError) as exc:
            raise models.ModelLoadError(f"could not load pipeline {sd_model!r}: {exc}") from exc
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        factor = self.pipe.vae_scale_factor
        self.latent_shape = (self.pipe.unet.config.in_channels, resolution // factor, resolution // factor)
        self.steps, self.guidance, self.negative = steps, guidance, negative_prompt
        self.resolution, self.device, self.dtype = resolution, device, dtype
        self.settings = dict(sampler=type(self.pipe.scheduler).__name__, steps=steps, guidance=guidance,
                             negative_prompt=negative_prompt,
                             network_evaluations=steps * (2 if guidance > 1 else 1))

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int]) -> torch.Tensor:
        latents = seed_noise(seeds, self.latent_shape).to(self.device, self.dtype)
        gens = [torch.Generator().manual_seed(int(s) + 1) for s in seeds]  # for stochastic schedulers
        out = self.pipe(prompt=prompts, negative_prompt=[self.negative] * len(prompts),
                        num_inference_steps=self.steps, guidance_scale=self.guidance, latents=latents,
                        generator=gens, height=self.resolution, width=self.resolution, output_type="pt").images
        return (out.float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
