"""Unlearning accuracy (UA) and remaining-class accuracy, by a dataset classifier (docs/method.md section 7).

Each image carries the class it was *generated for* (from its file name ``CCC_IIIII.png`` or a label
tensor). For the images generated for a forget class c:

  UA              = fraction the classifier does NOT label c          (higher = more forgotten)
  mean_entropy    = mean of -sum_k p_k log p_k of the classifier's softmax, in nats
  mean_p_forget   = mean of p_c

The denominator is the number of forget-class images only. The authors' ``ua_imagefolder.py``
divided by every image in the folder, which made UA 10x too small with ten classes in one folder.
With several forget classes each image is judged against its own class and UA is pooled over all
of them (per-class values are reported too).

For the other (remaining) classes: per-class accuracy = fraction labelled as the class they were
generated for ("are the kept classes still themselves"), and ``remaining_accuracy`` = the mean of
those per-class accuracies (each kept class weighs the same, whatever its image count).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .folders import iter_batches, iter_tensor_batches, list_pngs, model_channels, quantise


@torch.no_grad()
def classify(model, images: torch.Tensor, batch_size: int = 256, device=None, quantize: bool = True) -> torch.Tensor:
    """Logits (N, K) on the CPU for in-memory images in [-1, 1]; ``quantize`` rounds them to 8 bits first,
    as if they had been saved, so tensors and folders give the same numbers."""
    device = device or _device_of(model)
    if not torch.isfinite(images).all():
        raise ValueError(f"{int((~torch.isfinite(images)).flatten(1).any(1).sum())} of {len(images)} images hold "
                         f"NaN or inf values; refusing to classify them (the generating model is broken)")
    out = [_finite(model((quantise(x) if quantize else x.float()).to(device)).float().cpu())
           for x in iter_tensor_batches(images, batch_size)]
    return torch.cat(out) if out else torch.empty(0, 0)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """A NaN logit would be argmax'd into a label (UA 1.000 from a broken classifier); refuse it."""
    if not torch.isfinite(logits).all():
        raise ValueError("the classifier returned NaN or inf logits; its weights or the images are broken")
    return logits


@torch.no_grad()
def classify_folder(model, folder, batch_size: int = 256, device=None, exclude=(), include=None,
                    require_class_names: bool = True) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(logits (N, K), labels from the file names (N,), paths) for the PNGs of ``folder``."""
    device = device or _device_of(model)
    entries = list_pngs(folder, exclude, include, require_class_names=require_class_names)
    logits, labels = [], []
    for x, y in iter_batches(entries, batch_size, model_channels(model)):
        logits.append(_finite(model(x.to(device)).float().cpu()))
        labels.append(y)
    if not entries:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), []
    return torch.cat(logits), torch.cat(labels), [p for p, _ in entries]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits) in nats; 0 log 0 = 0, so confident outputs never give NaN."""
    logp = F.log_softmax(logits.double(), dim=1)
    p = logp.exp()
    return torch.where(p > 0, -p * logp, torch.zeros_like(p)).sum(1)


def unlearning_metrics(logits: torch.Tensor, labels: torch.Tensor, forget: Sequence[int]) -> dict:
    """UA, mean entropy and mean p(forget) over the images whose label is a forget class (see module doc)."""
    forget = sorted({int(c) for c in forget})
    if not forget:
        raise ValueError("give at least one forget class")
    if logits.ndim != 2 or len(logits) != len(labels):
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match")
    n_classes = logits.shape[1]
    for c in forget:
        if not 0 <= c < n_classes:
            raise ValueError(f"forget class {c} is out of range for a {n_classes}-class classifier")
    labels = labels.long()
    mask = torch.isin(labels, torch.tensor(forget))
    if not mask.any():
        raise ValueError(f"no images of the forget class(es) {forget} (found classes "
                         f"{sorted(set(labels.tolist()))}); UA needs images generated for the forget class")
    lg, lb = logits[mask], labels[mask]
    p_own = F.softmax(lg.double(), 1).gather(1, lb[:, None])[:, 0]
    forgotten = lg.argmax(1) != lb
    ent = entropy(lg)
    per_class = {}
    for c in forget:
        m = lb == c
        if m.any():
            per_class[str(c)] = {"n_images": int(m.sum()), "ua": float(forgotten[m].float().mean()),
                                 "mean_entropy": float(ent[m].mean()), "mean_p_forget": float(p_own[m].mean()),
                                 "predicted_counts": _counts(lg[m].argmax(1), n_classes)}
    return {"forget_classes": forget, "n_forget_images": int(mask.sum()), "n_images_total": len(labels),
            "ua": float(forgotten.float().mean()), "mean_entropy": float(ent.mean()),
            "mean_p_forget": float(p_own.mean()), "per_forget_class": per_class}


def remaining_class_accuracy(logits: torch.Tensor, labels: torch.Tensor, forget: Sequence[int]) -> dict:
    """Accuracy per remaining class (images of classes not in ``forget``) and their unweighted mean."""
    forget = {int(c) for c in forget}
    labels = labels.long()
    pred = logits.argmax(1) if len(logits) else labels
    kept = sorted(set(labels.tolist()) - forget - {-1})
    per_class, n_images = {}, 0
    for c in kept:
        m = labels == c
        per_class[str(c)] = float((pred[m] == c).float().mean())
        n_images += int(m.sum())
    return {"per_class_accuracy": per_class, "n_remaining_images": n_images,
            "remaining_accuracy": sum(per_class.values()) / len(per_class) if per_class else None}


def evaluate_ua(model, images: torch.Tensor, labels: torch.Tensor, forget: Sequence[int], batch_size: int = 256,
                device=None, quantize: bool = True) -> dict:
    """UA metrics and remaining-class accuracy for in-memory images in [-1, 1] with their generated-for labels.

    ``model``: a classifier from ``classifiers.load_classifier`` (or any images -> logits module).
    Images without a forget-class label only count towards the remaining-class accuracy.
    """
    logits = classify(model, images, batch_size, device, quantize)
    return {**unlearning_metrics(logits, torch.as_tensor(labels), forget),
            **remaining_class_accuracy(logits, torch.as_tensor(labels), forget)}


def evaluate_ua_folder(model, folder, forget: Sequence[int], batch_size: int = 256, device=None) -> dict:
    """As ``evaluate_ua`` for a folder of ``CCC_IIIII.png`` files (class = the name's first field)."""
    logits, labels, _ = classify_folder(model, folder, batch_size, device)
    if not len(labels):
        raise ValueError(f"no CCC_IIIII.png images in {folder}")
    return {**unlearning_metrics(logits, labels, forget), **remaining_class_accuracy(logits, labels, forget)}


def _counts(pred: torch.Tensor, n_classes: int) -> list[int]:
    return torch.bincount(pred, minlength=n_classes).tolist()


def _device_of(model):
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")
