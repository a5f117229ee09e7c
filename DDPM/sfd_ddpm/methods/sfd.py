"""Score Forgetting Distillation (SFD), SiD distillation and two-stage SFD (docs/method.md section 3).

Three networks of the teacher's architecture: the frozen teacher psi, the fake score phi and the
one-step generator theta. Each iteration alternates a phi step (DSM on generator samples) and a
theta step (the SiD loss), each with a remain term (labels uniform over the kept classes) and a
forget term (generate at c_f, fake score at c_f, teacher at the override c_o). The loop is data-free:
it draws labels, never reads an image.

Guidance distillation (SiD-LSG's scales, docs/method.md section 3, in the DDPM convention guided =
(1 + w) out(x, c) - w out(x, null), kappa = 1 + w): the teacher is guided with ``sfd.guidance`` (kappa4)
in both theta terms (at c, and at the override c_o in the forget term), the fake score is trained with
``guidance_fake_train`` (kappa1) and evaluated in the generator loss with ``guidance_fake_eval``
(kappa2). While the fake score is guided, ``label_dropout`` of its training labels become the null
class, and those samples are generated at the null class too (as the SD tree's prompt dropout), so its
unconditional branch is trained. All scales 0 is the authors' DDPM setting and today's code path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..augment import GeometricAugment, LABEL_DIM
from ..checkpoints import CheckpointError, load_into, load_weights
from ..config import with_architecture
from ..diffusion import check_guidance, Denoiser, NoGuidance, schedule_of
from ..distributed import Dist
from ..losses import fake_score_loss, generator_loss
from ..networks import build_network
from ..samplers import image_seed, NoiseStreams, one_step
from .common import ema_decay, ema_update, frozen_copy, grid_labels, unwrap, wrap
from .forget_spec import ForgetSpec


FAKE_SCORE_LEVELS = ("range", "pretrain")


@dataclass(frozen=True)
class Guidance:
    """SFD's guidance scales w (kappa = 1 + w) with the nulls of ``sfd.guidance_fake_*`` resolved to
    ``sfd.guidance``: every reader (the losses, the saved config) sees the same numbers."""
    teacher: float = 0.0      # sfd.guidance, kappa4
    fake_train: float = 0.0   # sfd.guidance_fake_train, kappa1
    fake_eval: float = 0.0    # sfd.guidance_fake_eval, kappa2
    label_dropout: float = 0.1

    @classmethod
    def from_config(cls, s: dict) -> "Guidance":
        w = _scale("guidance", s["guidance"])
        fake_train = w if s["guidance_fake_train"] is None else _scale("guidance_fake_train", s["guidance_fake_train"])
        fake_eval = w if s["guidance_fake_eval"] is None else _scale("guidance_fake_eval", s["guidance_fake_eval"])
        p = s["label_dropout"]
        if not 0 <= p < 1:
            raise ValueError(f"sfd.label_dropout must lie in [0, 1), got {p!r}")
        return cls(w, fake_train, fake_eval, float(p))

    def config(self) -> dict:
        """The resolved values, under their config keys (recorded in the run's config.json)."""
        return {"guidance": self.teacher, "guidance_fake_train": self.fake_train,
                "guidance_fake_eval": self.fake_eval, "label_dropout": self.label_dropout}

    @property
    def dropout(self) -> float:
        """The label-dropout share in effect: only a guided fake score ever evaluates its null branch."""
        return self.label_dropout if (self.fake_train or self.fake_eval) else 0.0

    def check(self, null_label) -> None:
        """Refuse any nonzero scale for a network without a null class, naming the key."""
        for key, w in self.config().items():
            if key != "label_dropout":
                try:
                    check_guidance(null_label, w)
                except NoGuidance as err:
                    raise NoGuidance(f"sfd.{key}={w}: {err}") from None


def _scale(key: str, w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)):
        raise ValueError(f"sfd.{key} must be a number (a guidance scale w >= 0), got {w!r}")
    if w < 0:
        raise ValueError(f"sfd.{key} must be >= 0 (w = 0 is unguided), got {w!r}")
    return float(w)


