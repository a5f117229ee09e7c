"""The sampling protocol of every table (demo report, `make compare`, scripts/aggregate.py), and the
statistics those tables print.

Why one definition: classifier-free guidance moves classifier FID by an order of magnitude on the
built-in teacher (issue 15), so a table that samples the multi-step models guided and the one-step
generator unguided compares unlike things. The protocol:

- a multi-step model (teacher, Retrain, SA, SalUn, ESD, VDU) gets two variants, *unguided* (w = 0)
  and *guided* (w = ``guidance``, default 2): DDIM with eta 0 and x0 clipped on the DDPM UNet, EDM's
  Heun sampler on an EDM SongUNet; ``steps`` is a setting;
- an SFD/SiD generator gets one variant, one step, *as distilled*: no guidance at sampling time, the
  guidance scale it was distilled with (its config's ``sfd.guidance``, 0 when absent) named in the
  header; the teacher variant at that w is its *distillation target*.

The statistics: a mean with a two-sided 95% Student-t interval over seeds, and the rule that marks a
difference between rows only where intervals separate.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .samplers import nfe

GUIDANCE = 2.0      # w of the guided variant
DDIM_STEPS = 50     # DDIM steps of a DDPM-UNet model (the demo's; make compare uses fewer)
EDM_STEPS = 18      # Heun steps of an EDM model (35 NFE unguided, EDM's CIFAR-10 setting)
SAMPLER_NAMES = {"ddim": "DDIM", "edm": "EDM-Heun", "ddpm": "DDPM", "one_step": "one-step"}


@dataclass(frozen=True)
class Variant:
    """One way of sampling one model. ``guidance`` is the w applied while sampling; ``distilled_w`` is
    the w a one-step generator was distilled with (None for a multi-step model)."""
    key: str                  # "unguided", "guided", "w<w>" (an extra teacher w) or "distilled"
    sampler: str
    steps: int
    guidance: float
    nfe: int
    eta: float = 0.0
    clip_x0: bool = False
    distilled_w: float | None = None

    @property
    def w(self) -> float:
        """The guidance scale the samples reflect (baked in for a generator, applied for the rest)."""
        return self.guidance if self.distilled_w is None else self.distilled_w

    @property
    def header(self) -> str:
        """Sampler, steps, guidance and NFE, e.g. 'DDIM-50, w=2, 100 NFE' or 'one-step, distilled at w=2, 1 NFE'."""
        if self.sampler == "one_step":
            return f"one-step, distilled at w={self.w:g}, {self.nfe} NFE"
        return f"{SAMPLER_NAMES.get(self.sampler, self.sampler)}-{self.steps}, w={self.w:g}, {self.nfe} NFE"

    def label(self, model: str) -> str:
        """A row label: the model's name and the header."""
        return f"{model} ({self.header})"

    def sample_kwargs(self) -> dict:
        """Keyword arguments of demo_report.generate / samplers.sample."""
        return {"sampler": self.sampler, "steps": self.steps, "eta": self.eta, "guidance": self.guidance,
                "clip_x0": self.clip_x0}

    def as_dict(self) -> dict:
        return {**asdict(self), "w": self.w, "header": self.header}


def is_generator(meta: dict) -> bool:
    """A one-step generator (SFD or SiD, checkpoint kind 'sfd') rather than a multi-step model."""
    return meta["kind"] == "sfd"


def distilled_guidance(cfg: dict) -> float:
    """The guidance w a generator was distilled with: its config's sfd.guidance, 0 (the authors' DDPM
    setting) when the key is absent (checkpoints from before guidance distillation existed)."""
    return float((cfg.get("sfd") or {}).get("guidance", 0.0) or 0.0)


def _multi_step(key: str, cfg: dict, w: float, ddim_steps: int, edm_steps: int) -> Variant:
    from .diffusion import schedule_of
    sampler = schedule_of(cfg).default_sampler   # "ddim" on the DDPM UNet, "edm" on a SongUNet
    steps = edm_steps if sampler == "edm" else ddim_steps
    T = cfg["diffusion"]["num_timesteps"]
    if sampler == "edm":     # Heun has no eta and no x0 clipping
        return Variant(key, "edm", steps, float(w), nfe("edm", steps, w, T))
    return Variant(key, "ddim", steps, float(w), nfe("ddim", steps, w, T), eta=0.0, clip_x0=True)


def multi_step_variants(cfg: dict, guidance: float = GUIDANCE, ddim_steps: int = DDIM_STEPS,
                        edm_steps: int = EDM_STEPS, extra_w: tuple = ()) -> list[Variant]:
    """The unguided and guided variants of a multi-step model with config ``cfg``; ``extra_w`` adds a
    variant for each other w (a generator's distillation w the two do not cover)."""
    out = [_multi_step("unguided", cfg, 0.0, ddim_steps, edm_steps),
           _multi_step("guided", cfg, guidance, ddim_steps, edm_steps)]
    for w in extra_w:
        if all(v.w != float(w) for v in out):
            out.append(_multi_step(f"w{float(w):g}", cfg, float(w), ddim_steps, edm_steps))
    return out


