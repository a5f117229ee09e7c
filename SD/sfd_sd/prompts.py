"""Prompt data for SFD on Stable Diffusion (docs/method.md section 3, "SD defaults").

- Remain prompts: a user-supplied list (the authors used LAION-Aesthetics 6+ captions).
- Forget prompts: a prompt file, or the concept string itself.
- Override prompts: case-insensitive substitution concept_to_forget -> concept_to_override in each
  forget prompt (literal text, not a regular expression), or an override prompt file paired with the
  forget prompts as a Cartesian product.
- Positive keywords (nudity recipe): a random keyword is put before ("kw prompt") or after
  ("prompt, kw") each forget prompt, 50/50.
- Negative prompts: a random one is paired with each forget item (and with remain items when
  ``sid_w_neg``); they replace "" as the unconditional branch where the use_neg switches say so.

All randomness comes from an explicit ``torch.Generator`` so that training resumes exactly.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


class PromptError(ValueError):
    """Bad prompt input (missing file, empty list, inconsistent options)."""


def read_prompt_file(path: str | Path, what: str = "prompt file") -> list[str]:
    """One prompt per line; surrounding whitespace stripped; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise PromptError(f"{what} {str(path)!r} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{what} {str(path)!r} is not UTF-8 text (bad byte at offset {exc.start}); "
                          "save it as UTF-8") from None
    prompts = [line.strip() for line in text.splitlines()]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise PromptError(f"{what} {str(path)!r} holds no prompts")
    return prompts


def substitute_concept(prompt: str, concept: str, override: str) -> str:
    """Replace every case-insensitive occurrence of ``concept`` by ``override``.

    An empty concept leaves the prompt unchanged (the nudity recipe: override = bare subject).
    """
    if not concept:
        return prompt
    return re.sub(re.escape(concept), lambda _: override, prompt, flags=re.IGNORECASE)


def build_forget_pairs(forget_prompts: Sequence[str], concept_to_forget: str | None,
                       concept_to_override: str | None,
                       override_prompts: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """(forget prompt, override prompt) pairs.

    With ``override_prompts`` every forget prompt is paired with every override prompt (Cartesian
    product); otherwise each forget prompt is paired with its substituted version.
    """
    if not forget_prompts:
        raise PromptError("no forget prompts: give --forget-prompts or --concept-to-forget")
    if override_prompts:
        return [(f, o) for f in forget_prompts for o in override_prompts]
    if concept_to_override is None:
        raise PromptError("no override: give --concept-to-override or --override-prompts")
    if not concept_to_forget and concept_to_override:
        raise PromptError("--concept-to-override needs a non-empty --concept-to-forget to substitute")
    return [(f, substitute_concept(f, concept_to_forget or "", concept_to_override)) for f in forget_prompts]


def add_keyword(prompt: str, keyword: str, before: bool) -> str:
    return f"{keyword} {prompt}" if before else f"{prompt}, {keyword}"


def _choice(items: Sequence[str], n: int, gen: torch.Generator) -> list[str]:
    idx = torch.randint(len(items), (n,), generator=gen).tolist()
    return [items[i] for i in idx]


def dropout_mask(n: int, prob: float, gen: torch.Generator) -> list[bool]:
    """Which of ``n`` items prompt dropout replaces by "" (each independently with ``prob``)."""
    if prob <= 0:
        return [False] * n
    return (torch.rand(n, generator=gen) < prob).tolist()


@dataclass
class RemainBatch:
    prompts: list[str]
    negative: list[str] | None


@dataclass
class ForgetBatch:
    forget: list[str]      # c_f, after keyword augmentation
    override: list[str]    # c_o
    negative: list[str] | None


class PromptSampler:
    """Draws remain and forget batches uniformly at random (with replacement)."""

    def __init__(self, remain: Sequence[str], pairs: Sequence[tuple[str, str]],
                 keywords: Sequence[str] | None = None, negatives: Sequence[str] | None = None,
                 sid_w_neg: bool = False):
        if not remain:
            raise PromptError("no remain prompts")
        if not pairs:
            raise PromptError("no forget/override pairs")
        if sid_w_neg and not negatives:
            raise PromptError("--sid-w-neg needs --negative-prompts")
        self.remain = list(remain)
        self.pairs = list(pairs)
        self.keywords = list(keywords) if keywords else None
        self.negatives = list(negatives) if negatives else None
        self.sid_w_neg = sid_w_neg

    def remain_batch(self, n: int, gen: torch.Generator) -> RemainBatch:
        prompts = _choice(self.remain, n, gen)
        negative = _choice(self.negatives, n, gen) if self.sid_w_neg else None
        return RemainBatch(prompts, negative)

    def forget_batch(self, n: int, gen: torch.Generator) -> ForgetBatch:
        idx = torch.randint(len(self.pairs), (n,), generator=gen).tolist()
        forget = [self.pairs[i][0] for i in idx]
        override = [self.pairs[i][1] for i in idx]
        if self.keywords:
            kws = _choice(self.keywords, n, gen)
            before = (torch.rand(n, generator=gen) < 0.5).tolist()
            forget = [add_keyword(p, k, b) for p, k, b in zip(forget, kws, before)]
        negative = _choice(self.negatives, n, gen) if self.negatives else None
        return ForgetBatch(forget, override, negative)
