"""The SFD training loop for Stable Diffusion (docs/method.md section 3).

Each iteration: (1) fake-score step on the phi remain and phi forget terms, (2) generator step on
the theta remain and theta forget terms, (3) optional generator EMA. Every term draws fresh
prompts, z, eps and t. Progress is counted in images seen (global batch per iteration).

``train`` runs named steps: check the inputs (cheap, nothing written), build the networks and
optimisers, open the run dir (lock, leftovers of a killed write, log truncated on resume), then the
loop of iterations with ``log_tick``, ``write_snapshot`` and ``write_state``. A term whose samples
are all non-finite stops the run (``NonFiniteLoss``) before any optimiser step, so the last written
state is the last good one. SIGTERM/SIGUSR1 (a cluster's preemption notice) end the current iteration,
write its state and raise ``Preempted`` (``preemption.py``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoints, disk, distributed, images, models, reporting
from .config import BUILTIN_REMAIN, ConfigError, TrainConfig, new_run_dir
from .denoiser import GuidedDenoiser, PromptEncoder, VPSchedule, one_step_generate
from .losses import clean_gradients_, fake_score_loss, masked_sum, sid_generator_loss
from .preemption import Preempted, StopSignal
from .prompts import PromptError, PromptSampler, build_forget_pairs, dropout_mask, read_prompt_file
from .terms import GuidanceSettings, route

LOSS_NAMES = ("loss_fake_remain", "loss_fake_forget", "loss_gen_remain", "loss_gen_forget")


class NonFiniteLoss(checkpoints.CheckpointError):
    """Every sample of a loss term was NaN/inf: training cannot continue meaningfully (the CLI exits 1)."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("--precision fp16 needs a CUDA device (use fp32 or bf16 on CPU)")
    return precision


def build_prompt_sampler(cfg: TrainConfig) -> tuple[PromptSampler, list[str], list[str]]:
    """The prompt sampler, the validation prompts and the bare forget prompts (for grids)."""
    if not Path(cfg.remain_prompts).is_file():
        raise PromptError(f"remain_prompts {cfg.remain_prompts!r} not found; build it from LAION-Aesthetics 6+ "
                          "captions with prepare_remain_prompts.py (README: 'Remain prompts')")
    remain = read_prompt_file(cfg.remain_prompts, "remain_prompts")
    if Path(cfg.remain_prompts).name == BUILTIN_REMAIN:
        warnings.warn(f"remain_prompts is the built-in {BUILTIN_REMAIN} ({len(remain)} toy captions), meant for "
                      "tests only; the paper used LAION-Aesthetics 6+ captions (prepare_remain_prompts.py)",
                      stacklevel=2)
    if cfg.forget_prompts:
        forget = read_prompt_file(cfg.forget_prompts, "forget_prompts")
    else:
        forget = [cfg.concept_to_forget]
    override = read_prompt_file(cfg.override_prompts, "override_prompts") if cfg.override_prompts else None
    pairs = build_forget_pairs(forget, cfg.concept_to_forget, cfg.concept_to_override, override)
    keywords = read_prompt_file(cfg.keywords, "keywords") if cfg.keywords else None
    negatives = read_prompt_file(cfg.negative_prompts, "negative_prompts") if cfg.negative_prompts else None
    val = read_prompt_file(cfg.val_prompts, "val_prompts") if cfg.val_prompts else []
    sampler = PromptSampler(remain, pairs, keywords=keywords, negatives=negatives, sid_w_neg=cfg.sid_w_neg)
    return sampler, val, forget


def guidance_settings(cfg: TrainConfig) -> GuidanceSettings:
    return GuidanceSettings(
        kappa_fake_train=cfg.kappa_fake_train, kappa_fake_eval=cfg.kappa_fake_eval,
        kappa_teacher=cfg.kappa_teacher, neg_fake_train=cfg.neg_fake_train, neg_fake_eval=cfg.neg_fake_eval,
        neg_teacher=cfg.neg_teacher, sg_w_override=cfg.sg_w_override, dropout=cfg.prompt_dropout)


@dataclass
class Nets:
    teacher: GuidedDenoiser
    fake: GuidedDenoiser
    generator: GuidedDenoiser
    ema: torch.nn.Module | None
    # The trained tensors of fake score, generator and EMA; None = every parameter of the net (full mode).
    # In LoRA mode (lora.py) they are the adapter tensors only: the rest of each net stays frozen.
    fake_params: list | None = None
    gen_params: list | None = None
    ema_params: list | None = None

    def params(self, which: str) -> list[torch.nn.Parameter]:
        explicit = {"fake": self.fake_params, "gen": self.gen_params, "ema": self.ema_params}[which]
        if explicit is not None:
            return explicit
        module = self.ema if which == "ema" else (self.fake if which == "fake" else self.generator).unet
        return list(module.parameters()) if module is not None else []