def generator_variant(cfg: dict) -> Variant:
    """The one variant of a one-step generator: as distilled (no guidance while sampling: a guided
    distillation bakes w into the generator)."""
    return Variant("distilled", "one_step", 1, 0.0, nfe("one_step", 1, 0.0, cfg["diffusion"]["num_timesteps"]),
                   distilled_w=distilled_guidance(cfg))


def variants_for(meta: dict, guidance: float = GUIDANCE, ddim_steps: int = DDIM_STEPS,
                 edm_steps: int = EDM_STEPS) -> list[Variant]:
    """The protocol's variants of a checkpoint from its metadata (checkpoints.read_metadata)."""
    if is_generator(meta):
        return [generator_variant(meta["config"])]
    return multi_step_variants(meta["config"], guidance, ddim_steps, edm_steps)


def checkpoint_variants(path, **kw) -> list[Variant]:
    """variants_for on a weights file or run directory (reads only the metadata)."""
    from .checkpoints import read_metadata
    from .loading import resolve_checkpoint
    return variants_for(read_metadata(resolve_checkpoint(path)), **kw)


def distillation_target(generator: Variant, teacher_variants: list[Variant]) -> Variant | None:
    """The teacher variant a generator was distilled towards: the one at the generator's w (None when
    the teacher was not sampled at that w; multi_step_variants(extra_w=...) adds it)."""
    return next((v for v in teacher_variants if v.sampler != "one_step" and v.w == generator.w), None)


# -- statistics ---------------------------------------------------------------------------------
# Two-sided 95% Student-t quantiles t_{0.975, df} for df = 1..30 (standard tables); beyond 30 the
# normal 1.960 (within 4% of t). A table rather than scipy, which is not a dependency of this tree.
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
       2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
       2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(df: int) -> float:
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    return T95[df - 1] if df <= len(T95) else 1.960


def mean_interval(values) -> dict:
    """{'mean', 'half', 'lo', 'hi', 'n', 'values'}: the mean and the two-sided 95% Student-t interval
    mean +- t_{0.975, n-1} s / sqrt(n) (s the sample standard deviation). One value: no interval
    (half = None, lo = hi = the value)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    m = sum(xs) / n
    if n == 1:
        return {"mean": m, "half": None, "lo": m, "hi": m, "n": 1, "values": xs}
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = t95(n - 1) * s / math.sqrt(n)
    return {"mean": m, "half": half, "lo": m - half, "hi": m + half, "n": n, "values": xs}


def separated(a: dict, b: dict) -> bool:
    """True when two intervals (mean_interval dicts) do not overlap. Without intervals (one seed)
    nothing separates: a single run says nothing about the spread."""
    if a.get("half") is None or b.get("half") is None:
        return False
    return a["hi"] < b["lo"] or b["hi"] < a["lo"]


def column_marks(cells: list[dict | None], higher_better: bool) -> list[str]:
    """Per row of one column: 'best' (the best mean, ties included), 'sep' (its interval does not
    overlap the best row's: a difference the seeds support) or '' (not distinguishable from the best).
    None cells (not measured, or rows that do not compete, such as the teacher) get ''."""
    present = [c["mean"] for c in cells if c is not None]
    if not present:
        return ["" for _ in cells]
    best_mean = max(present) if higher_better else min(present)
    best = next(c for c in cells if c is not None and c["mean"] == best_mean)
    return ["" if c is None else "best" if c["mean"] == best_mean else "sep" if separated(c, best) else ""
            for c in cells]


SEPARATED_MARK = "†"
RULE = ("Per column, among the unlearning methods' rows of one guidance scale w (multi-step models sampled at w, "
        "generators distilled at w; rows of different w are not compared): the best mean is in bold; † marks a row whose 95% "
        "interval does not overlap the best row's (a difference the seeds support). Rows without † are not "
        "distinguishable from the best at this number of seeds. With one seed nothing is marked †.")


def format_cell(c: dict | None, mark: str = "", digits: int = 3) -> str:
    """'mean ± half' (bold mean when best, † when separated from the best); '-' for no value."""
    if c is None:
        return "-"
    m = f"{c['mean']:.{digits}f}"
    if mark == "best":
        m = f"**{m}**"
    s = m if c.get("half") is None else f"{m} ± {c['half']:.{digits}f}"
    return s + (f" {SEPARATED_MARK}" if mark == "sep" else "")
