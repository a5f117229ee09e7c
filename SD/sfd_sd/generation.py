"""Images for prompts x seeds: the one-step generator, or the original model's own sampler.

Per-seed determinism: every image's starting noise comes from its own ``torch.Generator`` seeded
with the image's seed, so an image does not depend on the batch it was drawn in nor on how many
processes split the work.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
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
    """Generator snapshot -> images in one network evaluation (docs/method.md section 3, G_theta)."""

    def __init__(self, network: str | Path, sd_model: str, revision: str | None, t_init: int,
                 resolution: int, device: torch.device, amp_dtype: torch.dtype | None,
                 generator_base: str | None = None):
        if generator_base is not None:  # a LoRA adapter (lora.py): its generator start + the adapter, merged
            from .lora import load_adapter_generator

            parts = models.load_sd_parts(sd_model, revision)
            unet = load_adapter_generator(network, parts.unet, generator_base)
        else:
            parts = models.load_sd_parts(sd_model, revision, load_unet=False)
            unet = models.load_unet(network, "--network", parts.text_encoder, parts.vae.config.latent_channels)
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


class OutputError(ValueError):
    """--outdir cannot take these images; the message says why and what to do."""


MANIFEST = "manifest.json"


def prepare_outdir(out: Path, dirs: Sequence[str], provenance: dict, overwrite: bool) -> dict | None:
    """Check --outdir before any model loads: writable, no file where a folder goes, and holding only
    images of the same provenance. Returns the previous manifest to merge with (None when fresh)."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--outdir {str(out)!r} is a file; give a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"--outdir {str(out)!r} is not writable ({exc.strerror}); choose another folder") from None
    if overwrite:
        clear_outdir(out)
    for d in dirs:
        if (out / d).exists() and not (out / d).is_dir():
            raise OutputError(f"--outdir {str(out)!r}: {d!r} is a file where an image folder goes; move it away")
    path = out / MANIFEST
    if path.is_file():
        try:
            previous = json.loads(path.read_text())
            old = previous["provenance"]
        except (ValueError, KeyError, TypeError):
            raise OutputError(f"--outdir {str(out)!r}: {MANIFEST} is not a generate.py manifest; use another folder "
                              "or --overwrite") from None
        differ = sorted(k for k in set(old) | set(provenance) if old.get(k) != provenance.get(k))
        if differ:
            raise OutputError(f"--outdir {str(out)!r} holds images of another network or settings (differs in "
                              f"{', '.join(differ)}); use another --outdir, or --overwrite to start clean")
        return previous
    if any(out.glob("*/*.png")):
        raise OutputError(f"--outdir {str(out)!r} holds images without a {MANIFEST}, so their origin is unknown; use "
                          "another --outdir, or --overwrite to start clean")
    return None


def clear_outdir(out: Path) -> None:
    """Remove what generate.py writes (PNGs one level down, the manifest), nothing else."""
    for png in out.glob("*/*.png"):
        png.unlink()
    for d in out.iterdir():
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    (out / MANIFEST).unlink(missing_ok=True)


def merge_manifest(previous: dict | None, provenance: dict, settings: dict, new_images: list[dict]) -> dict:
    """One manifest for every image in the folder: the previous rows plus this run's, by path."""
    rows = {r["path"]: r for r in (previous or {}).get("images", [])}
    rows.update({r["path"]: r for r in new_images})
    images = list(rows.values())
    flat = {k: v for k, v in provenance.items() if k != "snapshot"}
    return dict(flat, **settings, provenance=provenance, prompts=list(dict.fromkeys(r["prompt"] for r in images)),
                seeds=sorted({r["seed"] for r in images}), images=images)


def write_manifest(out: Path, manifest: dict, complete: bool) -> None:
    from .checkpoints import atomic_write_json

    manifest["complete"] = complete
    atomic_write_json(out / MANIFEST, manifest)