def _set_trainable(params, flag: bool) -> None:
    for p in params:
        p.requires_grad_(flag)


class SFDStep:
    """One SFD iteration on one rank; the denoisers are injectable for tests."""

    def __init__(self, cfg: TrainConfig, nets: Nets, sampler: PromptSampler, guidance: GuidanceSettings,
                 dist: distributed.Dist, opt_fake, opt_gen, scaler_fake, scaler_gen,
                 prompt_gen: torch.Generator, noise_gen: torch.Generator, latent_shape: tuple[int, ...],
                 precision: str = "fp32"):
        self.cfg, self.nets, self.sampler, self.g, self.dist = cfg, nets, sampler, guidance, dist
        self.opt_fake, self.opt_gen, self.scaler_fake, self.scaler_gen = opt_fake, opt_gen, scaler_fake, scaler_gen
        self.prompt_gen, self.noise_gen = prompt_gen, noise_gen
        self.latent_shape = latent_shape
        self.per_gpu, self.micro, self.rounds = cfg.batch_layout(dist.world_size)
        self.device = dist.device
        self.clip_fake, self.clip_gen = cfg.fake_grad_clip_value, cfg.generator_clip_for(precision)

    # Random draws: all from explicit generators (exact resume).
    def _z_eps_t(self, n: int):
        kw = dict(generator=self.noise_gen, device=self.device)
        z = torch.randn((n, *self.latent_shape), **kw)
        eps = torch.randn((n, *self.latent_shape), **kw)
        t = torch.randint(self.cfg.t_min, self.cfg.t_max, (n,), **kw)
        return z, eps, t

    def _backward(self, loss, n, weight, scaler):
        if n and weight:
            scaler.scale(loss * weight).backward()

    def _check_finite(self, bad: list[str], cur_nimg: int) -> None:
        """Stop on every rank when any rank had a term with no finite sample (before any step)."""
        flag = self.dist.mean_(torch.tensor([float(bool(bad))], device=self.device))
        if float(flag) > 0:
            where = ", ".join(bad) if bad else "a term on another rank"
            raise NonFiniteLoss(
                f"non-finite loss after {cur_nimg} images seen: every sample of {where} was NaN/inf. The run "
                "stopped before this step; the last training state written is the last good one. Check the "
                "networks for non-finite weights and lower the learning rates or use precision=fp32.")

    def _term(self, per: torch.Tensor, weight: float, scaler, bad: list[str], term: str) -> tuple[float, int]:
        """Backward one term's finite samples; returns (loss value, samples dropped)."""
        loss, kept = masked_sum(per, self.per_gpu)
        value = float(loss.detach())
        if kept == 0 or not math.isfinite(value):
            bad.append(term)
            return math.nan, len(per)
        self._backward(loss, kept, weight, scaler)
        return value, len(per) - kept

    def _finish(self, params, opt, scaler, clip: float):
        self.dist.average_gradients(params)
        scaler.unscale_(opt)  # records overflow for fp16 loss scaling before cleaning
        clean_gradients_(params)
        if clip > 0:  # element-wise value clipping (the authors'), not norm clipping
            for p in params:
                if p.grad is not None:
                    p.grad.clamp_(-clip, clip)
        scaler.step(opt)
        scaler.update()

    def fake_step(self, cur_nimg: int = 0) -> dict[str, float]:
        cfg, nets, n = self.cfg, self.nets, self.micro
        fake_unet = nets.fake.unet
        fake_unet.train()
        _set_trainable(nets.params("fake"), True)
        self.opt_fake.zero_grad(set_to_none=True)
        p_drop = self.g.dropout if self.g.dropout_active else 0.0
        out = {"loss_fake_remain": 0.0, "loss_fake_forget": 0.0, "dropped_samples": 0}
        bad: list[str] = []
        for _ in range(self.rounds):
            for term, weight in (("fake_remain", cfg.w_fake_remain), ("fake_forget", cfg.w_fake_forget)):
                if term == "fake_forget" and weight == 0:
                    continue
                batch = (self.sampler.remain_batch(n, self.prompt_gen) if term == "fake_remain"
                         else self.sampler.forget_batch(n, self.prompt_gen))
                tp = route(term, batch, self.g, dropout_mask(n, p_drop, self.prompt_gen))
                z, eps, t = self._z_eps_t(n)
                with torch.no_grad():
                    x_g = one_step_generate(nets.generator, z, tp.generator, cfg.t_init)
                per = fake_score_loss(nets.fake, x_g, t, eps, tp.fake, tp.fake_guidance, tp.fake_negative)
                value, dropped = self._term(per, weight, self.scaler_fake, bad, "loss_" + term)
                out["loss_" + term] += value
                out["dropped_samples"] += dropped
        self._check_finite(bad, cur_nimg)
        self._finish(nets.params("fake"), self.opt_fake, self.scaler_fake, self.clip_fake)
        fake_unet.eval()
        return out

    def generator_step(self, cur_nimg: int = 0) -> dict[str, float]:
        cfg, nets, n = self.cfg, self.nets, self.micro
        gen_unet, fake_unet = nets.generator.unet, nets.fake.unet
        _set_trainable(nets.params("fake"), False)
        gen_unet.train()
        _set_trainable(nets.params("gen"), True)
        self.opt_gen.zero_grad(set_to_none=True)
        out = {"loss_gen_remain": 0.0, "loss_gen_forget": 0.0, "dropped_samples": 0}
        bad: list[str] = []
        for _ in range(self.rounds):
            for term, weight in (("gen_remain", cfg.w_gen_remain), ("gen_forget", cfg.w_gen_forget)):
                if term == "gen_forget" and weight == 0:
                    continue
                batch = (self.sampler.remain_batch(n, self.prompt_gen) if term == "gen_remain"
                         else self.sampler.forget_batch(n, self.prompt_gen))
                tp = route(term, batch, self.g)
                z, eps, t = self._z_eps_t(n)
                x_g = one_step_generate(nets.generator, z, tp.generator, cfg.t_init)
                per = sid_generator_loss(
                    nets.teacher, nets.fake, x_g, t, eps, alpha=cfg.alpha,
                    teacher_prompts=tp.teacher, teacher_guidance=tp.teacher_guidance,
                    teacher_negative=tp.teacher_negative, fake_prompts=tp.fake,
                    fake_guidance=tp.fake_guidance, fake_negative=tp.fake_negative)
                value, dropped = self._term(per, weight, self.scaler_gen, bad, "loss_" + term)
                out["loss_" + term] += value
                out["dropped_samples"] += dropped
        self._check_finite(bad, cur_nimg)
        self._finish(nets.params("gen"), self.opt_gen, self.scaler_gen, self.clip_gen)
        gen_unet.eval()
        _set_trainable(nets.params("fake"), True)
        return out

    @torch.no_grad()
    def update_ema(self, cur_nimg: int) -> None:
        """EDM-style EMA with ramp-up: half-life min(halflife, rampup * images seen)."""
        if self.nets.ema is None:
            return
        halflife = self.cfg.ema_halflife_kimg * 1000
        if self.cfg.ema_rampup:
            halflife = min(halflife, cur_nimg * self.cfg.ema_rampup)
        beta = 0.5 ** (self.cfg.batch / max(halflife, 1e-8))
        for p_ema, p in zip(self.nets.params("ema"), self.nets.params("gen"), strict=True):
            p_ema.copy_(p.detach().lerp(p_ema, beta))

    def __call__(self, cur_nimg: int) -> dict[str, float]:
        losses = self.fake_step(cur_nimg)
        gen = self.generator_step(cur_nimg)
        gen["dropped_samples"] += losses["dropped_samples"]
        losses.update(gen)
        self.update_ema(cur_nimg)
        return losses


