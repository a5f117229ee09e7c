"""Celebrity identification accuracy (docs/method.md section 7): is the forgotten celebrity still recognisable,
and are other celebrities still drawn recognisably?

Each image's *target* is the one name of the name list that its prompt contains (case-insensitive, whole
words); images whose prompt names no listed celebrity, or several, are left out (and counted). Then

- ``forget_accuracy``: share of images whose target is the forgotten celebrity that the recognizer
  identifies as that celebrity (lower = better forgetting);
- ``other_accuracy``: the same over images of every other listed celebrity (higher = better preservation).

The paper used the GIPHY Celebrity Detector (a face detector + classifier over ~2,300 celebrities). It is
not pip-installable with current Python, so the default recognizer is zero-shot CLIP over the name list:
the predicted name is the argmax of the cosine between the image and the mean embedding of the name in
the prompt templates (``"a photo of {name}."`` by default). Any other recognizer plugs in through
``--recognizer module:factory``; the factory is called as ``factory(names=[...], device="cuda"|"cpu")``
and returns an object with ``identify(paths) -> list of (name or None, confidence)`` (``None`` = no face
or no known celebrity, counted as not identified) and optionally a ``settings`` dict that is recorded.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

import torch

from .clip import ClipEmbedder
from .folders import ImageSet, check_readable
from .records import EvaluationError

DEFAULT_TEMPLATES = ("a photo of {name}.",)


def read_names(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise EvaluationError(f"name list {str(path)!r} not found")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    names = list(dict.fromkeys(n for n in names if n and not n.startswith("#")))
    if len(names) < 2:
        raise EvaluationError(f"name list {str(path)!r} needs at least 2 names")
    return names


def _pattern(name: str) -> re.Pattern:
    return re.compile(r"(?<![a-z0-9])" + re.escape(name.lower()) + r"(?![a-z0-9])")


def prompt_target(prompt: str | None, names: Sequence[str]) -> tuple[str | None, int]:
    """(the one listed name in the prompt or None, how many listed names it contains)."""
    if prompt is None:
        return None, 0
    found = [n for n in names if _pattern(n).search(prompt.lower())]
    return (found[0] if len(found) == 1 else None), len(found)


class ClipZeroShot:
    """Zero-shot CLIP over a name list (the default recognizer)."""

    def __init__(self, embedder: ClipEmbedder, names: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES):
        for t in templates:
            if "{name}" not in t:
                raise EvaluationError(f"--template {t!r} has no '{{name}}'")
        self.embedder, self.names, self.templates = embedder, list(names), list(templates)
        per_template = [embedder.embed_texts([t.format(name=n) for n in self.names]) for t in self.templates]
        self.name_embeddings = torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1)
        self.settings = dict(recognizer="clip-zero-shot", templates=self.templates, **embedder.settings)

    def identify(self, paths: Sequence[Path]) -> list[tuple[str, float]]:
        logits = self.embedder.logit_scale * self.embedder.embed_images(paths) @ self.name_embeddings.T
        probs = logits.softmax(-1)
        conf, idx = probs.max(-1)
        return [(self.names[i], float(c)) for i, c in zip(idx.tolist(), conf)]


def celebrity_accuracy(recognizer, images: ImageSet, names: Sequence[str], forget: str) -> tuple[dict, list[dict]]:
    canonical = {n.lower(): n for n in names}
    if forget.lower() not in canonical:
        raise EvaluationError(f"--forget {forget!r} is not in the name list")
    forget = canonical[forget.lower()]
    targets = [prompt_target(it.prompt, names) for it in images.items]
    kept = [(it, t) for it, (t, _) in zip(images.items, targets) if t is not None]
    if not kept:
        raise EvaluationError(f"no image in {str(images.folder)!r} has a prompt naming exactly one listed celebrity")
    if not isinstance(recognizer, ClipZeroShot):  # a plug-in reads the files itself (CLIP decodes through load_rgb)
        check_readable([it for it, _ in kept])
    preds = recognizer.identify([it.path for it, _ in kept])
    if len(preds) != len(kept):
        raise EvaluationError(f"recognizer returned {len(preds)} results for {len(kept)} images")
    rows = []
    for (it, target), (pred, conf) in zip(kept, preds):
        pred_c = canonical.get(pred.lower(), pred) if isinstance(pred, str) else None
        rows.append(dict(it.row(), target=target, predicted=pred_c, confidence=conf, correct=pred_c == target,
                         forget_target=target == forget))

    def acc(sel):
        return dict(accuracy=sum(r["correct"] for r in sel) / len(sel), images=len(sel)) if sel else \
            dict(accuracy=None, images=0)

    forget_rows = [r for r in rows if r["forget_target"]]
    other_rows = [r for r in rows if not r["forget_target"]]
    per_name = {n: acc([r for r in rows if r["target"] == n]) for n in dict.fromkeys(r["target"] for r in rows)}
    totals = dict(forget=forget, forget_accuracy=acc(forget_rows)["accuracy"], forget_images=len(forget_rows),
                  other_accuracy=acc(other_rows)["accuracy"], other_images=len(other_rows), per_name=per_name,
                  skipped_no_name=sum(n == 0 for _, n in targets), skipped_several_names=sum(n > 1 for _, n in targets),
                  forget_predicted_as=_histogram(r["predicted"] for r in forget_rows))
    return totals, rows


def _histogram(values) -> dict:
    out: dict = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))
