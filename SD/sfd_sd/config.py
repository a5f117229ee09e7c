"""The resolved training configuration (flat options -> one dataclass -> JSON in the run dir)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

from .models import DEFAULT_SD_MODEL


class ConfigError(ValueError):
    """Inconsistent options; the message names the option."""


@dataclass
class TrainConfig:
    # Model
    sd_model: str = DEFAULT_SD_MODEL
    revision: str | None = None
    init_generator: str = "teacher"
    allow_pickle: bool = False
    resolution: int = 512
    # Prompts
    remain_prompts: str | None = None
    forget_prompts: str | None = None
    concept_to_forget: str | None = None
    concept_to_override: str | None = None
    override_prompts: str | None = None
    keywords: str | None = None
    negative_prompts: str | None = None
    val_prompts: str | None = None
    sid_w_neg: bool = False
    sg_w_override: bool = False
    neg_fake_train: bool = False
    neg_fake_eval: bool = False
    neg_teacher: bool = True
    # Method hyperparameters (SPEC section 3, SD defaults)
    alpha: float = 1.0
    t_min: int = 20
    t_max: int = 980
    t_init: int = 625
    kappa_fake_train: float = 4.5
    kappa_fake_eval: float = 4.5
    kappa_teacher: float = 4.5
    prompt_dropout: float = 0.1
    w_fake_remain: float = 1.0
    w_fake_forget: float = 1.0
    w_gen_remain: float = 1.0
    w_gen_forget: float = 1.0
    lr_fake: float = 3e-6
    lr_gen: float = 1e-6
    adam_betas: tuple[float, float] = (0.0, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 0.0
    batch: int = 8
    batch_gpu: int | None = None
    ema_halflife_kimg: float = 0.0
    ema_rampup: float = 0.05
    # Schedule, counted in thousands of images seen
    duration_kimg: float = 100.0
    tick_kimg: float = 0.4
    snap_kimg: float = 5.0
    state_kimg: float = 5.0
    grid_cols: int = 4
    seed: int = 0
    # Performance
    precision: str = "auto"
    device: str = "auto"
    attention: str = "sdpa"
    grad_checkpointing: bool = True
    text_cache: int = 256
    # I/O
    outdir: str = "runs/sd"
    desc: str | None = None
    run_dir: str | None = None
    resume: str | None = None
    allow_changed_settings: bool = False
    # Filled in by resolve()
    resolved: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        if not self.remain_prompts:
            raise ConfigError("--remain-prompts is required (one prompt per line; see README)")
        if self.forget_prompts is None and not self.concept_to_forget:
            raise ConfigError("give --forget-prompts or a non-empty --concept-to-forget")
        if self.override_prompts is None and self.concept_to_override is None:
            raise ConfigError("give --concept-to-override or --override-prompts")
        if not 0 <= self.t_min < self.t_max <= 1000:
            raise ConfigError(f"need 0 <= --t-min < --t-max <= 1000, got {self.t_min}, {self.t_max}")
        if not 0 < self.t_init < 1000:
            raise ConfigError(f"--t-init must be in 1..999, got {self.t_init}")
        if self.sid_w_neg and not self.negative_prompts:
            raise ConfigError("--sid-w-neg needs --negative-prompts")
        if self.resolution % 8:
            raise ConfigError("--resolution must be a multiple of 8")
        if self.state_kimg <= 0 or self.snap_kimg <= 0 or self.tick_kimg <= 0:
            raise ConfigError("--tick, --snap and --state must be positive")

    def batch_layout(self, world_size: int) -> tuple[int, int, int]:
        """(per-GPU batch, micro-batch, accumulation rounds); errors on uneven splits."""
        if self.batch % world_size:
            raise ConfigError(f"--batch {self.batch} is not divisible by the {world_size} processes")
        per_gpu = self.batch // world_size
        micro = min(self.batch_gpu or per_gpu, per_gpu)
        if per_gpu % micro:
            raise ConfigError(f"per-GPU batch {per_gpu} is not divisible by --batch-gpu {micro}")
        return per_gpu, micro, per_gpu // micro


def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].strip("-") or "empty"


def new_run_dir(cfg: TrainConfig, world_size: int, precision: str) -> Path:
    if cfg.run_dir:
        return Path(cfg.run_dir)
    root = Path(cfg.outdir)
    ids = [int(m.group(1)) for p in root.glob("*") if (m := re.match(r"^(\d{5})-", p.name))] if root.is_dir() else []
    what = cfg.desc or cfg.concept_to_forget or Path(cfg.forget_prompts or "forget").stem
    name = f"{max(ids, default=-1) + 1:05d}-sfd-{slug(what)}-gpus{world_size}-batch{cfg.batch}-{precision}"
    return root / name