def augmentation(p: float, fake_score) -> GeometricAugment | None:
    """SiD's augmentation of the fake score's training images (``sfd.augment`` = EDM's p; 0: none), refused
    at construction for a network without EDM's 9 augmentation labels."""
    if p == 0:
        return None
    if getattr(getattr(fake_score, "model", None), "augment_dim", 0) != LABEL_DIM:
        raise ValueError(f"sfd.augment={p} needs an EDM (songunet) network with model.augment_dim={LABEL_DIM} "
                         "(NVIDIA's CIFAR-10 networks have it); this network has no augmentation input: set "
                         "sfd.augment=0")
    return GeometricAugment(p)


class SFD:
    kind = "sfd"

    def __init__(self, cfg: dict, dist: Dist, networks: tuple | None = None):
        """``networks`` = (teacher, fake score, generator) modules, already initialised, replaces loading
        them from ``sfd.init`` / ``sfd.init_stage1`` (tests use it to plug in small analytic models)."""
        s = cfg["sfd"]
        if cfg["method"] == "sid" and s["forget"]:
            raise ValueError("method sid distils every class; set sfd.forget=[] (or use method sfd)")
        if cfg["method"] == "sfd" and not s["forget"]:
            raise ValueError("method sfd needs at least one class in sfd.forget (or use method sid)")
        self.guidance = Guidance.from_config(s)  # checked before any checkpoint loads
        if networks is None:
            networks, cfg = self._load_networks(cfg)
        cfg = {**cfg, "sfd": {**cfg["sfd"], **self.guidance.config()}}
        self.cfg, self.dist = cfg, dist
        teacher, fake, gen = networks
        self.guidance.check(teacher.null_label)
        self.augment = augmentation(s["augment"], fake)
        self.spec = ForgetSpec.parse(s["forget"], s["override"], cfg["data"]["n_classes"], s["classifier"],
                                     s["classifier_mode"], dist.device)
        self.schedule = schedule_of(cfg)
        dev = dist.device
        self.teacher_net = frozen_copy(teacher).to(dev)
        self.fake_net = wrap(fake.to(dev).train(), dist)
        self.gen_net = wrap(gen.to(dev).train(), dist)
        self.gen_ema = frozen_copy(unwrap(self.gen_net))
        null = teacher.null_label
        self.teacher = Denoiser(self.teacher_net, self.schedule, null)
        self.fake_train = Denoiser(self.fake_net, self.schedule, null)         # phi step (DDP)
        self.fake_frozen = Denoiser(unwrap(self.fake_net), self.schedule, null)  # theta step
        self.generator = Denoiser(self.gen_net, self.schedule, null)
        betas = tuple(s["betas"])
        self.opt_phi = torch.optim.Adam(self.fake_net.parameters(), lr=s["lr_phi"], betas=betas,
                                        eps=cfg["training"]["adam_eps"])
        self.opt_theta = torch.optim.Adam(self.gen_net.parameters(), lr=s["lr_theta"], betas=betas,
                                          eps=cfg["training"]["adam_eps"])
        self.n = dist.local_batch(cfg["training"]["batch_size"])
        self.shape = (cfg["data"]["channels"], cfg["data"]["image_size"], cfg["data"]["image_size"])
        self.warmup_iters = round(s["forget_warmup"] * cfg["training"]["n_iters"])
        self.t_init = self.schedule.generator_level(s)
        if s["fake_score_levels"] not in FAKE_SCORE_LEVELS:
            raise ValueError(f"sfd.fake_score_levels must be one of {', '.join(FAKE_SCORE_LEVELS)}, "
                             f"got {s['fake_score_levels']!r}")

    @classmethod
    def _load_networks(cls, cfg: dict):
        """(teacher, fake score, generator) built from the checkpoints named in ``cfg['sfd']``, and the
        run's config with their architecture."""
        weights, cfg = cls._initial_weights(cfg)
        modules = []
        for source, state in weights:
            net = build_network(cfg)
            load_into(net, state, source)
            modules.append(net)
        return modules, cfg

    @staticmethod
    def _initial_weights(cfg: dict):
        """((source, state_dict) for teacher, fake score and generator; the config with the teacher's
        architecture)."""
        s = cfg["sfd"]
        if not s["init"] and not (s["init_stage1"] and s["stage2_teacher"] == "stage1_fake_score"):
            raise ValueError("set sfd.init to the pretrained teacher checkpoint (network-*.safetensors)")
        if s["stage2_teacher"] not in ("original", "stage1_fake_score"):
            raise ValueError(f"sfd.stage2_teacher must be original or stage1_fake_score, got {s['stage2_teacher']!r}")
        arch = None
        teacher = None
        if s["init"]:
            nets, meta = load_weights(s["init"])
            if meta["kind"] != "ddpm":
                raise CheckpointError(f"sfd.init must be a pretrained DDPM checkpoint; {s['init']} is {meta['kind']!r}")
            arch = meta["config"]
            teacher = (f"{s['init']} [ema]", nets["ema"])
            fake = gen = teacher
        if s["init_stage1"]:
            nets1, meta1 = load_weights(s["init_stage1"])
            if meta1["kind"] != "sfd":
                raise CheckpointError(f"sfd.init_stage1 must be an SFD/SiD checkpoint; {s['init_stage1']} is {meta1['kind']!r}")
            arch = arch or meta1["config"]
            fake = (f"{s['init_stage1']} [fake_score]", nets1["fake_score"])
            gen = (f"{s['init_stage1']} [generator_ema]", nets1["generator_ema"])
            if s["stage2_teacher"] == "stage1_fake_score":  # the authors' behaviour (their init_ckpt_0 bug)
                teacher = fake
        return (teacher, fake, gen), with_architecture(cfg, arch)

    # ----------------------------------------------------------------------------------------
    def start(self, step: int) -> None:
        pass  # data-free: nothing to load

    def _t(self, n: int, warm: bool, phi: bool) -> torch.Tensor:
        """Noise levels of one term: between positions [t_min, t_max) of the T-step grid (the forget
        warm-up's range while ``warm``), or, for the fake score with ``sfd.fake_score_levels=pretrain``,
        the backbone's pretraining distribution (EDM's log-normal sigma, as SiD does for EDM teachers)."""
        s = self.cfg["sfd"]
        if phi and s["fake_score_levels"] == "pretrain":
            return self.schedule.sample_train(n, self.dist.device)
        lo, hi = (s["warmup_t_min"], s["warmup_t_max"]) if warm else (s["t_min"], s["t_max"])
        return self.schedule.sample_range(n, lo, hi, self.dist.device)

    def _draw(self, forget: bool, warm: bool, phi: bool = False) -> dict:
        """Fresh labels, z, t and eps for one term (the same draws in batched and separate mode)."""
        n, dev = self.n, self.dist.device
        if forget:
            label, override = self.spec.sample_forget(n)
        else:
            label, override = self.spec.sample_remain(n), None
        if phi and self.guidance.dropout > 0:  # generated and scored at the null class (override unused in phi)
            drop = torch.rand(n, device=dev) < self.guidance.dropout
            label = torch.where(drop, torch.full_like(label, self.teacher.null_label), label)
        return {"forget": forget, "label": label, "override": override, "z": torch.randn(n, *self.shape, device=dev),
                "t": self._t(n, warm and forget, phi), "eps": torch.randn(n, *self.shape, device=dev)}

    def _generate(self, terms: list[dict]) -> torch.Tensor:
        z = torch.cat([d["z"] for d in terms])
        return one_step(self.generator, torch.cat([d["label"] for d in terms]), z, self.t_init)

    def _cat(self, terms, key):
        return torch.cat([d[key] for d in terms])

    def train_step(self, step: int) -> dict[str, float]:
        s = self.cfg["sfd"]
        forgetting = bool(self.spec.forget)
        warm = step < self.warmup_iters
        out = {}
        # ---- phi step: fake score in train mode (dropout active), generator in eval mode, no grad ----
        w_phi = [s["lambda_phi_r"]] + ([s["lambda_phi_f"]] if forgetting else [])
        self.fake_net.train()
        self.gen_net.eval()
        for _ in range(s["fake_updates"]):  # 1 in the paper; each update on fresh samples and levels
            terms = [self._draw(False, warm, phi=True)] + ([self._draw(True, warm, phi=True)] if forgetting else [])
            self.opt_phi.zero_grad(set_to_none=True)
            losses_phi = self._run_terms(terms, w_phi, self._phi_terms)
            self._clip_and_step(self.fake_net, self.opt_phi)
        # ---- theta step: generator in train mode, fake score frozen in eval mode ----
        w_theta = [s["lambda_theta_r"]] + ([s["lambda_theta_f"]] if forgetting else [])
        terms = [self._draw(False, warm)] + ([self._draw(True, warm)] if forgetting else [])
        self.fake_net.eval().requires_grad_(False)
        self.gen_net.train()
        self.opt_theta.zero_grad(set_to_none=True)
        losses_theta = self._run_terms(terms, w_theta, self._theta_terms)
        self._clip_and_step(self.gen_net, self.opt_theta)
        self.fake_net.requires_grad_(True)
        ema_update(self.gen_ema, unwrap(self.gen_net), ema_decay(self.cfg, step))
        names = ["remain", "forget"]
        for k, v in enumerate(losses_phi):
            out[f"phi_{names[k]}"] = v
        for k, v in enumerate(losses_theta):
            out[f"theta_{names[k]}"] = v
        return out

    def _run_terms(self, terms, weights, per_sample_fn) -> list[float]:
        """Weighted sum of per-term batch means; one batched pass or one pass (and backward) per term."""
        n = self.n
        if self.cfg["sfd"]["batched"]:
            per = per_sample_fn(terms)
            means = [per[k * n:(k + 1) * n].mean() for k in range(len(terms))]
            sum(w * m for w, m in zip(weights, means)).backward()
        else:
            means = []
            for w, term in zip(weights, terms):
                m = per_sample_fn([term]).mean()
                (w * m).backward()
                means.append(m)
        return [self.dist.mean(m.detach()).item() for m in means]

    def _phi_terms(self, terms) -> torch.Tensor:
        with torch.no_grad():
            x_g = self._generate(terms)
        return fake_score_loss(self.fake_train, x_g, self._cat(terms, "label"), self._cat(terms, "t"),
                               self._cat(terms, "eps"), self.guidance.fake_train, self.augment)

    def _theta_terms(self, terms) -> torch.Tensor:
        x_g = self._generate(terms)
        if all(d["override"] is not None for d in terms if d["forget"]):
            teacher_label = torch.cat([d["override"] if d["forget"] else d["label"] for d in terms])
        else:  # classifier pseudo-labels need the fake score's denoised estimate first
            def teacher_label(f_fake: torch.Tensor) -> torch.Tensor:
                parts = f_fake.split(self.n)
                return torch.cat([self.spec.pseudo_label(p) if d["forget"] else d["label"]
                                  for d, p in zip(terms, parts)])
        return generator_loss(self.teacher, self.fake_frozen, x_g, self._cat(terms, "t"), self._cat(terms, "eps"),
                              teacher_label, self._cat(terms, "label"), self.cfg["sfd"]["alpha"],
                              teacher_guidance=self.guidance.teacher, fake_guidance=self.guidance.fake_eval)

    def _clip_and_step(self, net, opt) -> None:
        clip = self.cfg["sfd"]["grad_clip_value"]
        if clip > 0:
            torch.nn.utils.clip_grad_value_(net.parameters(), clip)
        opt.step()

    # ----------------------------------------------------------------------------------------
    def weights(self) -> dict:
        return {"generator_ema": self.gen_ema.state_dict(), "generator": unwrap(self.gen_net).state_dict(),
                "fake_score": unwrap(self.fake_net).state_dict()}

    def state_dict(self) -> dict:
        return {**self.weights(), "opt_phi": self.opt_phi.state_dict(), "opt_theta": self.opt_theta.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.gen_ema.load_state_dict(sd["generator_ema"])
        unwrap(self.gen_net).load_state_dict(sd["generator"])
        unwrap(self.fake_net).load_state_dict(sd["fake_score"])
        self.opt_phi.load_state_dict(sd["opt_phi"])
        self.opt_theta.load_state_dict(sd["opt_theta"])

    @torch.no_grad()
    def sample_grids(self) -> dict:
        g, d = self.cfg["grid"], self.cfg["data"]
        labels, idx = grid_labels(d["n_classes"], g["per_class"], self.dist.device)
        seeds = [image_seed(self.cfg["seed"], int(c), i) for c, i in zip(labels, idx)]
        z = NoiseStreams(seeds, self.shape, self.dist.device).randn()
        out = {}
        for name, net in (("grid_ema", self.gen_ema), ("grid", unwrap(self.gen_net))):
            was_training = net.training
            net.eval()
            out[name] = (one_step(Denoiser(net, self.schedule, net.null_label), labels, z, self.t_init),
                         g["per_class"])
            net.train(was_training)
        return out
