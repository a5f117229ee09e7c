"""One typed settings schema for SD training: defaults <- YAML config <- KEY=VALUE overrides.

Every key is a field of ``TrainConfig`` with its default, type and meaning (``python train.py
--list-keys`` prints them). Unknown keys are errors with a suggestion; values are type-checked.
Paths inside a YAML config are relative to that file's folder; paths given as overrides are
relative to the current directory. The resolved config is printed by ``--dry-run`` and saved as
``config.json`` in the run dir.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .models import DEFAULT_SD_MODEL


class ConfigError(ValueError):
    """Inconsistent or unknown settings; the message names the key and what to change."""


def K(default, help_text: str, group: str, choices: tuple | None = None):
    """A schema key: default, meaning, help group, allowed values."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: list(d) if isinstance(d, list) else dict(d),
                     metadata=dict(help=help_text, group=group, choices=choices))
    return field(default=default, metadata=dict(help=help_text, group=group, choices=choices))


# Keys holding file or folder paths (resolved against the config file's folder when set in YAML).
PATH_KEYS = ("remain_prompts", "forget_prompts", "override_prompts", "keywords", "negative_prompts", "val_prompts",
             "generator_init")
BUILTIN_REMAIN = "remain_prompts_small.txt"  # 40 toy captions: tests and smoke runs only