def _crossed(prev: int, cur: int, every_img: int) -> bool:
    return cur // every_img > prev // every_img


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**30


class GridRenderer:
    """One-step grids of fixed prompts x fixed seeds (rank 0)."""

    def __init__(self, rows: dict[str, list[str]], cols: int, latent_shape, t_init: int, vae, device):
        self.rows = {k: v for k, v in rows.items() if v}
        self.cols, self.t_init, self.vae, self.device = cols, t_init, vae, device
        self.z = torch.stack([torch.randn(latent_shape, generator=torch.Generator().manual_seed(s))
                              for s in range(cols)]).to(device)

    @torch.no_grad()
    def render(self, generator: GuidedDenoiser, run_dir: Path, nimg: int) -> dict[str, torch.Tensor]:
        """Write grid-<name>-<nimg>.png for each row set; returns the grids (H, W, 3 uint8) by name."""
        grids = {}
        for name, prompts in self.rows.items():
            outs = []
            for p in prompts:
                lat = one_step_generate(generator, self.z, [p] * self.cols, self.t_init)
                outs.append(images.decode_latents(self.vae, lat))
            grids[name] = images.save_grid(torch.cat(outs), len(prompts), run_dir / f"grid-{name}-{nimg:09d}.png")
        return grids


def _to(module, device, dtype):
    module = module.to(device)
    return module if dtype == torch.float32 else module.to(dtype)


# ---------------------------------------------------------------------------------- 1. inputs
@dataclass
class Inputs:
    """What ``check_inputs`` found valid, before any model is loaded or any file written."""
    sampler: PromptSampler
    val_prompts: list[str]
    bare_forget: list[str]
    resume_path: Path | None = None
    resume_state: dict | None = None
    changed: dict | None = None


