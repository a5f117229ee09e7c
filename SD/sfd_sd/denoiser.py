"""One denoiser interface for teacher, fake score and generator (docs/method.md section 2 notation).

``GuidedDenoiser`` wraps an SD UNet and answers ``eps(x_t, t, prompts, guidance, negative)`` and
``x0(...)`` in the scaled latent space (VAE latents x 0.18215). Losses and the one-step generator
are written once against it.

Guided eps (docs/method.md section 3): eps_u + kappa (eps_c - eps_u), where the unconditional branch eps_u
uses the negative prompt when one is given and "" otherwise. kappa = 1 is one conditional pass, so
a negative prompt has no effect there (nothing is subtracted).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Sequence

import torch


class VPSchedule:
    """a_t = sqrt(abar_t), b_t = sqrt(1 - abar_t), sigma_t = b_t / a_t for integer t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        abar = alphas_cumprod.double()
        self.a_table = abar.sqrt().float()
        self.b_table = (1 - abar).sqrt().float()
        self.num_steps = len(abar)

    def _lookup(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = table.to(like.device)[t.to(like.device).long()]
        return out.view(-1, *([1] * (like.ndim - 1))).to(like.dtype)

    def a(self, t, like):
        return self._lookup(self.a_table, t, like)

    def b(self, t, like):
        return self._lookup(self.b_table, t, like)

    def sigma(self, t: int) -> float:
        return float(self.b_table[t] / self.a_table[t])

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.a(t, x0) * x0 + self.b(t, x0) * eps


class PromptEncoder:
    """CLIP text embeddings for a list of prompts, truncated to the encoder's length, LRU-cached.

    The authors' code did not truncate the unconditional/negative branch, so a negative prompt
    longer than 77 tokens broke the batch; here every prompt is truncated (with a one-time warning).
    """

    def __init__(self, tokenizer, text_encoder, device, dtype=torch.float32, cache_size: int = 256):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_length = min(int(tokenizer.model_max_length), int(text_encoder.config.max_position_embeddings))
        self.cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self._warned: set[str] = set()

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        if not self._warned:  # warn once per encoder, not once per prompt
            for p in prompts:
                if len(self.tokenizer(p).input_ids) > self.max_length:
                    self._warned.add(p)
                    warnings.warn(f"prompt(s) truncated to {self.max_length} tokens, e.g. {p[:60]!r}", stacklevel=3)
                    break
        out = self.text_encoder(tok.input_ids.to(self.device))[0]
        return out.to(self.dtype)

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        prompts = list(prompts)
        todo = [p for p in dict.fromkeys(prompts) if p not in self.cache]
        if todo:
            for p, emb in zip(todo, self._encode(todo)):
                self.cache[p] = emb
        for p in prompts:
            self.cache.move_to_end(p)
        out = torch.stack([self.cache[p] for p in prompts])
        while len(self.cache) > max(self.cache_size, len(prompts)):
            self.cache.popitem(last=False)
        return out


class GuidedDenoiser:
    """eps / x0 prediction of an SD UNet with optional classifier-free guidance.

    ``amp_dtype`` runs the UNet under autocast (bf16 or fp16) while parameters stay in whatever
    dtype they are stored in; outputs are always float32.
    """

    def __init__(self, unet, schedule: VPSchedule, encoder: PromptEncoder, prediction_type: str = "epsilon",
                 amp_dtype: torch.dtype | None = None):
        self.unet = unet
        self.schedule = schedule
        self.encoder = encoder
        self.prediction_type = prediction_type
        self.amp_dtype = amp_dtype

    def _autocast(self, device: torch.device):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.amp_dtype)

    def _raw(self, x_t, t, emb):
        with self._autocast(x_t.device):
            out = self.unet(x_t, t, encoder_hidden_states=emb, return_dict=False)[0]
        out = out.float()
        if self.prediction_type == "v_prediction":  # v = a eps - b x0  =>  eps = b x_t + a v
            out = self.schedule.b(t, x_t) * x_t.float() + self.schedule.a(t, x_t) * out
        return out

    def eps(self, x_t: torch.Tensor, t: torch.Tensor, prompts: Sequence[str], guidance: float = 1.0,
            negative: Sequence[str] | None = None) -> torch.Tensor:
        if len(prompts) != x_t.shape[0] or (negative is not None and len(negative) != x_t.shape[0]):
            raise ValueError("one prompt (and negative prompt) per sample is required")
        if guidance == 1.0:
            return self._raw(x_t, t, self.encoder(prompts))
        uncond = list(negative) if negative is not None else [""] * len(prompts)
        emb = self.encoder(uncond + list(prompts))
        eps_u, eps_c = self._raw(torch.cat([x_t, x_t]), torch.cat([t, t]), emb).chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def x0(self, x_t, t, prompts, guidance: float = 1.0, negative=None) -> torch.Tensor:
        """Denoised estimate f(x_t, t, c) = (x_t - b_t eps) / a_t."""
        eps = self.eps(x_t, t, prompts, guidance, negative)
        return (x_t.float() - self.schedule.b(t, x_t) * eps) / self.schedule.a(t, x_t)


def one_step_generate(generator: GuidedDenoiser, z: torch.Tensor, prompts: Sequence[str], t_init: int) -> torch.Tensor:
    """G(z, c) = sigma_{t*} (z - eps(b_{t*} z, t*, c)): scaled SD latents from noise in one step."""
    t = torch.full((z.shape[0],), t_init, device=z.device, dtype=torch.long)
    x_init = generator.schedule.b(t, z) * z
    return generator.x0(x_init, t, prompts)