@dataclass
class TrainConfig:
    # Model
    sd_model: str = K(DEFAULT_SD_MODEL, "teacher: hub id or local folder in diffusers layout (unet/, vae/, "
                      "text_encoder/, tokenizer/, scheduler/)", "Model")
    revision: str | None = K(None, "hub revision (branch, tag or commit) of sd_model", "Model")
    generator_init: str | None = K(None, "generator start: a diffusers UNet folder, e.g. the SiD-LSG generator converted "
                                   "by convert_sid_lsg.py (the paper's setting), or 'teacher' (a copy of the teacher "
                                   "UNet; not the paper's setting). Required", "Model")
    resolution: int = K(512, "image resolution in pixels (latents are resolution/8)", "Model")
    adapter: str = K("full", "full = fake score and generator are whole trainable UNets (the paper's setting); lora = "
                     "both are frozen UNets with a trainable LoRA adapter (peft): the fake score is the teacher's "
                     "weights + an adapter, the generator the generator start + its own adapter (README: 'LoRA "
                     "mode')", "Model", ("full", "lora"))
    lora_rank: int = K(16, "LoRA rank r (adapter=lora)", "Model")
    lora_alpha: float = K(16.0, "LoRA alpha; the adapter's update is scaled by alpha / r (adapter=lora)", "Model")
    lora_targets: list[str] = K(["to_q", "to_k", "to_v", "to_out.0"], "module names (suffixes) that get an adapter "
                                "(adapter=lora); the default: the attention projections of every UNet transformer "
                                "block", "Model")
    lora_dropout: float = K(0.0, "dropout on the adapter's input (adapter=lora; 0 = off)", "Model")
    # Prompts
    remain_prompts: str | None = K(None, "remain prompts, one per line (the authors: LAION-Aesthetics 6+ captions; "
                                   "build the file with prepare_remain_prompts.py). Required", "Prompts")
    forget_prompts: str | None = K(None, "forget prompts, one per line; without it the forget prompt is "
                                   "concept_to_forget itself", "Prompts")
    concept_to_forget: str | None = K(None, "concept replaced (case-insensitive, literal) in each forget prompt; may be "
                                      "'' (nudity)", "Prompts")
    concept_to_override: str | None = K(None, "replacement text giving the override prompt c_o", "Prompts")
    override_prompts: str | None = K(None, "override prompt file, paired with the forget prompts as a Cartesian "
                                     "product (instead of substitution)", "Prompts")
    keywords: str | None = K(None, "positive keywords: one is added before or after (50/50) each forget prompt", "Prompts")
    negative_prompts: str | None = K(None, "negative prompts: replace '' as the unconditional CFG branch where the "
                                     "neg_* switches say so", "Prompts")
    val_prompts: str | None = K(None, "validation prompts (grids only)", "Prompts")
    neg_fake_train: bool = K(False, "negative prompt in fake-score training (use_neg[0], kappa1)", "Prompts")
    neg_fake_eval: bool = K(False, "negative prompt for the fake score in the generator loss (use_neg[1], kappa2)",
                            "Prompts")
    neg_teacher: bool = K(True, "negative prompt for the teacher in the generator loss (use_neg[2], kappa4)", "Prompts")
    sid_w_neg: bool = K(False, "also pair remain prompts with random negative prompts", "Prompts")
    sg_w_override: bool = K(False, "condition the fake score on the override prompt for forget samples", "Prompts")
    # Method (docs/method.md section 3, SD defaults)
    alpha: float = K(1.0, "SiD alpha", "Method")
    t_min: int = K(20, "lowest training timestep (inclusive)", "Method")
    t_max: int = K(980, "highest training timestep (exclusive)", "Method")
    t_init: int = K(625, "generator timestep t* (sigma ~ 2.5)", "Method")
    kappa_fake_train: float = K(4.5, "kappa1: CFG scale of the fake score in its own training loss", "Method")
    kappa_fake_eval: float = K(4.5, "kappa2: CFG scale of the fake score in the generator loss", "Method")
    kappa_teacher: float = K(4.5, "kappa4: CFG scale of the teacher in the generator loss", "Method")
    prompt_dropout: float = K(0.1, "share of fake-score training prompts replaced by '' (only when kappa1 or kappa2 "
                              "differs from 1, as the authors did)", "Method")
    w_fake_remain: float = K(1.0, "weight of the phi remain term", "Method")
    w_fake_forget: float = K(1.0, "weight of the phi forget term", "Method")
    w_gen_remain: float = K(1.0, "weight of the theta remain term", "Method")
    w_gen_forget: float = K(1.0, "weight of the theta forget term", "Method")
    # Optimiser and numerics
    lr_fake: float = K(3e-6, "Adam learning rate of the fake score", "Optimiser")
    lr_gen: float = K(1e-6, "Adam learning rate of the generator", "Optimiser")
    adam_betas: list[float] = K([0.0, 0.999], "Adam betas", "Optimiser")
    adam_eps: float | None = K(None, "Adam epsilon; null = the authors' choice: 1e-6 with precision fp16, else 1e-8",
                               "Optimiser")
    fake_grad_clip_value: float = K(0.0, "element-wise gradient value clip of the fake score (0 = off, as the "
                                    "authors)", "Optimiser")
    generator_grad_clip_value: float | None = K(None, "element-wise gradient value clip of the generator (0 = off); "
                                                "null = the authors' choice: 1 with precision fp16, else off",
                                                "Optimiser")
    batch: int = K(8, "global batch (all processes)", "Optimiser")
    batch_gpu: int | None = K(None, "micro-batch per process; the rest is gradient accumulation (null = batch / "
                              "processes)", "Optimiser")
    ema_halflife_kimg: float = K(0.0, "generator EMA half-life in kimg (0 = no EMA, as the authors' SD runs)",
                                 "Optimiser")
    ema_rampup: float = K(0.05, "EMA ramp-up ratio (half-life <= ratio x images seen; 0 = off)", "Optimiser")
    # Schedule, counted in thousands of images seen
    duration_kimg: float = K(100.0, "training length in thousands of images seen", "Schedule")
    tick_kimg: float = K(0.4, "log interval (log.jsonl)", "Schedule")
    snap_kimg: float = K(5.0, "generator snapshot + grid interval", "Schedule")
    state_kimg: float = K(5.0, "training-state (resume) interval", "Schedule")
    grid_cols: int = K(4, "seeds per grid row", "Schedule")
    seed: int = K(0, "random seed", "Schedule")
    # Performance
    precision: str = K("auto", "auto = bf16 on CUDA GPUs that have it (else fp16), fp32 on CPU; bf16/fp16 autocast "
                       "with fp32 master weights", "Performance", ("auto", "bf16", "fp16", "fp32"))
    device: str = K("auto", "compute device", "Performance", ("auto", "cuda", "cpu"))
    attention: str = K("sdpa", "attention kernel", "Performance", ("sdpa", "xformers"))
    grad_checkpointing: bool = K(True, "recompute UNet block activations in backward (less memory, ~30% slower)",
                                 "Performance")
    text_cache: int = K(256, "prompt embeddings kept in an LRU cache", "Performance")
    # I/O
    outdir: str = K("runs/sd", "root of numbered run dirs (relative to the current directory)", "I/O")
    desc: str | None = K(None, "name part of the run dir", "I/O")
    run_dir: str | None = K(None, "use this run dir instead of a new numbered one", "I/O")
    keep_states: int = K(2, "training states kept on disk: the newest K (0 = all); snapshots are all kept", "I/O")
    report_to: str = K("none", "also log numbers and grids to TensorBoard (<run dir>/tensorboard; needs `pip install "
                       "tensorboard`)", "I/O", ("none", "tensorboard"))
    # Set by train.py's flags, not keys
    resume: str | None = field(default=None, metadata=dict(help="", group="flag", choices=None))
    allow_changed_settings: bool = field(default=False, metadata=dict(help="", group="flag", choices=None))
    resolved: dict = field(default_factory=dict, metadata=dict(help="", group="flag", choices=None))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    # Numerics the authors tied to fp16 (upstream: Adam eps 1e-6 and generator value clip 1 in fp16).
    def adam_eps_for(self, precision: str) -> float:
        return self.adam_eps if self.adam_eps is not None else (1e-6 if precision == "fp16" else 1e-8)

    def generator_clip_for(self, precision: str) -> float:
        if self.generator_grad_clip_value is not None:
            return self.generator_grad_clip_value
        return 1.0 if precision == "fp16" else 0.0

    def check(self) -> None:
        """Consistency checks that need no file (files are checked where they are read)."""
        check_ranges(self)
        if not self.remain_prompts:
            raise ConfigError("remain_prompts is required (one prompt per line; build it with "
                              "prepare_remain_prompts.py, see README)")
        if self.forget_prompts is None and not self.concept_to_forget:
            raise ConfigError("give forget_prompts or a non-empty concept_to_forget")
        if self.override_prompts is None and self.concept_to_override is None:
            raise ConfigError("give concept_to_override or override_prompts")
        if len(self.adam_betas) != 2:
            raise ConfigError(f"adam_betas must be two numbers (beta1, beta2), got {self.adam_betas}")
        if not self.t_min < self.t_max:
            raise ConfigError(f"need t_min < t_max, got t_min={self.t_min}, t_max={self.t_max}")
        if self.sid_w_neg and not self.negative_prompts:
            raise ConfigError("sid_w_neg needs negative_prompts")
        if self.adapter == "lora" and not self.lora_targets:
            raise ConfigError("adapter=lora needs at least one module name in lora_targets")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")

    def batch_layout(self, world_size: int) -> tuple[int, int, int]:
        """(per-GPU batch, micro-batch, accumulation rounds); errors on uneven splits."""
        if self.batch % world_size:
            raise ConfigError(f"batch {self.batch} is not divisible by the {world_size} processes")
        per_gpu = self.batch // world_size
        micro = min(self.batch_gpu or per_gpu, per_gpu)
        if per_gpu % micro:
            raise ConfigError(f"per-GPU batch {per_gpu} is not divisible by batch_gpu {micro}")
        return per_gpu, micro, per_gpu // micro


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric key: an interval, closed unless ``*_open``; None = unbounded."""
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, value) -> bool:
        if not math.isfinite(value):  # nan passes no comparison; inf is never a meant rate or weight
            return False
        if self.lo is not None and (value < self.lo or (self.lo_open and value == self.lo)):
            return False
        return self.hi is None or (value < self.hi or (not self.hi_open and value == self.hi))

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


POSITIVE, NON_NEGATIVE, UNIT = Range(0, lo_open=True), Range(0), Range(0, 1)

# The valid values of every numeric key (rates, weights, probabilities, scales, counts), checked by
# TrainConfig.check() before any model loads. Every int/float key must be listed here
# (tests/test_config_ranges.py walks the schema): an unchecked rate is how `ema=1.5` once ran to the end
# with weights growing to 1e6 and exit status 0. Lists (adam_betas) are checked element by element.
RANGES: dict[str, Range] = {
    # Method (docs/method.md section 3)
    "alpha": NON_NEGATIVE,  # SiD's alpha: 1 for SD, 1.2 for DDPM; below 0 the correction term changes sign
    "t_min": Range(0, 999),  # timesteps of the 1000-step DDPM schedule; t_min < t_max is checked too
    "t_max": Range(1, 1000),
    "t_init": Range(1, 999),
    "kappa_fake_train": POSITIVE,  # CFG scales: 1 = one conditional pass, 4.5 = the authors'
    "kappa_fake_eval": POSITIVE,
    "kappa_teacher": POSITIVE,
    "prompt_dropout": UNIT,  # a probability
    "w_fake_remain": NON_NEGATIVE,  # loss weights; 0 switches a term off (SiD distillation: forget weights 0)
    "w_fake_forget": NON_NEGATIVE,
    "w_gen_remain": NON_NEGATIVE,
    "w_gen_forget": NON_NEGATIVE,
    # Optimiser and numerics
    "lr_fake": POSITIVE,
    "lr_gen": POSITIVE,
    "adam_betas": Range(0, 1, hi_open=True),  # each: Adam's decay rates; 1 would never forget the first step
    "adam_eps": POSITIVE,
    "fake_grad_clip_value": NON_NEGATIVE,  # 0 = off
    "generator_grad_clip_value": NON_NEGATIVE,
    "batch": Range(1),
    "batch_gpu": Range(1),
    "ema_halflife_kimg": NON_NEGATIVE,  # 0 = no EMA; the decay per step is 0.5 ** (batch / half-life), in [0, 1)
    "ema_rampup": UNIT,  # half-life <= this share of the images seen (EDM: 0.05); above 1 it would let the
    # EMA trail behind all of training, which no schedule intends
    # Schedule
    "duration_kimg": POSITIVE,
    "tick_kimg": POSITIVE,
    "snap_kimg": POSITIVE,
    "state_kimg": POSITIVE,
    "grid_cols": Range(1, 16),
    "seed": Range(0, 2**32 - 1),  # 32 bits: seed * 1_000_003 + rank + images seen stays a valid torch seed
    # Model, performance, I/O
    "resolution": Range(8),
    # LoRA mode (adapter=lora)
    "lora_rank": Range(1, 1024),  # r: 1 is the smallest adapter; above 1024 it is bigger than the layers it adapts
    "lora_alpha": POSITIVE,  # the update is scaled by alpha / r; 0 would switch the adapter off
    "lora_dropout": Range(0, 1, hi_open=True),  # a probability; 1 would drop every input  # and a multiple of 8 (the VAE factor), checked in TrainConfig.check()
    "text_cache": NON_NEGATIVE,
    "keep_states": NON_NEGATIVE,  # 0 = keep all
}


def _is_numeric(hint) -> bool:
    """int or float, optional (``float | None``) or a list of them."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    if typing.get_origin(hint) is list:
        hint = typing.get_args(hint)[0]
    return hint in (int, float)