# Settings that may differ on --resume without changing the training itself.
RESUME_FREE_KEYS = {"resume", "run_dir", "outdir", "desc", "duration_kimg", "tick_kimg", "snap_kimg", "state_kimg",
                    "text_cache", "resolved", "allow_changed_settings", "grid_cols", "val_prompts", "device",
                    "attention", "grad_checkpointing"}


def changed_settings(old: dict, new: dict) -> dict:
    """{key: [old, new]} for the training settings that differ (lists and tuples compare equal)."""
    norm = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {k: [old.get(k), v] for k, v in new.items()
            if k not in RESUME_FREE_KEYS and norm(old.get(k)) != norm(v)}


def check_inputs(cfg: TrainConfig) -> Inputs:
    """Every check that needs no model: options, model source, prompt files, the resume state."""
    cfg.check()
    reporting.check_available(cfg.report_to)
    check_generator_init(cfg)  # a config mistake is named before the model source is looked up
    models.check_model_source(cfg.sd_model)
    sampler, val, bare_forget = build_prompt_sampler(cfg)
    inputs = Inputs(sampler, val, bare_forget)
    if cfg.resume:
        path = Path(cfg.resume)
        if path.is_dir():
            found = checkpoints.latest_training_state(path)
            if found is None:
                raise ConfigError(f"--resume {cfg.resume!r}: no training-state-*.pt in that folder")
            path = found
        state = checkpoints.load_training_state(path)
        later = [p.name for p in checkpoints.training_states(path.parent)
                 if checkpoints.state_nimg(p) > int(state["cur_nimg"])]
        if later:
            raise ConfigError(f"--resume {str(path)!r}: the run dir holds later states ({', '.join(later)}); "
                              "resume from the latest, or move the later ones away first")
        if cfg.run_dir and Path(cfg.run_dir).resolve() != path.parent.resolve():
            raise ConfigError("--resume continues in the state's own run dir; drop run_dir")
        changed = changed_settings(json.loads(state["config"]), cfg.to_json())
        if changed and not cfg.allow_changed_settings:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changed.items()))
            raise ConfigError(f"--resume with changed settings ({listed}); pass the run's settings again, or "
                              "--allow-changed-settings to continue with these (the change is recorded)")
        inputs.resume_path, inputs.resume_state, inputs.changed = path, state, changed
    elif cfg.run_dir and checkpoints.latest_training_state(Path(cfg.run_dir)) is not None:
        raise ConfigError(f"run_dir {cfg.run_dir!r} already holds a run; continue it with --resume "
                          f"{cfg.run_dir!r} or choose another folder")
    return inputs


CONVERT_HINT = ("convert the published SiD-LSG generator once with `python SD/convert_sid_lsg.py --pkl FILE "
                "--out DIR` and set generator_init=DIR (README: 'Generator start')")


def generator_init_status(cfg: TrainConfig) -> str:
    """How the generator starts, in words (dry-run and config.json)."""
    init = cfg.generator_init
    if init is None:
        return "MISSING: " + CONVERT_HINT
    if init == "teacher":
        return "teacher (a copy of the teacher UNet; NOT the paper's setting, which starts from SiD-LSG)"
    return f"{init} ({'found' if Path(init).is_dir() else 'NOT FOUND'})"


def check_generator_init(cfg: TrainConfig) -> None:
    """The paper fine-tunes a SiD-LSG one-step generator; refuse to guess another start."""
    init = cfg.generator_init
    if init is None:
        raise ConfigError(f"generator_init is not set: {CONVERT_HINT}, or set generator_init=teacher to start from "
                          "the teacher (not the paper's setting)")
    if init == "teacher":
        warnings.warn("generator_init=teacher: the generator starts as a copy of the teacher, not from the "
                      "SiD-LSG one-step generator the paper fine-tunes; 100 kimg at lr 1e-6 will not make it a "
                      "good one-step generator", stacklevel=2)
        return
    path = Path(init).expanduser()
    if path.suffix in (".pkl", ".pickle"):
        raise ConfigError(f"generator_init {init!r} is a pickle: {CONVERT_HINT}")
    if not path.is_dir():
        raise ConfigError(f"generator_init {init!r}: folder not found; {CONVERT_HINT}, or set "
                          "generator_init=teacher (not the paper's setting)")


