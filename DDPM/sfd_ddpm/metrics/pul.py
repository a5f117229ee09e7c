"""Percentage of unlearning (PUL), the VDU paper's forgetting metric (docs/method.md section 6).

    PUL = 100 * (n_forget(original) - n_forget(unlearned)) / n_forget(original)

where n_forget(model) counts the images a dataset classifier labels as a forget class among an
equal-size set of samples of that model. The samples are typically unconditional, so the class
comes from the classifier alone (file names are not used). 100 = no forget-class image left;
0 = as many as before; negative = more than before.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .folders import iter_batches, list_pngs, model_channels
from .ua import classify


def count_forget(logits: torch.Tensor, forget: Sequence[int]) -> int:
    """Number of rows whose argmax is one of the forget classes."""
    forget = torch.tensor(sorted({int(c) for c in forget}))
    if not len(forget):
        raise ValueError("give at least one forget class")
    if int(forget.max()) >= logits.shape[1] or int(forget.min()) < 0:
        raise ValueError(f"forget classes {forget.tolist()} are out of range for {logits.shape[1]} classes")
    return int(torch.isin(logits.argmax(1), forget).sum())


def percentage_of_unlearning(n_forget_original: int, n_forget_unlearned: int) -> float:
    if n_forget_original <= 0:
        raise ValueError("the original model generated no forget-class image among these samples, so PUL is "
                         "undefined; use more samples")
    return 100.0 * (n_forget_original - n_forget_unlearned) / n_forget_original


def pul_from_logits(original: torch.Tensor, unlearned: torch.Tensor, forget: Sequence[int]) -> dict:
    if len(original) != len(unlearned):
        raise ValueError(f"PUL compares equal-size sample sets, got {len(original)} original and "
                         f"{len(unlearned)} unlearned images")
    n_orig, n_unl = count_forget(original, forget), count_forget(unlearned, forget)
    return {"pul": percentage_of_unlearning(n_orig, n_unl), "n_forget_original": n_orig,
            "n_forget_unlearned": n_unl, "n_images_each": len(original),
            "forget_classes": sorted({int(c) for c in forget})}


def evaluate_pul(model, original: torch.Tensor, unlearned: torch.Tensor, forget: Sequence[int],
                 batch_size: int = 256, device=None) -> dict:
    """PUL for in-memory samples in [-1, 1] of the original and the unlearned model."""
    return pul_from_logits(classify(model, original, batch_size, device), classify(model, unlearned, batch_size, device),
                           forget)


@torch.no_grad()
def evaluate_pul_folders(model, original_folder, unlearned_folder, forget: Sequence[int], n: int | None = None,
                         batch_size: int = 256, device=None) -> dict:
    """PUL for two folders of PNGs (any names); ``n`` = use the first n (by name) of each."""
    logits = []
    for folder in (original_folder, unlearned_folder):
        entries = list_pngs(folder)
        if n is not None:
            if len(entries) < n:
                raise ValueError(f"{folder} holds {len(entries)} PNGs, fewer than n={n}")
            entries = entries[:n]
        out = [classify(model, x, batch_size, device, quantize=False) for x, _ in iter_batches(entries, batch_size, model_channels(model))]
        if not out:
            raise ValueError(f"no PNG images in {folder}")
        logits.append(torch.cat(out))
    return pul_from_logits(*logits, forget)