def unranged_keys(schema: type | None = None) -> list[str]:
    """Numeric keys of ``schema`` (default TrainConfig) with no entry in RANGES; must be empty."""
    schema = schema or TrainConfig
    hints = typing.get_type_hints(schema)
    return [f.name for f in dataclasses.fields(schema)
            if f.metadata.get("group") != "flag" and _is_numeric(hints[f.name]) and f.name not in RANGES]


def check_ranges(cfg: "TrainConfig") -> None:
    """Every numeric key in its RANGES interval (null allowed where the key is optional)."""
    for key, valid in RANGES.items():
        value = getattr(cfg, key)
        if value is None and _is_optional(key):
            continue
        if not all(v in valid for v in (value if isinstance(value, list) else [value])):
            each = f"each be {valid}" if isinstance(value, list) else f"be {valid}"
            null = " (or null)" if _is_optional(key) else ""
            raise ConfigError(f"{key} must {each}{null}, got {value!r}")


def _is_optional(key: str) -> bool:
    return type(None) in typing.get_args(_TYPES[key])


def schema_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("group") != "flag"]


_TYPES = typing.get_type_hints(TrainConfig)


def _check_value(key: str, value):
    """The value converted to the key's type, or a ConfigError saying what is expected."""
    hint = _TYPES[key]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
    elif base is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        value = int(value)
    elif base is float:
        if isinstance(value, str):  # YAML reads 1e-6 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
    elif typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        item = typing.get_args(base)[0]
        value = [_check_value_item(key, v, item) for v in value]
    choices = next(f for f in dataclasses.fields(TrainConfig) if f.name == key).metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _check_value_item(key, v, item=float):
    if item is str:
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{key} must hold non-empty strings, got {v!r}")
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"{key} must hold numbers, got {v!r}")
    return float(v)