# ---------------------------------------------------------------------------------- 2. build
@dataclass
class Run:
    """One process's training: networks, optimisers, random streams, position."""
    cfg: TrainConfig
    dist: distributed.Dist
    precision: str
    nets: Nets
    vae: torch.nn.Module
    schedule: VPSchedule
    latent_shape: tuple[int, ...]
    make_denoiser: object  # unet -> GuidedDenoiser, same schedule/encoder/autocast as the others
    opt_fake: torch.optim.Optimizer
    opt_gen: torch.optim.Optimizer
    scaler_fake: torch.amp.GradScaler
    scaler_gen: torch.amp.GradScaler
    prompt_gen: torch.Generator
    noise_gen: torch.Generator
    step: SFDStep | None = None
    run_dir: Path | None = None
    grids: GridRenderer | None = None
    reporter: reporting.NullReporter = dataclasses.field(default_factory=reporting.NullReporter)
    cur_nimg: int = 0

    def sampling_net(self) -> GuidedDenoiser:
        """The generator that snapshots and grids show: the EMA when there is one."""
        ema = self.nets.ema
        return self.make_denoiser(ema) if ema is not None else self.nets.generator

    def state_dict(self) -> dict:
        """Everything exact resume needs, as tensors and plain values (rank 0's weights)."""
        ema = self.nets.ema
        if self.cfg.adapter == "lora":  # adapter tensors only (the bases are the model files), + the global RNG
            from .lora import adapter_state  # that lora_dropout draws from

            nets = dict(fake_score=adapter_state(self.nets.fake.unet), generator=adapter_state(self.nets.generator.unet),
                        generator_ema=None if ema is None else adapter_state(ema),
                        torch_rng=torch.random.get_rng_state(),
                        cuda_rng=torch.cuda.get_rng_state(self.dist.device) if self.dist.device.type == "cuda" else None)
        else:
            nets = dict(fake_score=self.nets.fake.unet.state_dict(), generator=self.nets.generator.unet.state_dict(),
                        generator_ema=None if ema is None else ema.state_dict())
        return dict(**nets,
                    opt_fake=self.opt_fake.state_dict(), opt_gen=self.opt_gen.state_dict(),
                    scaler_fake=self.scaler_fake.state_dict(), scaler_gen=self.scaler_gen.state_dict(),
                    cur_nimg=self.cur_nimg, config=json.dumps(self.cfg.to_json()))


def _load_everything(cfg: TrainConfig, dist: distributed.Dist):
    """SD parts, generator init; rank 0 first so a hub download happens once."""
    parts = gen_unet = None
    for turn in (0, 1):
        if (dist.rank == 0) == (turn == 0):
            parts = models.load_sd_parts(cfg.sd_model, cfg.revision)
            gen_unet = models.load_generator_init(cfg.generator_init, parts.unet)
        dist.barrier()
    return parts, gen_unet


def build(cfg: TrainConfig, dist: distributed.Dist, precision: str) -> Run:
    """Load the teacher, make fake score and generator (fp32 master weights), optimisers, streams."""
    device = dist.device
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    frozen_dtype = amp_dtype or torch.float32
    parts, gen_unet = _load_everything(cfg, dist)
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if cfg.resolution % vae_scale:
        raise ConfigError(f"--resolution {cfg.resolution} is not a multiple of the VAE factor {vae_scale}")
    latent_shape = (parts.unet.config.in_channels, cfg.resolution // vae_scale, cfg.resolution // vae_scale)

    trained = dict(fake_params=None, gen_params=None, ema_params=None)
    if cfg.adapter == "lora":  # frozen bases in the autocast dtype, fp32 adapters (lora.py)
        from . import lora

        for unet in (parts.unet, gen_unet):  # before the adapters go in: the attention processors are set
            models.configure_unet(unet, cfg.attention, cfg.grad_checkpointing)
        teacher_unet, fake_unet, gen_unet, trained["fake_params"], trained["gen_params"] = lora.build_lora_nets(
            parts.unet, gen_unet, cfg, frozen_dtype, device, share_generator_base=cfg.generator_init == "teacher")
        for unet in (fake_unet, gen_unet):
            models.configure_unet(unet, cfg.attention, cfg.grad_checkpointing)
    else:
        fake_unet = _to(copy.deepcopy(parts.unet), device, torch.float32)  # fp32 master weights
        teacher_unet = _to(parts.unet, device, frozen_dtype)  # frozen: stored in the autocast dtype
        gen_unet = _to(gen_unet, device, torch.float32)
        for unet in (teacher_unet, fake_unet, gen_unet):
            models.configure_unet(unet, cfg.attention, cfg.grad_checkpointing)
    teacher_unet.requires_grad_(False).eval()
    text_encoder = _to(parts.text_encoder, device, frozen_dtype)
    schedule = VPSchedule(parts.alphas_cumprod)
    encoder = PromptEncoder(parts.tokenizer, text_encoder, device, frozen_dtype, cfg.text_cache)
    mk = lambda u: GuidedDenoiser(u, schedule, encoder, parts.prediction_type, amp_dtype)  # noqa: E731
    ema_unet = None
    if cfg.ema_halflife_kimg > 0 and cfg.adapter == "lora":
        ema_unet, trained["ema_params"] = lora.ema_copy(gen_unet)  # the same base, its own adapter copy
    elif cfg.ema_halflife_kimg > 0:
        ema_unet = copy.deepcopy(gen_unet).eval().requires_grad_(False)
    nets = Nets(teacher=mk(teacher_unet), fake=mk(fake_unet), generator=mk(gen_unet), ema=ema_unet, **trained)

    if cfg.adapter == "lora" and cfg.lora_dropout > 0:  # peft's dropout draws from the global stream: seeded
        torch.manual_seed(cfg.seed * 1_000_003 + 104_729 + dist.rank)  # here, saved in the state (exact resume)
    opt_kw = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps_for(precision))
    use_scaler = precision == "fp16"
    return Run(cfg=cfg, dist=dist, precision=precision, nets=nets, vae=_to(parts.vae, device, torch.float32),
               schedule=schedule, latent_shape=latent_shape, make_denoiser=mk,
               opt_fake=torch.optim.Adam(nets.params("fake"), lr=cfg.lr_fake, **opt_kw),
               opt_gen=torch.optim.Adam(nets.params("gen"), lr=cfg.lr_gen, **opt_kw),
               scaler_fake=torch.amp.GradScaler(device.type, enabled=use_scaler),
               scaler_gen=torch.amp.GradScaler(device.type, enabled=use_scaler),
               prompt_gen=torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank),
               noise_gen=torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + 7919 + dist.rank))


