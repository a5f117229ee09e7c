"""A one-step text-to-image diffusers pipeline for an SFD generator (docs/method.md section 3, G_theta).

This file is self-contained (torch and diffusers only): ``export.py`` copies it into an exported
folder as ``pipeline.py`` and names it in ``model_index.json``, so the folder loads anywhere with

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("path/or/hub-repo", trust_remote_code=True)
    image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]

The image is x_g = sigma_{t*} (z - eps_theta(b_{t*} z, t*, c)) decoded by the VAE: one UNet
evaluation, no classifier-free guidance (the generator was distilled from a guided teacher). With
one ``torch.Generator`` per image seeded with the image's seed, the result is the image
``generate.py`` writes for that prompt and seed (tested).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from PIL import Image


class SFDOneStepPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text -> image in one network evaluation of an SFD (SiD-style) one-step generator.

    ``load_lora_weights`` (diffusers' SD LoRA loader) adds a forget-adapter of the LoRA mode to the
    generator start it was trained on."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, t_init: int = 625):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                              scheduler=scheduler)
        self.register_to_config(t_init=int(t_init))

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _schedule(self, t: int) -> tuple[float, float]:
        """(a_t, b_t) = (sqrt(abar_t), sqrt(1 - abar_t)) from the scheduler's betas, in float32."""
        abar = self.scheduler.alphas_cumprod.double()[t]
        return float(abar.sqrt().float()), float((1 - abar).sqrt().float())

    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states, padded/truncated to the encoder's length (as in training)."""
        max_length = min(int(self.tokenizer.model_max_length), int(self.text_encoder.config.max_position_embeddings))
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                             return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def _noise(self, n: int, shape: tuple[int, ...], generator) -> torch.Tensor:
        """z ~ N(0, I), one draw per image when a list of generators (one per image) is given."""
        if isinstance(generator, (list, tuple)):
            if len(generator) != n:
                raise ValueError(f"got {len(generator)} generators for {n} images (one per image)")
            return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generator])
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.randn((n, *shape), generator=generator, device=device)

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str], num_images_per_prompt: int = 1, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", return_dict: bool = True):
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        factor = self.vae_scale_factor
        height = height or self.unet.config.sample_size * factor
        width = width or self.unet.config.sample_size * factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, got {height}x{width}")
        shape = (self.unet.config.in_channels, height // factor, width // factor)
        z = latents if latents is not None else self._noise(len(prompts), shape, generator)
        z = z.to(self.unet.device, torch.float32)

        t_init = int(self.config.t_init)
        a, b = self._schedule(t_init)
        t = torch.full((len(prompts),), t_init, device=z.device, dtype=torch.long)
        x_t = b * z  # the generator's input: pure noise at scale b_{t*}
        emb = self.encode_prompt(prompts).to(self.unet.dtype)
        out = self.unet(x_t.to(self.unet.dtype), t, encoder_hidden_states=emb, return_dict=False)[0].float()
        if self.scheduler.config.prediction_type == "v_prediction":  # v = a eps - b x0
            out = b * x_t + a * out
        x_g = (x_t - b * out) / a  # = sigma_{t*} (z - eps)
        if output_type == "latent":
            images = x_g
        else:
            decoded = self.vae.decode(x_g.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            pixels = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            pixels = pixels.permute(0, 2, 3, 1).cpu()
            if output_type == "pt":
                images = pixels.permute(0, 3, 1, 2).float() / 255
            elif output_type == "np":
                images = pixels.numpy().astype(np.float32) / 255
            elif output_type == "pil":
                images = [Image.fromarray(p) for p in pixels.numpy()]
            else:
                raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
