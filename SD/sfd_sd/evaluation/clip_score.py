"""CLIP score of generated images against their own prompts (docs/method.md section 7, preserved quality).

Definition (as torchmetrics' ``CLIPScore``): ``100 * max(cos(E_img, E_txt), 0)`` with L2-normalised CLIP
projections, averaged over images. Hessel et al. (2021) scale by 2.5 instead of 100; divide by 40 to
compare with numbers in that convention.
"""
from __future__ import annotations

import statistics

import torch

from .clip import ClipEmbedder
from .folders import ImageSet
from .records import EvaluationError

DEFINITION = "100 * max(cos(image embedding, prompt embedding), 0), mean over images (torchmetrics CLIPScore)"


def clip_scores(embedder: ClipEmbedder, images: ImageSet) -> tuple[dict, list[dict], dict]:
    if any(it.prompt is None for it in images.items):
        raise EvaluationError(f"CLIP score needs each image's prompt; {str(images.folder)!r} has none")
    prompts = sorted({it.prompt for it in images.items})
    before = embedder.truncated_texts
    text = dict(zip(prompts, embedder.embed_texts(prompts)))
    img = embedder.embed_images([it.path for it in images.items])
    cos = torch.stack([img[i] @ text[it.prompt] for i, it in enumerate(images.items)])
    scores = (100 * cos.clamp(min=0)).tolist()
    rows = [dict(it.row(), clip_score=s, cosine=float(c)) for it, s, c in zip(images.items, scores, cos.tolist())]
    per_prompt = {p: statistics.fmean(r["clip_score"] for r in rows if r["prompt"] == p) for p in prompts}
    totals = dict(clip_score=statistics.fmean(scores),
                  clip_score_std=statistics.pstdev(scores) if len(scores) > 1 else 0.0,
                  images=len(rows), prompts=len(prompts), per_prompt=per_prompt)
    settings = dict(definition=DEFINITION, truncated_prompts=embedder.truncated_texts - before)
    return totals, rows, settings