def restore(run: Run, state: dict) -> None:
    """Load a training state into ``run`` (weights, Adam, scalers, this rank's random streams)."""
    nets, dist, cfg = run.nets, run.dist, run.cfg
    if cfg.adapter == "lora":
        from .lora import load_adapter_state

        load = lambda module, sd, what: load_adapter_state(module, sd, f"--resume [{what}]")  # noqa: E731
        if state.get("torch_rng") is not None:
            torch.random.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and dist.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], dist.device)
    else:
        load = lambda module, sd, what: module.load_state_dict(sd)  # noqa: E731
    load(nets.fake.unet, state["fake_score"], "fake_score")
    load(nets.generator.unet, state["generator"], "generator")
    if nets.ema is not None:
        if state.get("generator_ema") is None:
            raise ConfigError("--resume: the state has no generator EMA but ema_halflife_kimg > 0")
        load(nets.ema, state["generator_ema"], "generator_ema")
    run.opt_fake.load_state_dict(state["opt_fake"])
    run.opt_gen.load_state_dict(state["opt_gen"])
    run.scaler_fake.load_state_dict(state["scaler_fake"])
    run.scaler_gen.load_state_dict(state["scaler_gen"])
    run.cur_nimg = int(state["cur_nimg"])
    rng = state["rng"]
    if len(rng) == dist.world_size:
        run.prompt_gen.set_state(rng[dist.rank]["prompt"])
        run.noise_gen.set_state(rng[dist.rank]["noise"].to(run.noise_gen.get_state().device))
    else:
        if dist.is_main:
            print(f"note: resuming on {dist.world_size} processes from a state written by {len(rng)}; "
                  "random streams are re-seeded, so the continuation is not bit-exact", flush=True)
        run.prompt_gen.manual_seed(cfg.seed * 1_000_003 + dist.rank + run.cur_nimg)
        run.noise_gen.manual_seed(cfg.seed * 1_000_003 + 7919 + dist.rank + run.cur_nimg)


# ---------------------------------------------------------------------------------- 3. run dir
def open_run_dir(run_dir: Path, resume_nimg: int | None) -> None:
    """Rank 0: create the folder, take its lock, remove leftovers of a killed write, and on resume
    drop log lines after the resumed step (they are about to be redone)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    checkpoints.lock_run_dir(run_dir)
    checkpoints.remove_leftover_temps(run_dir)
    log = run_dir / "log.jsonl"
    if resume_nimg is not None and log.is_file():
        lines = [x for x in log.read_text().splitlines() if x.strip()]
        keep = [x for x in lines if json.loads(x).get("images_seen", 0) <= resume_nimg]
        if len(keep) != len(lines):
            checkpoints.atomic_write_bytes(log, "".join(x + "\n" for x in keep).encode())


def record_resume(run_dir: Path, cfg: TrainConfig, nimg: int, changed: dict | None) -> None:
    """Append this resume (and any changed settings) to the run's history in config.json."""
    old = run_dir / "config.json"
    history = json.loads(old.read_text()).get("resumes", []) if old.is_file() else []
    history.append(dict(images_seen=nimg, changed_settings=changed or {}))
    cfg.resolved["resumes"] = history


