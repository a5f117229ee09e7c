"""The SFD training loop for Stable Diffusion (SPEC section 3).

Each iteration: (1) fake-score step on the phi remain and phi forget terms, (2) generator step on
the theta remain and theta forget terms, (3) optional generator EMA. Every term draws fresh
prompts, z, eps and t. Progress is counted in images seen (global batch per iteration).
"""
from __future__ import annotations

import copy
import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import checkpoints, disk, distributed, images, models, reporting
from .config import ConfigError, TrainConfig, new_run_dir
from .denoiser import GuidedDenoiser, PromptEncoder, VPSchedule, one_step_generate
from .losses import clean_gradients_, fake_score_loss, masked_sum, sid_generator_loss
from .prompts import PromptSampler, build_forget_pairs, dropout_mask, read_prompt_file
from .terms import GuidanceSettings, route

LOSS_NAMES = ("loss_fake_remain", "loss_fake_forget", "loss_gen_remain", "loss_gen_forget")


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
    remain = read_prompt_file(cfg.remain_prompts, "--remain-prompts")
    if cfg.forget_prompts:
        forget = read_prompt_file(cfg.forget_prompts, "--forget-prompts")
    else:
        forget = [cfg.concept_to_forget]
    override = read_prompt_file(cfg.override_prompts, "--override-prompts") if cfg.override_prompts else None
    pairs = build_forget_pairs(forget, cfg.concept_to_forget, cfg.concept_to_override, override)
    keywords = read_prompt_file(cfg.keywords, "--keywords") if cfg.keywords else None
    negatives = read_prompt_file(cfg.negative_prompts, "--negative-prompts") if cfg.negative_prompts else None
    val = read_prompt_file(cfg.val_prompts, "--val-prompts") if cfg.val_prompts else []
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


class SFDStep:
    """One SFD iteration on one rank; the denoisers are injectable for tests."""

    def __init__(self, cfg: TrainConfig, nets: Nets, sampler: PromptSampler, guidance: GuidanceSettings,
                 dist: distributed.Dist, opt_fake, opt_gen, scaler_fake, scaler_gen,
                 prompt_gen: torch.Generator, noise_gen: torch.Generator, latent_shape: tuple[int, ...]):
        self.cfg, self.nets, self.sampler, self.g, self.dist = cfg, nets, sampler, guidance, dist
        self.opt_fake, self.opt_gen, self.scaler_fake, self.scaler_gen = opt_fake, opt_gen, scaler_fake, scaler_gen
        self.prompt_gen, self.noise_gen = prompt_gen, noise_gen
        self.latent_shape = latent_shape
        self.per_gpu, self.micro, self.rounds = cfg.batch_layout(dist.world_size)
        self.device = dist.device

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

    def _finish(self, module, opt, scaler):
        params = [p for p in module.parameters() if p.requires_grad]
        self.dist.average_gradients(params)
        scaler.unscale_(opt)  # records overflow for fp16 loss scaling before cleaning
        clean_gradients_(params)
        if self.cfg.grad_clip > 0:
            for p in params:
                if p.grad is not None:
                    p.grad.clamp_(-self.cfg.grad_clip, self.cfg.grad_clip)
        scaler.step(opt)
        scaler.update()

    def fake_step(self) -> dict[str, float]:
        cfg, nets, n = self.cfg, self.nets, self.micro
        fake_unet = nets.fake.unet
        fake_unet.train().requires_grad_(True)
        self.opt_fake.zero_grad(set_to_none=True)
        p_drop = self.g.dropout if self.g.dropout_active else 0.0
        out = {"loss_fake_remain": 0.0, "loss_fake_forget": 0.0}
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
                loss, kept = masked_sum(per, self.per_gpu)
                self._backward(loss, kept, weight, self.scaler_fake)
                out["loss_" + term] += float(loss.detach())
        self._finish(fake_unet, self.opt_fake, self.scaler_fake)
        fake_unet.eval()
        return out

    def generator_step(self) -> dict[str, float]:
        cfg, nets, n = self.cfg, self.nets, self.micro
        gen_unet, fake_unet = nets.generator.unet, nets.fake.unet
        fake_unet.requires_grad_(False)
        gen_unet.train().requires_grad_(True)
        self.opt_gen.zero_grad(set_to_none=True)
        out = {"loss_gen_remain": 0.0, "loss_gen_forget": 0.0}
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
                loss, kept = masked_sum(per, self.per_gpu)
                self._backward(loss, kept, weight, self.scaler_gen)
                out["loss_" + term] += float(loss.detach())
        self._finish(gen_unet, self.opt_gen, self.scaler_gen)
        gen_unet.eval()
        fake_unet.requires_grad_(True)
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
        for p_ema, p in zip(self.nets.ema.parameters(), self.nets.generator.unet.parameters()):
            p_ema.copy_(p.detach().lerp(p_ema, beta))

    def __call__(self, cur_nimg: int) -> dict[str, float]:
        losses = self.fake_step()
        losses.update(self.generator_step())
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


