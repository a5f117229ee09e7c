"""Which prompts reach the generator, the fake score and the teacher in each of SFD's four terms.

docs/method.md section 3 table (SD column):

| term         | generate at | fake score at                 | teacher at |
|--------------|-------------|-------------------------------|------------|
| phi remain   | c           | c                             | -          |
| phi forget   | c_f         | c_f  (c_o with sg_w_override) | -          |
| theta remain | c           | c                             | c          |
| theta forget | c_f         | c_f  (c_o with sg_w_override) | c_o        |

Fake-score training (the two phi terms) replaces each prompt by "" with probability
``dropout`` whenever the fake score itself is guided (kappa1 or kappa2 differs from 1; the
teacher's kappa4 does not matter, since the fake score's unconditional branch is only used
under kappa1/kappa2), so the fake score learns an unconditional branch for CFG. As in the
authors' code, a dropped item is also *generated* from ""; a dropped *forget* item's negative
prompt becomes "", a dropped *remain* item keeps its negative (``sid_w_neg``).

Negative prompts (when present) are used as the unconditional branch of: fake-score training
(``neg_fake_train``, kappa1), fake-score evaluation in the generator loss (``neg_fake_eval``,
kappa2), teacher evaluation (``neg_teacher``, kappa4). Forget items carry a paired negative;
remain items carry one only with ``sid_w_neg``.

``sg_w_override`` (a deliberate clean-up of the authors' partial wiring, upstream-behaviour bug 9):
the fake score is conditioned on c_o wherever it sees forget samples, i.e. it is *trained* at c_o on
G(z, c_f) samples (phi forget) and *evaluated* at c_o in theta forget. Its c_o branch then models
the generator's forget-prompt distribution, which is what the theta-forget term compares with the
teacher at c_o.
"""
from __future__ import annotations

from dataclasses import dataclass

from .config import TrainConfig
from .prompts import ForgetBatch, RemainBatch

TERMS = ("fake_remain", "fake_forget", "gen_remain", "gen_forget")


_D = TrainConfig()  # defaults live in one place: the settings schema


@dataclass(frozen=True)
class GuidanceSettings:
    kappa_fake_train: float = _D.kappa_fake_train   # kappa1
    kappa_fake_eval: float = _D.kappa_fake_eval     # kappa2
    kappa_teacher: float = _D.kappa_teacher         # kappa4
    neg_fake_train: bool = _D.neg_fake_train        # use_neg[0]
    neg_fake_eval: bool = _D.neg_fake_eval          # use_neg[1]
    neg_teacher: bool = _D.neg_teacher              # use_neg[2]
    sg_w_override: bool = _D.sg_w_override
    dropout: float = _D.prompt_dropout              # prompt dropout in fake-score training

    @property
    def dropout_active(self) -> bool:
        return self.dropout > 0 and (self.kappa_fake_train != 1.0 or self.kappa_fake_eval != 1.0)


@dataclass
class TermPrompts:
    generator: list[str]
    fake: list[str]
    fake_negative: list[str] | None
    fake_guidance: float
    teacher: list[str] | None = None
    teacher_negative: list[str] | None = None
    teacher_guidance: float = 1.0


def _drop(prompts, dropped):
    """Prompts with the dropped ones (classifier-free-guidance dropout) replaced by ""."""
    return None if prompts is None else ["" if d else p for p, d in zip(prompts, dropped)]


def _maybe(neg, flag):
    return list(neg) if (flag and neg is not None) else None


def route(term: str, batch: RemainBatch | ForgetBatch, g: GuidanceSettings,
          dropped: list[bool] | None = None) -> TermPrompts:
    """Prompts for one term. ``dropped`` marks items that prompt dropout replaced by "" (phi terms)."""
    if term not in TERMS:
        raise ValueError(f"unknown term {term!r}")
    is_fake = term.startswith("fake")
    if is_fake and dropped is None:
        dropped = [False] * (len(batch.prompts) if isinstance(batch, RemainBatch) else len(batch.forget))
    if isinstance(batch, RemainBatch):
        if not term.endswith("remain"):
            raise ValueError(f"{term} needs a forget batch")
        cond = list(batch.prompts)
        if is_fake:
            cond = _drop(cond, dropped)
            return TermPrompts(generator=cond, fake=cond, fake_negative=_maybe(batch.negative, g.neg_fake_train),
                               fake_guidance=g.kappa_fake_train)
        return TermPrompts(generator=cond, fake=cond, fake_negative=_maybe(batch.negative, g.neg_fake_eval),
                           fake_guidance=g.kappa_fake_eval, teacher=cond,
                           teacher_negative=_maybe(batch.negative, g.neg_teacher), teacher_guidance=g.kappa_teacher)
    if not term.endswith("forget"):
        raise ValueError(f"{term} needs a remain batch")
    forget, override = list(batch.forget), list(batch.override)
    fake_cond = override if g.sg_w_override else forget
    if is_fake:
        return TermPrompts(generator=_drop(forget, dropped), fake=_drop(fake_cond, dropped),
                           fake_negative=_maybe(_drop(batch.negative, dropped), g.neg_fake_train),
                           fake_guidance=g.kappa_fake_train)
    return TermPrompts(generator=forget, fake=fake_cond, fake_negative=_maybe(batch.negative, g.neg_fake_eval),
                       fake_guidance=g.kappa_fake_eval, teacher=override,
                       teacher_negative=_maybe(batch.negative, g.neg_teacher), teacher_guidance=g.kappa_teacher)