# ---------------------------------------------------------------------------------- 4. outputs
def log_tick(run: Run, rec: dict, bar=None) -> None:
    """One log.jsonl line (rank 0) and the same on stdout."""
    if not run.dist.is_main:
        return
    with open(run.run_dir / "log.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")
    write = bar.write if bar is not None else print
    write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k != "time"))
    if bar is not None:
        bar.set_postfix({k.removeprefix("loss_"): f"{rec[k]:.4g}" for k in LOSS_NAMES})
    run.reporter.scalars(rec, rec["images_seen"])


def write_snapshot(run: Run, nimg: int) -> None:
    """Generator (EMA if on) as a diffusers folder, plus grids (rank 0)."""
    if not run.dist.is_main:
        return
    cfg = run.cfg
    net = run.nets.ema if run.nets.ema is not None else run.nets.generator.unet
    info = dict(t_init=cfg.t_init, sd_model=cfg.sd_model, revision=cfg.revision, images_seen=nimg,
                alpha=cfg.alpha, ema=run.nets.ema is not None, resolution=cfg.resolution)
    if cfg.adapter == "lora":  # the adapter alone (MBs); generate.py / export.py add it to the generator start
        info.update(adapter="lora", generator_init=cfg.generator_init, lora_rank=cfg.lora_rank,
                    lora_alpha=cfg.lora_alpha, lora_targets=list(cfg.lora_targets))
    checkpoints.save_generator_snapshot(net, run.run_dir / f"network-snapshot-{nimg:09d}", info)
    run.reporter.images(run.grids.render(run.sampling_net(), run.run_dir, nimg), nimg)


def write_state(run: Run, nimg: int) -> None:
    """The exact-resume state (every rank's random streams; rank 0 writes); older states rotated."""
    dist, cfg = run.dist, run.cfg
    rng = dist.gather_objects({"prompt": run.prompt_gen.get_state(), "noise": run.noise_gen.get_state().cpu()})
    # Ranks must hold identical weights (gradients are averaged); catch any divergence here.
    sums = dist.gather_objects([float(sum(p.detach().double().sum() for p in run.nets.params(which)))
                                for which in ("fake", "gen")])
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"weights differ across ranks: {sums}")
    if dist.is_main:
        checkpoints.atomic_torch_save(dict(run.state_dict(), cur_nimg=nimg, rng=rng),
                                      run.run_dir / f"training-state-{nimg:09d}.pt")
        disk.rotate_states(run.run_dir, cfg.keep_states)  # after the new one is complete


# ---------------------------------------------------------------------------------- 5. loop
def train(cfg: TrainConfig) -> Path:
    """Run SFD training as configured; returns the run directory. The run dir's lock is held until
    this returns or fails (or the process dies)."""
    try:
        return _train(cfg)
    finally:
        checkpoints.release_run_locks()


def _train(cfg: TrainConfig) -> Path:
    inputs = check_inputs(cfg)  # fails on bad options, prompts or resume state before loading anything
    dist = distributed.init(cfg.device)
    precision = resolve_precision(cfg.precision, dist.device)
    per_gpu, micro, rounds = cfg.batch_layout(dist.world_size)
    # A resumed run (or an explicit run_dir) has its folder; a new one is numbered once the models load.
    run_dir = inputs.resume_path.parent if inputs.resume_state is not None else cfg.run_dir and Path(cfg.run_dir)
    if dist.is_main and run_dir and run_dir.is_dir():
        checkpoints.lock_run_dir(run_dir)  # a second writer stops here, before loading any model
    # The disk plan comes from the UNet config alone, so a full disk is refused before any model loads.
    plan = disk.plan_for_run(cfg, int(inputs.resume_state["cur_nimg"]) if inputs.resume_state is not None else 0)
    disk.check_free_space(run_dir or Path(cfg.outdir), plan)
    run = build(cfg, dist, precision)
    if inputs.resume_state is not None:
        restore(run, inputs.resume_state)
    if not run_dir:  # every input proved valid: claim the folder (atomically, see new_run_dir)
        run_dir = Path(dist.broadcast_object(str(new_run_dir(cfg, dist.world_size, precision))
                                             if dist.is_main else None))
    run.run_dir = run_dir
    guidance = guidance_settings(cfg)
    run.step = SFDStep(cfg, run.nets, inputs.sampler, guidance, dist, run.opt_fake, run.opt_gen,
                       run.scaler_fake, run.scaler_gen, run.prompt_gen, run.noise_gen, run.latent_shape, precision)
    cfg.resolved = dict(run_dir=str(run_dir), world_size=dist.world_size, precision=precision,
                        per_gpu_batch=per_gpu, micro_batch=micro, accumulation_rounds=rounds,
                        latent_shape=list(run.latent_shape), prompt_dropout_active=guidance.dropout_active,
                        sigma_t_init=run.schedule.sigma(cfg.t_init), forget_pairs=len(inputs.sampler.pairs),
                        remain_prompts=len(inputs.sampler.remain), resumed_from_nimg=run.cur_nimg,
                        device=str(dist.device), adam_eps=cfg.adam_eps_for(precision),
                        fake_grad_clip_value=run.step.clip_fake, generator_grad_clip_value=run.step.clip_gen,
                        generator_init=generator_init_status(cfg))
    if dist.is_main:  # the folder is created only now that every input proved valid
        print(plan.describe(), flush=True)
        run.grids = GridRenderer({"train": inputs.bare_forget[:4] + inputs.sampler.remain[:2],
                                  "val": inputs.val_prompts[:8]},
                                 cfg.grid_cols, run.latent_shape, cfg.t_init, run.vae, dist.device)
        open_run_dir(run_dir, run.cur_nimg if inputs.resume_state is not None else None)
        if inputs.resume_state is not None:
            record_resume(run_dir, cfg, run.cur_nimg, inputs.changed)
            if inputs.changed:
                print(f"warning: resuming with changed settings {inputs.changed} (recorded in config.json)",
                      flush=True)
        checkpoints.atomic_write_json(run_dir / "config.json", cfg.to_json())
        checkpoints.atomic_write_json(run_dir / "grid-prompts.json", run.grids.rows)
        print(f"SFD run dir: {run_dir}  ({dist.world_size} process(es), {precision}, "
              f"batch {cfg.batch} = {dist.world_size} x {rounds} x {micro})", flush=True)
    run.reporter = reporting.make_reporter(cfg.report_to, run_dir, dist.is_main)
    if dist.is_main and inputs.resume_state is None:
        run.reporter.images(run.grids.render(run.sampling_net(), run_dir, 0), 0)
    dist.barrier()
    loop(run)
    return run_dir


