"""A CLIP model (transformers ``CLIPModel`` + ``CLIPProcessor``) that embeds images and texts.

``model`` is a hub id (default ``openai/clip-vit-large-patch14``, the ViT-L/14 that SD v1's text encoder
comes from) with an optional ``revision``, or a local folder in the same layout. Embeddings are
L2-normalised projections, computed in fp32 without gradients. Texts longer than the model's context
(77 tokens) are truncated, and the number truncated is recorded.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import torch

from .folders import load_rgb
from .records import EvaluationError

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def _projected(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4 a tensor.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    def __init__(self, model: str, revision: str | None, device: torch.device, batch: int = 32):
        from transformers import CLIPModel, CLIPProcessor

        local = Path(model).expanduser()
        if (model.startswith((".", "/", "~")) or local.exists()) and not local.is_dir():
            raise EvaluationError(f"--clip-model {model!r}: no such folder")
        try:
            self.model = CLIPModel.from_pretrained(str(local) if local.is_dir() else model, revision=revision)
            self.processor = CLIPProcessor.from_pretrained(str(local) if local.is_dir() else model, revision=revision)
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"could not load CLIP model {model!r}: {exc}") from exc
        self.model.to(device).eval().float()
        self.device, self.batch = device, batch
        self.context_length = int(self.model.config.text_config.max_position_embeddings)
        self.truncated_texts = 0
        self.settings = dict(
            clip_model=model, clip_revision=revision,
            clip_commit=getattr(self.model.config, "_commit_hash", None),
            clip_local_path=str(local.resolve()) if local.is_dir() else None,
            clip_image_size=self.model.config.vision_config.image_size, clip_context_length=self.context_length,
            clip_preprocessing="CLIPProcessor: resize shortest side (bicubic), center crop, CLIP mean/std")

    @torch.no_grad()
    def embed_images(self, paths: Sequence[Path]) -> torch.Tensor:
        out = []
        for i in range(0, len(paths), self.batch):
            pics = [load_rgb(p) for p in paths[i:i + self.batch]]
            pixels = self.processor(images=pics, return_tensors="pt")["pixel_values"].to(self.device)
            out.append(_projected(self.model.get_image_features(pixel_values=pixels)).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.processor.tokenizer
        out = []
        for i in range(0, len(texts), self.batch):
            chunk = list(texts[i:i + self.batch])
            full = tok(chunk, padding=False, truncation=False)["input_ids"]
            self.truncated_texts += sum(len(ids) > self.context_length for ids in full)
            enc = tok(chunk, padding="max_length", truncation=True, max_length=self.context_length,
                      return_tensors="pt").to(self.device)
            feats = self.model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
            out.append(_projected(feats).float().cpu())
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())


@functools.lru_cache(maxsize=4)
def load_clip(model: str, revision: str | None, device: str, batch: int) -> ClipEmbedder:
    """One instance per (model, revision, device, batch) in a process (chained commands share it)."""
    return ClipEmbedder(model, revision, torch.device(device), batch)
