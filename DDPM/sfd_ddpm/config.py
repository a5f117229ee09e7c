"""Configs: a typed schema of every key (with its default and meaning), YAML files, overrides.

A run's config is ``schema defaults <- YAML file <- command-line overrides`` (``key.sub=value``,
values parsed as YAML). Unknown keys are errors, so a typo never silently does nothing.
``python train.py --list-keys`` prints this schema.
"""
from __future__ import annotations

import copy
import difflib
import json
import re
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad config file, key or value; the message says what to change."""


def K(default, help_text: str) -> tuple:
    """A schema leaf: (default, meaning)."""
    return (default, help_text)


SCHEMA: dict = {
    "method": K("pretrain", "what train.py runs: pretrain (class-conditional DDPM), sid (distillation, "
                            "nothing forgotten), sfd (distillation with forgetting) or vdu (variational "
                            "diffusion unlearning); baselines (`baseline` keys): retrain (pretraining on "
                            "the remaining classes), sa (Selective Amnesia), salun (SalUn), esd (ESD)"),
    "seed": K(1234, "base random seed; rank r uses seed + r for noise, timesteps and dropout"),
    "data": {
        "dataset": K("builtin", "builtin (procedural, no download), cifar10, stl10, mnist or folder (your own "
                                "images: data.root holds one sub-folder per class, class index = sorted folder "
                                "names; 10% of each class held out by a fixed rule, see README)"),
        "root": K("./data", "where torchvision datasets are stored / downloaded; for dataset=folder, the folder "
                            "of class sub-folders"),
        "class_names": K(None, "class names in index order; for dataset=folder train.py fills them in from "
                               "data.root (and refuses a folder whose classes differ); sfd.forget, sfd.override, "
                               "baseline.forget and vdu.forget may name classes instead of giving indices"),
        "download": K(True, "let torchvision download the dataset when it is missing (under torchrun rank 0 "
                            "alone fetches it into data.root, the other ranks wait and read its files)"),
        "mirror": K(None, "cifar10 / stl10 / mnist: download from this base URL (http:// or https://) instead "
                          "of the datasets' home sites; it serves the files under their usual names "
                          "(<mirror>/cifar-10-python.tar.gz, <mirror>/stl10_binary.tar.gz, "
                          "<mirror>/train-images-idx3-ubyte.gz, ...)"),
        "mirror_md5": K(None, "md5 of a re-packed cifar10 / stl10 archive on data.mirror: the download is checked "
                              "against it instead of torchvision's sums (null = torchvision's sums, for the "
                              "original files)"),
        "image_size": K(32, "image resolution in pixels"),
        "channels": K(3, "image channels"),
        "n_classes": K(10, "number of classes (the null class for guidance is added on top); dataset=folder: "
                           "must equal the number of class sub-folders (checked, not derived)"),
        "random_flip": K(None, "random left-right flips of the training images (pretrain, retrain, vdu); null = "
                               "the dataset's convention: on for builtin, cifar10 and stl10 (the authors' setting), "
                               "off for folder and mnist (a mirrored digit or letter is not a real image; set true "
                               "for folders of scenes or objects). The run's config.json records true or false"),
        "num_workers": K(2, "data loader worker processes"),
        "builtin_per_class": K(1000, "built-in dataset: training images per class"),
    },
    "model": {
        "arch": K("unet2d", "backbone: unet2d (Ho et al.'s DDPM UNet, eps-prediction, discrete VP timesteps; "
                            "`diffusion` keys) or songunet (EDM's DDPM++ SongUNet with EDM preconditioning, "
                            "continuous sigma; `edm` keys)"),
        "base_channels": K(128, "UNet width ch (songunet: model_channels)"),
        "channel_mult": K([1, 2, 2, 2], "width multiplier per resolution level"),
        "layers_per_block": K(2, "residual blocks per level (songunet: num_blocks)"),
        "attn_resolutions": K([16], "resolutions with self-attention"),
        "dropout": K(0.1, "dropout in residual blocks (active in train mode)"),
        "output": K("eps", "what the UNet outputs: eps (the paper) or v, turned into eps = b_t x_t + a_t v "
                           "(still an eps-prediction model; helps small, briefly trained models near t = T)"),
        "conditional": K(True, "false = an unconditional DDPM: the network always receives the null class "
                               "(every label is replaced by it, in training and sampling), as if trained with "
                               "label dropout 1.0; the VDU paper's setting"),
        "null_class": K(True, "the network has a usable null class (label n_classes; trained with label "
                              "dropout), so classifier-free guidance is possible; false for NVIDIA's EDM "
                              "checkpoints, which refuse guidance"),
        "augment_dim": K(0, "songunet: size of the augmentation-label input (9 in NVIDIA's CIFAR-10 EDM "
                            "networks, fed zeros when sampling; 0 = none)"),
    },
    "edm": {
        "precond": K("edm", "songunet preconditioning: edm (EDMPrecond: c_skip, c_out, c_in, c_noise of Karras et "
                            "al., Table 1; config F, NVIDIA's released CIFAR-10 networks) or vp (VPPrecond, "
                            "Song et al.'s VP formulation)"),
        "sigma_min": K(0.002, "smallest sigma of the sampler and of the rho-schedule"),
        "sigma_max": K(80.0, "largest sigma of the sampler and of the rho-schedule"),
        "rho": K(7.0, "rho of the schedule sigma(u) = (s_max^(1/rho) + (1 - u)(s_min^(1/rho) - s_max^(1/rho)))^rho"),
        "sigma_data": K(0.5, "sigma_data of the EDM preconditioning and loss weight"),
        "P_mean": K(-1.2, "pretraining (and SiD fake-score) noise levels: ln sigma ~ N(P_mean, P_std^2)"),
        "P_std": K(1.2, "see P_mean"),
    },
    "diffusion": {
        "beta_start": K(1e-4, "first beta of the linear schedule"),
        "beta_end": K(0.02, "last beta of the linear schedule"),
        "num_timesteps": K(1000, "T"),
    },
    "training": {
        "batch_size": K(128, "global batch (split evenly across ranks)"),
        "n_iters": K(800000, "training iterations"),
        "lr": K(2e-4, "pretraining: Adam learning rate"),
        "lr_warmup": K(0, "pretraining: linear learning-rate warm-up, in iterations"),
        "betas": K([0.9, 0.999], "pretraining: Adam betas"),
        "adam_eps": K(1e-8, "Adam epsilon"),
        "grad_clip": K(1.0, "pretraining: gradient-norm clipping (0 = off)"),
        "ema": K(0.9999, "EMA decay of the trained (pretraining) or generator (SFD) weights"),
        "ema_rampup": K(False, "ramp the EMA decay as min(ema, (1 + k) / (10 + k)) at iteration k, for short runs"),
        "label_dropout": K(0.1, "pretraining: fraction of labels replaced by the null class"),
        "log_every": K(50, "iterations between log.jsonl lines"),
        "snapshot_every": K(5000, "iterations between weight snapshots and sample grids"),
        "state_every": K(1000, "iterations between training-state saves (for --resume)"),
        "keep_states": K(2, "training states kept on disk: the newest K (0 = all)"),
        "early_snapshots": K(0, "extra log-spaced snapshots before the first regular one (0 = none)"),
    },
    "grid": {
        "sampler": K("ddim", "sampler for pretraining grids: ddpm or ddim (SFD grids are one-step)"),
        "steps": K(100, "DDIM steps for grids"),
        "eta": K(0.0, "DDIM eta for grids"),
        "guidance": K(2.0, "classifier-free guidance w for grids"),
        "clip_x0": K(False, "clamp the denoised estimate to [-1, 1] at every sampler step"),
        "per_class": K(10, "images per class (one row per class)"),
    },
    "sfd": {
        "init": K(None, "pretrained teacher checkpoint (.safetensors from method=pretrain)"),
        "init_stage1": K(None, "two-stage SFD: a stage-1 SiD checkpoint; the generator starts from its "
                               "EMA generator and the fake score from its fake score"),
        "stage2_teacher": K("original", "two-stage teacher: original (the pretrained model, our decision) or "
                                        "stage1_fake_score (the authors' code, through a bug)"),
        "forget": K([0], "forget classes (empty list = SiD distillation of all classes)"),
        "override": K(1, "override: a class, a mapping {forget: override}, 'random' (uniform non-forget "
                         "class per sample) or 'classifier' (pseudo-label from sfd.classifier)"),
        "classifier": K(None, "classifier checkpoint for override='classifier'"),
        "classifier_mode": K("argmax", "classifier pseudo-label: argmax or sample"),
        "alpha": K(1.2, "SiD alpha"),
        "guidance": K(0.0, "guidance distillation: classifier-free guidance w of the teacher in the generator loss, "
                           "guided = (1 + w) eps(x, c) - w eps(x, null) (SiD-LSG's kappa4 = 1 + w); 0 = the authors' "
                           "DDPM setting (unguided teacher, one pass); needs a teacher with a null class"),
        "guidance_fake_train": K(None, "guidance w of the fake score in its own DSM loss (SiD-LSG's kappa1 = 1 + w); "
                                       "null = sfd.guidance"),
        "guidance_fake_eval": K(None, "guidance w of the fake score in the generator loss (SiD-LSG's kappa2 = 1 + w); "
                                      "null = sfd.guidance"),
        "label_dropout": K(0.1, "share of fake-score training labels (and the samples generated for them) replaced "
                                "by the null class, only while the fake score is guided (guidance_fake_train or "
                                "guidance_fake_eval != 0), so it learns the unconditional branch guidance uses "
                                "(SD's prompt_dropout)"),
        "t_min": K(38, "timesteps drawn from U{t_min..t_max-1} (EDM backbone: u ~ U[t_min/1000, t_max/1000) on "
                       "the rho-schedule sigma(u); SiD's EDM setting is t_min 0, t_max 800)"),
        "t_max": K(712, "exclusive upper timestep"),
        "t_init": K(440, "t* of the one-step generator (DDPM backbone)"),
        "sigma_init": K(2.5, "EDM backbone: the one-step generator's noise level, G(z, c) = D(sigma_init z; "
                             "sigma_init, c)"),
        "fake_score_levels": K("range", "noise levels of the fake-score loss: range (the generator's [t_min, t_max), "
                                        "the DDPM tree's choice) or pretrain (the backbone's pretraining "
                                        "distribution: SiD's choice for EDM teachers, log-normal sigma)"),
        "augment": K(0.0, "EDM backbone: probability p of EDM's geometric augmentation of the fake score's training "
                          "images, with augmentation labels fed to the network (SiD's CIFAR-10 setting is 0.12; "
                          "needs model.augment_dim 9); 0 = none, the generator loss is never augmented"),
        "lambda_phi_r": K(1.0, "fake-score remain weight"),
        "lambda_phi_f": K(0.01, "fake-score forget weight"),
        "lambda_theta_r": K(1.0, "generator remain weight"),
        "lambda_theta_f": K(0.01, "generator forget weight"),
        "forget_warmup": K(0.0, "fraction of training whose forget terms draw t from [warmup_t_min, warmup_t_max)"),
        "warmup_t_min": K(20, "forget warm-up lower timestep"),
        "warmup_t_max": K(980, "forget warm-up exclusive upper timestep"),
        "lr_phi": K(3e-5, "fake-score learning rate"),
        "lr_theta": K(1e-5, "generator learning rate"),
        "betas": K([0.0, 0.999], "Adam betas of both networks"),
        "grad_clip_value": K(1.0, "element-wise gradient value clipping (0 = off)"),
        "fake_updates": K(1, "fake-score updates per generator update, each on fresh generator samples (1 = SiD and "
                             "the SFD authors; more lets the fake score keep up with the generator, as DMD2's "
                             "two time-scale rule)"),
        "batched": K(True, "evaluate remain and forget terms of a network in one batched pass "
                           "(identical losses; false = separate passes)"),
    },
    "baseline": {
        "init": K(None, "sa/salun/esd: pretrained DDPM checkpoint to unlearn (.safetensors from method=pretrain)"),
        "init_network": K("ema", "which network of baseline.init starts the fine-tuning and is theta*: ema (the "
                                 "deployed model, our choice) or net (raw weights, the authors' choice)"),
        "forget": K([0], "forget classes (retrain leaves them out of its data; sa/salun/esd forget them)"),
        "lr": K(1e-4, "sa/salun/esd: Adam learning rate"),
        "betas": K([0.9, 0.999], "sa/salun/esd: Adam betas"),
        "grad_clip": K(1.0, "sa/salun/esd: gradient-norm clipping (0 = off)"),
        "sa_fisher": K(None, "sa: diagonal Fisher file from `fisher.py --ckpt <baseline.init>`"),
        "sa_gamma": K(1.0, "sa: weight gamma of the generative-replay eps-loss"),
        "sa_lambda": K(10.0, "sa: weight lambda of the Fisher penalty sum_i F_i (theta_i - theta*_i)^2"),
        "sa_replay_per_class": K(100, "sa: replay images per remaining class, generated by the frozen pretrained "
                                      "model once at the start (a fixed buffer, as SA's stored samples)"),
        "sa_replay_steps": K(100, "sa: DDIM steps (eta 0) for the replay images"),
        "sa_replay_guidance": K(0.0, "sa: classifier-free guidance w for the replay images"),
        "salun_fraction": K(0.5, "salun: fraction of weights in the saliency mask (top |accumulated gradient|)"),
        "salun_alpha": K(1.0, "salun: weight alpha of the eps-loss on real remaining data"),
        "salun_mask": K(None, "salun: mask file from salun_mask.py; null = compute it at the start (kept in the "
                              "training state)"),
        "salun_mask_batches": K(0, "salun: forget-data batches (training.batch_size) accumulated for the mask; "
                                   "0 = one pass over all real forget images"),
        "esd_eta": K(1.0, "esd: negative guidance eta in the target eps_0(null) - eta (eps_0(c_f) - eps_0(null))"),
        "esd_steps": K(50, "esd: DDIM grid (steps) of the partial sampling; x_t stops at a uniformly drawn grid "
                           "level t, and the loss is taken at that same t (DDPM: 1..T timesteps 0, T//steps, ...; "
                           "EDM: >= 2 levels of the rho schedule from sigma_max to sigma_min)"),
        "esd_guidance": K(0.0, "esd: classifier-free guidance w of the frozen model's partial sampling"),
    },
    "vdu": {
        "init": K(None, "pretrained DDPM checkpoint (.safetensors from method=pretrain; its EMA weights are mu)"),
        "forget": K([0], "forget classes: D_f is drawn from the real images of these classes"),
        "forget_subset": K(64, "N: how many real forget-class images D_f holds (chosen by `seed`; the loop "
                               "reads only these)"),
        "lambda_p": K(1.0, "weight of the plasticity inducer -lambda_p * min(L_simple(D_f), target)"),
        "target_ratio": K(3.0, "hinge of the plasticity inducer: target = target_ratio * the pretrained "
                               "model's L_simple on D_f (measured at the start); past it the term is "
                               "constant and has zero gradient"),
        "hinge": K("sample", "where the hinge acts: batch (the batch-mean L_simple against target_ratio x the "
                            "pretrained L_simple on D_f measured at the start) or sample (each sample's loss against "
                            "target_ratio x the pretrained model's loss on the same image, t and noise; one extra "
                            "forward pass of the frozen pretrained model per step)"),
        "target_draws": K(8, "noise/timestep draws per D_f image for measuring the pretrained loss"),
        "gamma": K(1.0, "weight of the stability regulariser gamma/2 * sum_i Lambda_i (theta_i - mu_i)^2"),
        "precision": K("fisher", "Lambda from: fisher (diagonal Fisher of the eps-loss on samples generated "
                                 "by the pretrained model, data-free) or checkpoints (1 / (var + eps) across "
                                 "vdu.checkpoints)"),
        "checkpoints": K([], "precision=checkpoints: K >= 2 independently trained checkpoints of the same "
                             "architecture (their EMA weights)"),
        "precision_eps": K(1e-8, "precision=checkpoints: eps in Lambda = 1 / (var + eps)"),
        "normalise": K("mean", "precision normalisation: mean (Lambda / mean(Lambda), so gamma is the "
                               "average per-parameter precision) or none (raw Fisher / inverse variance)"),
        "fisher_samples": K(64, "precision=fisher: images generated by the pretrained model"),
        "fisher_timesteps": K(50, "precision=fisher: levels per sample: DDPM evenly spaced timesteps (sum scaled "
                                  "to T); EDM draws of ln sigma ~ N(P_mean, P_std^2) (averaged)"),
        "fisher_steps": K(50, "precision=fisher: DDIM steps (eta 0, no guidance) for generating the samples"),
        "lr": K(1e-4, "Adam learning rate"),
        "betas": K([0.9, 0.999], "Adam betas"),
    },
}


# Counts and sizes that make no sense below a minimum (checked when a value is set).
MINIMUM = {f"training.{k}": 1 for k in ("batch_size", "n_iters", "log_every", "snapshot_every", "state_every")}
MINIMUM.update({"training.early_snapshots": 0, "grid.steps": 1, "grid.per_class": 1, "data.image_size": 1,
                "data.channels": 1, "data.n_classes": 1, "data.builtin_per_class": 1, "data.num_workers": 0,
                "diffusion.num_timesteps": 1, "model.base_channels": 1, "model.layers_per_block": 1})



class Range:
    """The valid values of a rate, weight, probability or noise level: low..high, each end open or closed
    (an Adam ``betas`` key: a pair, each of its values in the range)."""

    def __init__(self, low=None, high=None, low_open=False, high_open=False, pair=False):
        self.low, self.high, self.low_open, self.high_open, self.pair = low, high, low_open, high_open, pair

    def holds(self, x) -> bool:
        return ((self.low is None or (x > self.low if self.low_open else x >= self.low))
                and (self.high is None or (x < self.high if self.high_open else x <= self.high)))

    def __str__(self) -> str:
        lo = "(-inf" if self.low is None else f"{'(' if self.low_open else '['}{self.low:g}"
        hi = "inf)" if self.high is None else f"{self.high:g}{')' if self.high_open else ']'}"
        return f"{'a pair of values in ' if self.pair else ''}{lo}, {hi}"


POSITIVE, NON_NEGATIVE = Range(0, low_open=True), Range(0)
PROBABILITY, BELOW_ONE = Range(0, 1), Range(0, 1, high_open=True)
ADAM_BETAS = Range(0, 1, high_open=True, pair=True)  # beta = 1 never forgets a moment (Adam divides by 1 - beta^k)

# Every rate, weight, probability and noise level of the schema, with its valid range (checked whenever a
# value is set, before any work; tests/test_settings.py fails for a new such key missing here). Ordered
# pairs (t ranges, sigma and beta ranges) are checked on the whole config by check_order.
RANGES = {
    "model.dropout": BELOW_ONE,
    **{f"edm.{k}": POSITIVE for k in ("sigma_min", "sigma_max", "rho", "sigma_data", "P_std")},
    "diffusion.beta_start": Range(0, 1, low_open=True, high_open=True),  # a variance kept below 1: abar > 0
    "diffusion.beta_end": Range(0, 1, low_open=True, high_open=True),
    "training.lr": POSITIVE, "training.adam_eps": POSITIVE, "training.betas": ADAM_BETAS,
    "training.grad_clip": NON_NEGATIVE, "training.ema": PROBABILITY, "training.label_dropout": PROBABILITY,
    "training.lr_warmup": NON_NEGATIVE,
    "grid.eta": PROBABILITY, "grid.guidance": NON_NEGATIVE,
    "sfd.alpha": NON_NEGATIVE, "sfd.guidance": NON_NEGATIVE, "sfd.guidance_fake_train": NON_NEGATIVE,
    "sfd.guidance_fake_eval": NON_NEGATIVE, "sfd.label_dropout": BELOW_ONE,  # 1 would leave no labelled sample
    **{f"sfd.{k}": NON_NEGATIVE for k in ("t_min", "t_max", "t_init", "warmup_t_min", "warmup_t_max",
                                          "lambda_phi_r", "lambda_phi_f", "lambda_theta_r", "lambda_theta_f",
                                          "grad_clip_value")},
    "sfd.sigma_init": POSITIVE, "sfd.forget_warmup": PROBABILITY, "sfd.augment": PROBABILITY,
    "sfd.lr_phi": POSITIVE, "sfd.lr_theta": POSITIVE, "sfd.fake_updates": Range(1),
    "sfd.betas": ADAM_BETAS,
    "baseline.lr": POSITIVE, "baseline.betas": ADAM_BETAS, "baseline.grad_clip": NON_NEGATIVE,
    **{f"baseline.{k}": NON_NEGATIVE for k in ("sa_gamma", "sa_lambda", "sa_replay_guidance", "salun_alpha",
                                               "esd_eta", "esd_guidance")},
    "baseline.salun_fraction": Range(0, 1, low_open=True),  # an empty mask would train nothing
    "vdu.lambda_p": NON_NEGATIVE, "vdu.target_ratio": POSITIVE, "vdu.gamma": NON_NEGATIVE,
    "vdu.precision_eps": NON_NEGATIVE, "vdu.lr": POSITIVE, "vdu.betas": ADAM_BETAS,
}

# (low key, high key, how): pairs that must be ordered; "<" for a half-open range [low, high).
ORDERED = [("sfd.t_min", "sfd.t_max", "<"), ("sfd.warmup_t_min", "sfd.warmup_t_max", "<"),
           ("edm.sigma_min", "edm.sigma_max", "<"), ("diffusion.beta_start", "diffusion.beta_end", "<=")]


def _check_range(path: str, value) -> None:
    rng = RANGES.get(path)
    if rng is None or value is None:
        return
    values = value if rng.pair else [value]
    if rng.pair and (not isinstance(value, list) or len(value) != 2):
        raise ConfigError(f"{path} must be a pair [beta1, beta2], got {value!r}")
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)):
            raise ConfigError(f"{path} must hold numbers, got {value!r}")
        if not rng.holds(x):
            raise ConfigError(f"{path}={value!r} is out of range: allowed {rng}")


def _get(cfg: dict, path: str):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def check_order(cfg: dict) -> None:
    """Refuse a range whose ends are swapped (or empty), e.g. sfd.t_min >= sfd.t_max."""
    for lo_key, hi_key, how in ORDERED:
        lo, hi = _get(cfg, lo_key), _get(cfg, hi_key)
        if not (lo < hi if how == "<" else lo <= hi):
            raise ConfigError(f"{lo_key}={lo!r} and {hi_key}={hi!r}: need {lo_key} {how} {hi_key}")


def _is_leaf(node) -> bool:
    return isinstance(node, tuple)


def defaults(schema: dict = SCHEMA) -> dict:
    return {k: (copy.deepcopy(v[0]) if _is_leaf(v) else defaults(v)) for k, v in schema.items()}


def _merge(cfg: dict, update: dict, schema: dict, where: str = "") -> None:
    for key, value in update.items():
        path = f"{where}{key}"
        if key not in schema:
            close = difflib.get_close_matches(key, list(schema), n=1)
            hint = f" (did you mean '{where}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}; `train.py --list-keys` lists them all")
        if _is_leaf(schema[key]):
            cfg[key] = _check_type(path, value, schema[key][0])
        elif not isinstance(value, dict):
            raise ConfigError(f"config key {path!r} is a section; give its keys, e.g. {path}.<key>=...")
        else:
            _merge(cfg[key], value, schema[key], path + ".")


def _check_type(path: str, value, default):
    if path == "data.class_names" and value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) and v for v in value)):
        raise ConfigError(f"data.class_names must be a list of names (or null), got {value!r}")
    if path in ("data.mirror", "data.mirror_md5") and value is not None and not isinstance(value, str):
        raise ConfigError(f"{path} must be a string (or null), got {value!r}")
    if path == "data.mirror" and value is not None and not value.startswith(("http://", "https://")):
        raise ConfigError(f"data.mirror must be an http:// or https:// URL, got {value!r} (a local archive: put "
                          f"it in data.root, torchvision extracts it there)")
    if path == "data.mirror_md5" and value is not None and not re.fullmatch(r"[0-9a-fA-F]{32}", value):
        raise ConfigError(f"data.mirror_md5 must be an md5 sum (32 hex digits), got {value!r}")
    if path == "data.random_flip" and value is not None and not isinstance(value, bool):
        raise ConfigError(f"data.random_flip must be true, false or null (the dataset's convention), got {value!r}")
    value = _check_type_of(path, value, default)
    _check_range(path, value)
    return value


def _check_type_of(path: str, value, default):
    if default is None and path in RANGES and isinstance(value, str):  # an optional number, e.g. "1e-4"
        try:
            value = float(value)
        except ValueError:
            pass
    if default is None or value is None or path == "sfd.override":  # a class, name, mode or mapping:
        return value                                                   # ForgetSpec.parse checks it
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
    elif isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                value = float(value) if isinstance(default, float) else int(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        if isinstance(default, float):
            value = float(value)
        elif isinstance(value, float):  # an integer key (a count, a batch size): 8.0 is 8, 8.5 is an error
            if not value.is_integer():
                raise ConfigError(f"{path} must be a whole number, got {value!r}")
            value = int(value)
        low = MINIMUM.get(path)
        if low is not None and value < low:
            raise ConfigError(f"{path} must be at least {low}, got {value!r}")
    elif isinstance(default, list) and not isinstance(value, list) and path != "sfd.forget":
        raise ConfigError(f"{path} must be a list, got {value!r}")
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{path} must be a string, got {value!r}")
    return value


def parse_override(text: str) -> dict:
    """``a.b=value`` -> {"a": {"b": value}}, with the value parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"cannot parse the value of override {text!r}: {err}") from None
    node: dict = {}
    cur = node
    parts = key.strip().split(".")
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = value
    return node


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Resolve defaults <- YAML file <- overrides into one validated dict."""
    cfg = defaults()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
        _merge(cfg, data, SCHEMA)
    for text in overrides:
        _merge(cfg, parse_override(text), SCHEMA)
    check_order(cfg)
    return cfg


ARCHITECTURE_SECTIONS = ("model", "diffusion", "edm")
ARCHITECTURE_DATA_KEYS = ("image_size", "channels", "n_classes", "dataset")


def with_architecture(cfg: dict, arch: dict) -> dict:
    """A new config: ``cfg`` with the network architecture, noise process and data shape of ``arch``
    (the embedded config of a checkpoint a method starts from). Sections a checkpoint predates take
    the schema defaults; ``cfg`` itself is left unchanged."""
    out = copy.deepcopy(cfg)
    base = defaults()
    for key in ARCHITECTURE_SECTIONS:
        out[key] = {**base[key], **copy.deepcopy(arch.get(key, {}))}
    for key in ARCHITECTURE_DATA_KEYS:
        out["data"][key] = arch["data"][key]
    return out


# Settings a resume can never change: the network, its noise process, the data shape and classes it was
# built for, and the method (a method starting from a checkpoint adopts the first three from it, so a new
# value could not even take effect).
FIXED_ON_RESUME = ("method", *(f"{s}." for s in ARCHITECTURE_SECTIONS),
                   *(f"data.{k}" for k in (*ARCHITECTURE_DATA_KEYS, "class_names")))
# Settings a resume may change without --allow-changed-settings (recorded all the same): the run's length.
FREE_ON_RESUME = ("training.n_iters",)


def leaves(cfg: dict, schema: dict = SCHEMA, where: str = "") -> dict:
    """{"section.key": value} for every schema key of ``cfg``."""
    out = {}
    for key, node in schema.items():
        if _is_leaf(node):
            out[f"{where}{key}"] = cfg[key]
        else:
            out.update(leaves(cfg[key], node, f"{where}{key}."))
    return out


def resume_config(saved: dict, overrides=()) -> tuple[dict, list, dict]:
    """A resumed run's config: its config.json <- overrides. Returns (config, the changes recorded by
    earlier resumes, {key: (old, new)} for the settings the overrides change now)."""
    saved = dict(saved)
    earlier = saved.pop("changes", [])
    old = defaults()
    _merge(old, saved, SCHEMA)
    new = copy.deepcopy(old)
    for text in overrides:
        _merge(new, parse_override(text), SCHEMA)
    check_order(new)
    before, after = leaves(old), leaves(new)
    return new, earlier, {k: (before[k], v) for k, v in after.items() if v != before[k]}


def check_resume_changes(changed: dict, allowed: bool) -> None:
    """Refuse what a resume cannot or may not change: FIXED_ON_RESUME always, any other setting except
    FREE_ON_RESUME unless ``allowed`` (--allow-changed-settings)."""
    def listed(keys):
        return "; ".join(f"{k}: {changed[k][0]!r} -> {changed[k][1]!r}" for k in keys)

    fixed = [k for k in changed if k.startswith(FIXED_ON_RESUME)]
    if fixed:
        raise ConfigError(f"--resume cannot change {listed(fixed)}: the run's network was built with them; "
                          "start a new run for different ones")
    other = [k for k in changed if k not in FREE_ON_RESUME]
    if other and not allowed:
        raise ConfigError(f"--resume with changed settings ({listed(other)}); pass the run's settings again, or "
                          "--allow-changed-settings to continue with these (config.json records each change)")


def describe(schema: dict = SCHEMA, where: str = "") -> list[str]:
    """One line per key: name, default and meaning (for --list-keys)."""
    lines = []
    for key, node in schema.items():
        if _is_leaf(node):
            lines.append(f"{where}{key} = {json.dumps(node[0])}\n    {node[1]}")
        else:
            lines += describe(node, f"{where}{key}.")
    return lines


def to_json(cfg: dict) -> str:
    return json.dumps(cfg, indent=2, sort_keys=False)