def _load_everything(cfg: TrainConfig, dist: distributed.Dist, precision: str):
    """SD parts, generator init; rank 0 first so a hub download happens once."""
    parts = gen_unet = None
    for turn in (0, 1):
        if (dist.rank == 0) == (turn == 0):
            parts = models.load_sd_parts(cfg.sd_model, cfg.revision)
            gen_unet = models.load_generator_init(cfg.init_generator, parts.unet, cfg.allow_pickle)
        dist.barrier()
    return parts, gen_unet


def train(cfg: TrainConfig) -> Path:
    """Run SFD training as configured; returns the run directory."""
    cfg.check()
    reporting.check_available(cfg.report_to)
    models.check_model_source(cfg.sd_model)
    sampler, val_prompts, bare_forget = build_prompt_sampler(cfg)  # fail on bad prompts before loading
    dist = distributed.init(cfg.device)
    device = dist.device
    precision = resolve_precision(cfg.precision, device)
    per_gpu, micro, rounds = cfg.batch_layout(dist.world_size)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    frozen_dtype = amp_dtype or torch.float32

    resume_state = None
    if cfg.resume:
        path = Path(cfg.resume)
        if path.is_dir():
            path = checkpoints.latest_training_state(path) or path / "training-state-missing.pt"
        resume_state = checkpoints.load_training_state(path)

    run_dir = dist.broadcast_object(str(new_run_dir(cfg, dist.world_size, precision)) if dist.is_main else None)
    run_dir = Path(run_dir)  # created only after the free-space check below

    parts, gen_unet = _load_everything(cfg, dist, precision)
    vae_scale = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    if cfg.resolution % vae_scale:
        raise ConfigError(f"--resolution {cfg.resolution} is not a multiple of the VAE factor {vae_scale}")
    latent_shape = (parts.unet.config.in_channels, cfg.resolution // vae_scale, cfg.resolution // vae_scale)

    fake_unet = _to(copy.deepcopy(parts.unet), device, torch.float32)  # fp32 master weights
    teacher_unet = _to(parts.unet, device, frozen_dtype)  # frozen: stored in the autocast dtype
    gen_unet = _to(gen_unet, device, torch.float32)
    for unet in (teacher_unet, fake_unet, gen_unet):
        models.configure_unet(unet, cfg.attention, cfg.grad_checkpointing)
    teacher_unet.requires_grad_(False).eval()
    text_encoder = _to(parts.text_encoder, device, frozen_dtype)
    vae = _to(parts.vae, device, torch.float32)
    schedule = VPSchedule(parts.alphas_cumprod)
    encoder = PromptEncoder(parts.tokenizer, text_encoder, device, frozen_dtype, cfg.text_cache)
    mk = lambda u: GuidedDenoiser(u, schedule, encoder, parts.prediction_type, amp_dtype)  # noqa: E731
    ema_unet = (copy.deepcopy(gen_unet).eval().requires_grad_(False) if cfg.ema_halflife_kimg > 0 else None)
    nets = Nets(teacher=mk(teacher_unet), fake=mk(fake_unet), generator=mk(gen_unet), ema=ema_unet)

    opt_kw = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps)
    opt_fake = torch.optim.Adam(fake_unet.parameters(), lr=cfg.lr_fake, **opt_kw)
    opt_gen = torch.optim.Adam(gen_unet.parameters(), lr=cfg.lr_gen, **opt_kw)
    use_scaler = precision == "fp16"
    scaler_fake = torch.amp.GradScaler(device.type, enabled=use_scaler)
    scaler_gen = torch.amp.GradScaler(device.type, enabled=use_scaler)
    prompt_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + dist.rank)
    noise_gen = torch.Generator(device).manual_seed(cfg.seed * 1_000_003 + 7919 + dist.rank)

    cur_nimg = 0
    if resume_state is not None:
        fake_unet.load_state_dict(resume_state["fake_score"])
        gen_unet.load_state_dict(resume_state["generator"])
        if ema_unet is not None:
            if resume_state.get("generator_ema") is None:
                raise ConfigError("--resume: the state has no generator EMA but --ema is on")
            ema_unet.load_state_dict(resume_state["generator_ema"])
        opt_fake.load_state_dict(resume_state["opt_fake"])
        opt_gen.load_state_dict(resume_state["opt_gen"])
        scaler_fake.load_state_dict(resume_state["scaler_fake"])
        scaler_gen.load_state_dict(resume_state["scaler_gen"])
        cur_nimg = int(resume_state["cur_nimg"])
        rng = resume_state["rng"]
        if len(rng) == dist.world_size:
            prompt_gen.set_state(rng[dist.rank]["prompt"])
            noise_gen.set_state(rng[dist.rank]["noise"].to(noise_gen.get_state().device))
        else:
            if dist.is_main:
                print(f"note: resuming on {dist.world_size} processes from a state written by {len(rng)}; "
                      "random streams are re-seeded, so the continuation is not bit-exact", flush=True)
            prompt_gen.manual_seed(cfg.seed * 1_000_003 + dist.rank + cur_nimg)
            noise_gen.manual_seed(cfg.seed * 1_000_003 + 7919 + dist.rank + cur_nimg)

    guidance = guidance_settings(cfg)
    step = SFDStep(cfg, nets, sampler, guidance, dist, opt_fake, opt_gen, scaler_fake, scaler_gen,
                   prompt_gen, noise_gen, latent_shape)
    total_img = max(int(round(cfg.duration_kimg * 1000)), 1)
    tick_img, snap_img, state_img = (max(int(round(k * 1000)), 1)
                                     for k in (cfg.tick_kimg, cfg.snap_kimg, cfg.state_kimg))
    plan = disk.DiskPlan(disk.state_bytes([fake_unet, gen_unet], ema_unet), disk.param_bytes(gen_unet),
                         states=disk.count_crossings(cur_nimg, total_img, state_img),
                         snapshots=disk.count_crossings(cur_nimg, total_img, snap_img), keep=cfg.keep_states)
    disk.check_free_space(run_dir, plan)  # before anything is written
    if dist.is_main:
        print(plan.describe(), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)

    cfg.resolved = dict(run_dir=str(run_dir), world_size=dist.world_size, precision=precision,
                        per_gpu_batch=per_gpu, micro_batch=micro, accumulation_rounds=rounds,
                        latent_shape=list(latent_shape), prompt_dropout_active=guidance.dropout_active,
                        sigma_t_init=schedule.sigma(cfg.t_init), forget_pairs=len(sampler.pairs),
                        remain_prompts=len(sampler.remain), resumed_from_nimg=cur_nimg,
                        device=str(device))
    grids = GridRenderer({"train": bare_forget[:4] + sampler.remain[:2], "val": val_prompts[:8]},
                         cfg.grid_cols, latent_shape, cfg.t_init, vae, device) if dist.is_main else None

    def sample_net() -> GuidedDenoiser:
        return mk(ema_unet) if ema_unet is not None else nets.generator

    def snapshot(nimg: int) -> None:
        if not dist.is_main:
            return
        net = ema_unet if ema_unet is not None else gen_unet
        info = dict(t_init=cfg.t_init, sd_model=cfg.sd_model, revision=cfg.revision, images_seen=nimg,
                    alpha=cfg.alpha, ema=ema_unet is not None, resolution=cfg.resolution)
        checkpoints.save_generator_snapshot(net, run_dir / f"network-snapshot-{nimg:09d}", info)
        reporter.images(grids.render(sample_net(), run_dir, nimg), nimg)

    def save_state(nimg: int) -> None:
        rng = dist.gather_objects({"prompt": prompt_gen.get_state(), "noise": noise_gen.get_state().cpu()})
        # Ranks must hold identical weights (gradients are averaged); catch any divergence here.
        sums = dist.gather_objects([float(sum(p.detach().double().sum() for p in m.parameters()))
                                    for m in (fake_unet, gen_unet)])
        if any(s != sums[0] for s in sums):
            raise RuntimeError(f"weights differ across ranks: {sums}")
        if not dist.is_main:
            return
        state = dict(fake_score=fake_unet.state_dict(), generator=gen_unet.state_dict(),
                     generator_ema=None if ema_unet is None else ema_unet.state_dict(),
                     opt_fake=opt_fake.state_dict(), opt_gen=opt_gen.state_dict(),
                     scaler_fake=scaler_fake.state_dict(), scaler_gen=scaler_gen.state_dict(),
                     cur_nimg=nimg, rng=rng, config=json.dumps(cfg.to_json()))
        checkpoints.atomic_torch_save(state, run_dir / f"training-state-{nimg:09d}.pt")
        disk.rotate_states(run_dir, cfg.keep_states)  # after the new one is complete

    if dist.is_main:
        checkpoints.atomic_write_json(run_dir / "config.json", cfg.to_json())
        checkpoints.atomic_write_json(run_dir / "grid-prompts.json", grids.rows)
        print(f"SFD run dir: {run_dir}  ({dist.world_size} process(es), {precision}, "
              f"batch {cfg.batch} = {dist.world_size} x {rounds} x {micro})", flush=True)
    reporter = reporting.make_reporter(cfg.report_to, run_dir, dist.is_main)
    if dist.is_main and resume_state is None:
        reporter.images(grids.render(sample_net(), run_dir, 0), 0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    acc = {k: 0.0 for k in LOSS_NAMES}
    acc_iters, tick_start, tick_nimg = 0, time.time(), cur_nimg
    start_nimg = cur_nimg
    bar = tqdm(total=total_img, initial=cur_nimg, disable=not dist.is_main, desc="SFD", unit="img",
               dynamic_ncols=True)
    while cur_nimg < total_img:
        losses = step(cur_nimg)
        bar.update(cfg.batch)
        prev, cur_nimg = cur_nimg, cur_nimg + cfg.batch
        for k in LOSS_NAMES:
            acc[k] += losses[k]
        acc_iters += 1
        done = cur_nimg >= total_img
        if _crossed(prev, cur_nimg, tick_img) or done:
            vals = torch.tensor([acc[k] / acc_iters for k in LOSS_NAMES], dtype=torch.float64)
            dist.mean_(vals)
            elapsed = time.time() - tick_start
            rec = dict(images_seen=cur_nimg, kimg=cur_nimg / 1000,
                       **{k: float(v) for k, v in zip(LOSS_NAMES, vals)},
                       images_per_sec=(cur_nimg - tick_nimg) / max(elapsed, 1e-9),
                       sec_per_iter=elapsed / acc_iters, peak_memory_gb=_peak_memory_gb(device),
                       time=time.time())
            if dist.is_main:
                with open(run_dir / "log.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.write(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                   for k, v in rec.items() if k != "time"))
                bar.set_postfix({k.removeprefix("loss_"): f"{rec[k]:.4g}" for k in LOSS_NAMES})
                reporter.scalars(rec, cur_nimg)
            if any(not math.isfinite(v) for v in vals.tolist()):
                print("warning: non-finite mean loss in this tick (NaN samples were dropped)", flush=True)
            acc = {k: 0.0 for k in LOSS_NAMES}
            acc_iters, tick_start, tick_nimg = 0, time.time(), cur_nimg
        if _crossed(prev, cur_nimg, snap_img) or done:
            snapshot(cur_nimg)
        if _crossed(prev, cur_nimg, state_img) or done:
            save_state(cur_nimg)
        dist.barrier()
    bar.close()
    reporter.close()
    if dist.is_main and cur_nimg == start_nimg:
        print(f"nothing to do: {cur_nimg} images seen already >= duration {total_img}", flush=True)
    return run_dir