def _resolve_path(value, base: Path | None):
    if value is None or base is None or value == "teacher" or Path(value).expanduser().is_absolute():
        return value
    return str((base / value).resolve())


def merge(cfg: dict, update: dict, source: str, base: Path | None = None) -> None:
    """Apply ``update`` to ``cfg`` with checks; ``base`` resolves relative paths (config files)."""
    keys = [f.name for f in schema_fields()]
    for key, value in update.items():
        if key not in keys:
            close = difflib.get_close_matches(key, keys, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key {key!r}{hint}; `train.py --list-keys` lists them all")
        value = _check_value(key, value)
        cfg[key] = _resolve_path(value, base) if key in PATH_KEYS else value


def parse_override(text: str) -> dict:
    """``key=value`` -> {key: value}, the value parsed as YAML (numbers, true/false, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the value of override {text!r}: {err}") from None
    return {key.strip(): value}


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
    return data


def load_config(path: str | Path | None = None, overrides=(), base: dict | None = None) -> TrainConfig:
    """defaults (or ``base``, e.g. a resumed run's config) <- YAML file <- overrides, checked."""
    cfg = {f.name: getattr(TrainConfig(), f.name) for f in schema_fields()}
    if base:
        merge(cfg, {k: v for k, v in base.items() if k in cfg}, "resumed config")
    if path is not None:
        merge(cfg, read_yaml(path), str(path), base=Path(path).resolve().parent)
    for text in overrides:
        merge(cfg, parse_override(text), f"override {text!r}", base=Path.cwd())
    return TrainConfig(**cfg)


def describe() -> list[str]:
    """Every key with its default and meaning, grouped (for --list-keys)."""
    lines, group = [], None
    for f in schema_fields():
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines.append(f"# {group}")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        valid = f" [{RANGES[f.name]}]" if f.name in RANGES else ""
        lines.append(f"{f.name} = {json.dumps(default)}\n    {f.metadata['help']}{valid}")
    return lines


def slug(text: str, max_len: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:max_len].strip("-") or "empty"


def run_dir_name(cfg: TrainConfig, number: int, world_size: int, precision: str) -> str:
    what = cfg.desc or cfg.concept_to_forget or Path(cfg.forget_prompts or "forget").stem
    return f"{number:05d}-sfd-{slug(what)}-gpus{world_size}-batch{cfg.batch}-{precision}"


def new_run_dir(cfg: TrainConfig, world_size: int, precision: str) -> Path:
    """Create and return this run's folder: ``cfg.run_dir``, or the next free ``outdir/NNNNN-sfd-...``.

    The number is claimed atomically: the scan and the (exclusive) mkdir happen under a lock on
    ``outdir`` itself, and a name that appeared meanwhile makes the next number be tried, so two runs
    started together on one outdir never share a folder or a number."""
    import fcntl
    import os

    if cfg.run_dir:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        return Path(cfg.run_dir)
    root = Path(cfg.outdir)
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released on close, or when the process dies
        for _ in range(1000):
            ids = [int(m.group(1)) for p in root.iterdir() if (m := re.match(r"^(\d{5})-", p.name))]
            run_dir = root / run_dir_name(cfg, max(ids, default=-1) + 1, world_size, precision)
            try:
                run_dir.mkdir()
                return run_dir
            except FileExistsError:
                continue  # made by a writer that does not take the lock: the rescan counts it
    finally:
        os.close(fd)
    raise ConfigError(f"could not claim a new run folder in {root}")