def loop(run: Run) -> None:
    """Iterations until the duration, with log ticks, snapshots and states on their schedules."""
    cfg, dist = run.cfg, run.dist
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dist.device)
    total_img = max(int(round(cfg.duration_kimg * 1000)), 1)
    tick_img, snap_img, state_img = (max(int(round(k * 1000)), 1)
                                     for k in (cfg.tick_kimg, cfg.snap_kimg, cfg.state_kimg))
    acc = {k: 0.0 for k in (*LOSS_NAMES, "dropped_samples")}
    acc_iters, tick_start, tick_nimg = 0, time.time(), run.cur_nimg
    start_nimg = run.cur_nimg
    bar = tqdm(total=total_img, initial=run.cur_nimg, disable=not dist.is_main, desc="SFD", unit="img",
               dynamic_ncols=True)
    try:
        with StopSignal() as stop:
            while run.cur_nimg < total_img:
                losses = run.step(run.cur_nimg)
                bar.update(cfg.batch)
                prev, run.cur_nimg = run.cur_nimg, run.cur_nimg + cfg.batch
                for k in acc:
                    acc[k] += losses[k]
                acc_iters += 1
                done = run.cur_nimg >= total_img
                stopping = not done and stop.agreed(dist)
                if _crossed(prev, run.cur_nimg, tick_img) or done or stopping:  # no iteration goes unlogged
                    vals = torch.tensor([acc[k] / acc_iters for k in LOSS_NAMES] + [acc["dropped_samples"]],
                                        dtype=torch.float64)
                    dist.mean_(vals)
                    elapsed = time.time() - tick_start
                    log_tick(run, dict(images_seen=run.cur_nimg, kimg=run.cur_nimg / 1000,
                                       **{k: float(v) for k, v in zip(LOSS_NAMES, vals)},
                                       dropped_samples=int(round(float(vals[-1]) * dist.world_size)),
                                       images_per_sec=(run.cur_nimg - tick_nimg) / max(elapsed, 1e-9),
                                       sec_per_iter=elapsed / acc_iters, peak_memory_gb=_peak_memory_gb(dist.device),
                                       time=time.time()), bar)
                    acc = dict.fromkeys(acc, 0.0)
                    acc_iters, tick_start, tick_nimg = 0, time.time(), run.cur_nimg
                if _crossed(prev, run.cur_nimg, snap_img) or done:
                    write_snapshot(run, run.cur_nimg)
                if _crossed(prev, run.cur_nimg, state_img) or done or stopping:
                    write_state(run, run.cur_nimg)
                dist.barrier()
                if stopping:
                    raise Preempted(f"stopped by {stop.received or 'a signal to another rank'} after {run.cur_nimg} "
                                    f"of {total_img} images; its training state is saved: continue with "
                                    f"`train.py --resume {run.run_dir}`", run.cur_nimg)
    finally:  # also on NonFiniteLoss, so the bar's last output comes before the error
        bar.close()
        run.reporter.close()
    if dist.is_main and run.cur_nimg == start_nimg:
        print(f"nothing to do: {run.cur_nimg} images seen already >= duration {total_img}", flush=True)
