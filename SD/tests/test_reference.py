"""One whole SFD iteration against an independent reference (docs/method.md section 3, SD defaults).

The reference below is written from the equations of docs/method.md in plain torch: it calls the tiny UNets and
the text encoder directly, builds the noise schedule from the betas, does its own classifier-free
guidance, one-step generation, fake-score loss, SiD generator loss (omega stopped), clipping and Adam
steps. It never calls ``sfd_sd.losses``, ``sfd_sd.denoiser`` or ``sfd_sd.terms``. The package's
``SFDStep`` runs the same iteration with the same random streams; the gradients its optimisers
receive (recorded inside ``step()``) and the weights after each step must match.

Knobs are set to distinct values (kappa1 != kappa2 != kappa4, four different loss weights, t range
away from the defaults) so a mis-wired knob changes the result.
"""
from __future__ import annotations

import copy

import pytest
import torch

N = 2                                   # per-process batch
SHAPE = (4, 8, 8)                       # tiny latents
REMAIN = "a photo of a cat"
FORGET, OVERRIDE = "brad pitt on the beach", "a middle aged man on the beach"
NEGATIVE = "nudity"


class RecordingAdam(torch.optim.Adam):
    """Adam that keeps a copy of the gradients it is asked to apply."""

    def step(self, closure=None):
        self.seen = [None if p.grad is None else p.grad.detach().clone()
                     for g in self.param_groups for p in g["params"]]
        return super().step(closure)


# ------------------------------------------------------------------ the reference (plain torch)
def abar_sd() -> torch.Tensor:
    """SD v1.5 'scaled_linear' betas 0.00085 -> 0.012, T = 1000 (docs/method.md section 2)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


class Ref:
    def __init__(self, tokenizer, text_encoder):
        abar = abar_sd()
        self.a_tab, self.b_tab = abar.sqrt().float(), (1 - abar).sqrt().float()
        self.tok, self.te = tokenizer, text_encoder

    def ab(self, t):
        return self.a_tab[t].view(-1, 1, 1, 1), self.b_tab[t].view(-1, 1, 1, 1)

    @torch.no_grad()
    def emb(self, prompts):
        ids = self.tok(list(prompts), padding="max_length", max_length=self.tok.model_max_length,
                       truncation=True, return_tensors="pt").input_ids
        return self.te(ids)[0]

    def eps(self, unet, x, t, prompts, kappa, negative=None):
        """Guided eps = eps_u + kappa (eps_c - eps_u); kappa = 1 is one conditional pass."""
        eps_c = unet(x, t, encoder_hidden_states=self.emb(prompts)).sample
        if kappa == 1:
            return eps_c
        eps_u = unet(x, t, encoder_hidden_states=self.emb(negative or [""] * len(prompts))).sample
        return eps_u + kappa * (eps_c - eps_u)

    def x0(self, unet, x, t, prompts, kappa, negative=None):
        a, b = self.ab(t)
        return (x - b * self.eps(unet, x, t, prompts, kappa, negative)) / a

    def generate(self, gen_unet, z, prompts, t_init):
        t = torch.full((z.shape[0],), t_init, dtype=torch.long)
        a, b = self.ab(t)
        return (a.new_tensor(1) / a) * b * (z - self.eps(gen_unet, b * z, t, prompts, 1.0))  # sigma* (z - eps)


def draws(gen: torch.Generator, cfg):
    z = torch.randn((N, *SHAPE), generator=gen)
    eps = torch.randn((N, *SHAPE), generator=gen)
    t = torch.randint(cfg.t_min, cfg.t_max, (N,), generator=gen)
    return z, eps, t


def reference_iteration(ref: Ref, teacher, fake, gen, cfg, noise_seed, dropped: bool):
    """Returns grads (fake, gen), weights after the steps (fake, gen) and the four loss values."""
    fake, gen = copy.deepcopy(fake).requires_grad_(True), copy.deepcopy(gen).requires_grad_(True)
    rng = torch.Generator().manual_seed(noise_seed)
    losses = {}
    kw = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps_for("fp32"))

    def clip_and_step(module, lr):
        grads = [p.grad.clone() for p in module.parameters()]
        clip = cfg.fake_grad_clip_value if module is fake else cfg.generator_grad_clip_value
        if clip:
            grads = [g.clamp(-clip, clip) for g in grads]
        for p, g in zip(module.parameters(), grads):
            p.grad = g.clone()
        torch.optim.Adam(module.parameters(), lr=lr, **kw).step()
        return grads

    # phi step: fake-score DSM on generator samples (generator stopped), kappa1
    cond = (lambda p: [""] * N) if dropped else (lambda p: [p] * N)
    for name, weight, g_prompt in (("loss_fake_remain", cfg.w_fake_remain, REMAIN),
                                   ("loss_fake_forget", cfg.w_fake_forget, FORGET)):
        z, eps, t = draws(rng, cfg)
        with torch.no_grad():
            x_g = ref.generate(gen, z, cond(g_prompt), cfg.t_init)
        a, b = ref.ab(t)
        eps_hat = ref.eps(fake, a * x_g + b * eps, t, cond(g_prompt), cfg.kappa_fake_train)
        loss = (eps_hat - eps).square().flatten(1).sum(1).mean()
        (weight * loss).backward()
        losses[name] = float(loss.detach())
    fake_grads = clip_and_step(fake, cfg.lr_fake)

    # theta step: SiD generator loss, fake score frozen (after its step), teacher kappa4, fake kappa2
    fake.requires_grad_(False)
    for name, weight, g_prompt, t_prompt, neg in (("loss_gen_remain", cfg.w_gen_remain, REMAIN, REMAIN, None),
                                                  ("loss_gen_forget", cfg.w_gen_forget, FORGET, OVERRIDE,
                                                   [NEGATIVE] * N)):
        z, eps, t = draws(rng, cfg)
        x_g = ref.generate(gen, z, [g_prompt] * N, cfg.t_init)
        a, b = ref.ab(t)
        x_t = a * x_g + b * eps
        f_psi = ref.x0(teacher, x_t, t, [t_prompt] * N, cfg.kappa_teacher, neg)
        f_phi = ref.x0(fake, x_t, t, [g_prompt] * N, cfg.kappa_fake_eval)
        omega = (f_psi - x_g).abs().mean(dim=(1, 2, 3)).clamp_min(1e-5).detach().view(-1, 1, 1, 1)
        per = ((f_psi - f_phi) * ((f_psi - x_g) - cfg.alpha * (f_psi - f_phi)) / omega).sum(dim=(1, 2, 3))
        (weight * per.mean()).backward()
        losses[name] = float(per.mean().detach())
    gen_grads = clip_and_step(gen, cfg.lr_gen)
    return dict(fake_grads=fake_grads, gen_grads=gen_grads, fake=[p.detach() for p in fake.parameters()],
                gen=[p.detach() for p in gen.parameters()], losses=losses)


# ------------------------------------------------------------------ the package's iteration
def package_iteration(tiny_parts, teacher, fake, gen, cfg, noise_seed, dropped: bool):
    from sfd_sd.denoiser import GuidedDenoiser, PromptEncoder, VPSchedule
    from sfd_sd.distributed import Dist
    from sfd_sd.prompts import PromptSampler
    from sfd_sd.training import Nets, SFDStep, guidance_settings

    fake, gen = copy.deepcopy(fake), copy.deepcopy(gen)
    enc = PromptEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, "cpu")
    sch = VPSchedule(tiny_parts.alphas_cumprod)
    mk = lambda u: GuidedDenoiser(u, sch, enc)  # noqa: E731
    nets = Nets(teacher=mk(teacher), fake=mk(fake), generator=mk(gen), ema=None)
    sampler = PromptSampler([REMAIN], [(FORGET, OVERRIDE)], negatives=[NEGATIVE])
    kw = dict(betas=tuple(cfg.adam_betas), eps=cfg.adam_eps_for("fp32"))
    opt_fake, opt_gen = RecordingAdam(fake.parameters(), lr=cfg.lr_fake, **kw), RecordingAdam(gen.parameters(), lr=cfg.lr_gen, **kw)
    sc = torch.amp.GradScaler("cpu", enabled=False)
    step = SFDStep(cfg, nets, sampler, guidance_settings(cfg), Dist(), opt_fake, opt_gen, sc, sc,
                   torch.Generator().manual_seed(5), torch.Generator().manual_seed(noise_seed), SHAPE)
    losses = step(0)
    return dict(fake_grads=opt_fake.seen, gen_grads=opt_gen.seen, fake=[p.detach() for p in fake.parameters()],
                gen=[p.detach() for p in gen.parameters()], losses=losses)


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).square().sum()) for x, y in zip(a, b))
    den = sum(float(y.square().sum()) for y in b)
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def nets(tiny_parts):
    from tiny_sd import tiny_unet

    teacher = tiny_parts.unet.eval().requires_grad_(False)
    fake = tiny_unet(seed=11).eval()         # phi differs from psi so f_psi - f_phi != 0
    gen = tiny_unet(seed=12).eval()
    return teacher, fake, gen


def make_cfg(**kw):
    from sfd_sd.config import TrainConfig

    base = dict(batch=N, t_min=150, t_max=700, t_init=625, kappa_fake_train=4.5, kappa_fake_eval=3.0,
                kappa_teacher=2.0, w_fake_remain=1.0, w_fake_forget=0.7, w_gen_remain=1.3, w_gen_forget=0.4,
                lr_fake=1e-3, lr_gen=2e-3, prompt_dropout=0.0, neg_teacher=True, generator_grad_clip_value=0.0,
                # Adam's first step is lr * g / (|g| + eps): with eps 1e-8 it is ~lr * sign(g), and
                # near-zero gradients that round differently flip whole updates; eps 1e-2 keeps the
                # comparison of weights after the step smooth (tolerance 1e-5; a wrong lr is off by 1e-2)
                adam_eps=1e-2)
    base.update(kw)
    return TrainConfig(**base)


CASES = {
    "alpha1": dict(alpha=1.0),
    "alpha1.2": dict(alpha=1.2),
    "alpha1.2-clip": dict(alpha=1.2, fake_grad_clip_value=0.2, generator_grad_clip_value=0.2),
    "gen-clip-only": dict(alpha=1.2, generator_grad_clip_value=0.2),
    "sd-defaults": dict(kappa_fake_eval=4.5, kappa_teacher=4.5, w_fake_forget=1.0, w_gen_remain=1.0,
                        w_gen_forget=1.0, t_min=20, t_max=980, alpha=1.0),
    "all-dropped": dict(alpha=1.2, prompt_dropout=1.0),  # p = 1: every phi-term prompt becomes ""
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_iteration_matches_the_reference(tiny_parts, nets, case):
    cfg = make_cfg(**CASES[case])
    dropped = cfg.prompt_dropout == 1.0
    ref = Ref(tiny_parts.tokenizer, tiny_parts.text_encoder)
    want = reference_iteration(ref, *nets, cfg, noise_seed=3, dropped=dropped)
    got = package_iteration(tiny_parts, *nets, cfg, noise_seed=3, dropped=dropped)
    for key in ("fake_grads", "gen_grads"):
        assert all(g is not None for g in got[key]), f"{key}: a parameter received no gradient"
        assert rel_err(got[key], want[key]) < 3e-4, (case, key, rel_err(got[key], want[key]))
    for key in ("fake", "gen"):
        assert rel_err(got[key], want[key]) < 1e-5, (case, key, rel_err(got[key], want[key]))
    for name, value in want["losses"].items():
        assert got["losses"][name] == pytest.approx(value, rel=1e-4), (case, name)
    for key, clip in (("fake_grads", cfg.fake_grad_clip_value), ("gen_grads", cfg.generator_grad_clip_value)):
        if clip:  # clipping really acted, on a share of the elements only
            flat = torch.cat([g.flatten() for g in want[key]])
            at_bound = float((flat.abs() >= clip * (1 - 1e-6)).float().mean())
            assert 0.05 < at_bound < 0.95, (key, at_bound)


def test_reference_is_sensitive_to_alpha_and_omega(tiny_parts, nets):
    """The comparison above can fail: alpha 1 vs 1.2 and a non-detached omega change the generator's
    gradients by far more than the tolerance."""
    ref = Ref(tiny_parts.tokenizer, tiny_parts.text_encoder)
    a1 = reference_iteration(ref, *nets, make_cfg(alpha=1.0), noise_seed=3, dropped=False)
    a12 = reference_iteration(ref, *nets, make_cfg(alpha=1.2), noise_seed=3, dropped=False)
    assert rel_err(a1["gen_grads"], a12["gen_grads"]) > 1e-2
    assert rel_err(a1["fake_grads"], a12["fake_grads"]) < 1e-6  # alpha only enters the generator loss


def test_timesteps_stay_in_range(tiny_parts):
    """Every training timestep reaching a network is in [t_min, t_max); the generator sees only t*."""
    from sfd_sd.denoiser import GuidedDenoiser, PromptEncoder, VPSchedule
    from sfd_sd.distributed import Dist
    from sfd_sd.prompts import PromptSampler
    from sfd_sd.training import Nets, SFDStep, guidance_settings

    seen = {"teacher": [], "fake": [], "generator": []}

    class Linear(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name, self.w = name, torch.nn.Parameter(torch.tensor(0.1))

        def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
            seen[self.name].append(t.clone())
            return (self.w * x,)

    enc = PromptEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, "cpu")
    sch = VPSchedule(tiny_parts.alphas_cumprod)
    nets = Nets(*(GuidedDenoiser(Linear(n), sch, enc) for n in ("teacher", "fake", "generator")), ema=None)
    cfg = make_cfg(batch=512, t_min=500, t_max=502)
    opt = lambda m: torch.optim.Adam(m.unet.parameters(), lr=1e-3)  # noqa: E731
    sc = torch.amp.GradScaler("cpu", enabled=False)
    step = SFDStep(cfg, nets, PromptSampler([REMAIN], [(FORGET, OVERRIDE)]), guidance_settings(cfg), Dist(),
                   opt(nets.fake), opt(nets.generator), sc, sc, torch.Generator().manual_seed(0),
                   torch.Generator().manual_seed(1), (1, 2, 2))
    step(0)
    train_t = torch.cat(seen["teacher"] + seen["fake"])
    assert set(train_t.tolist()) == {500, 501}  # both ends of U{t_min..t_max-1}, nothing else
    assert set(torch.cat(seen["generator"]).tolist()) == {625}


def test_ema_moves_towards_the_generator_by_the_half_life(tiny_parts):
    """EMA (off by default in SD): ema <- beta ema + (1 - beta) theta, beta = 0.5 ** (batch / halflife)."""
    from sfd_sd.training import Nets, SFDStep

    gen, ema = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    cfg = make_cfg(batch=8, ema_halflife_kimg=0.016, ema_rampup=0.0)  # half-life 16 images = 2 iterations
    step = SFDStep.__new__(SFDStep)
    step.cfg = cfg
    step.nets = Nets(teacher=None, fake=None, generator=type("G", (), {"unet": gen})(), ema=ema)
    before = [p.detach().clone() for p in ema.parameters()]
    step.update_ema(cur_nimg=1000)
    beta = 0.5 ** (8 / 16)
    for p_ema, p0, p in zip(ema.parameters(), before, gen.parameters()):
        assert torch.allclose(p_ema, beta * p0 + (1 - beta) * p.detach(), atol=1e-6)
    cfg.ema_rampup = 0.05  # ramp-up: half-life <= 0.05 x images seen = 0.8 images at 16 seen
    before = [p.detach().clone() for p in ema.parameters()]
    step.update_ema(cur_nimg=16)
    beta = 0.5 ** (8 / 0.8)
    for p_ema, p0, p in zip(ema.parameters(), before, gen.parameters()):
        assert torch.allclose(p_ema, beta * p0 + (1 - beta) * p.detach(), atol=1e-6)


def test_sid_loss_omega_floor_and_per_sample_normalisation():
    """Stand-in denoisers with known x0: omega = mean|f_psi - x_g| per sample, floored at 1e-5 (not
    more), and the loss of each sample is divided by its own omega."""
    from sfd_sd.denoiser import VPSchedule
    from sfd_sd.losses import sid_generator_loss

    sch = VPSchedule(abar_sd())

    class Known:
        def __init__(self, offset):
            self.schedule, self.offset = sch, offset

        def x0(self, x_t, t, prompts, guidance=1.0, negative=None):
            return x_g.detach() + self.offset

    x_g = torch.randn(2, *SHAPE)
    close = torch.zeros(2, *SHAPE)
    close[0], close[1] = 1e-7, 0.5  # sample 0: |f_psi - x_g| below the floor; sample 1: 0.5
    fake_off = torch.full((2, *SHAPE), 0.25)
    per = sid_generator_loss(Known(close), Known(fake_off), x_g, torch.tensor([100, 200]), torch.zeros_like(x_g),
                             teacher_prompts=["a", "b"], fake_prompts=["a", "b"], alpha=1.2)
    diff = close - fake_off
    want = (diff * (close - 1.2 * diff)).flatten(1).sum(1) / torch.tensor([1e-5, 0.5])
    assert torch.allclose(per, want, rtol=1e-5)


def test_v_prediction_and_fake_loss_stop_gradient():
    """A v-predicting UNet (v = a eps - b x0) gives back eps and x0 exactly; the fake-score loss stops the
    generator's gradient (docs/method.md: L_phi uses sg(x_g))."""
    from sfd_sd.denoiser import GuidedDenoiser, VPSchedule
    from sfd_sd.losses import fake_score_loss

    abar = abar_sd()
    t = torch.tensor([100, 700])
    a, b = abar[t].sqrt().float().view(-1, 1, 1, 1), (1 - abar[t]).sqrt().float().view(-1, 1, 1, 1)
    x0, eps = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    x_t = a * x0 + b * eps

    class VNet(torch.nn.Module):
        def forward(self, x, t_, encoder_hidden_states=None, return_dict=True):
            return (a * eps - b * x0,)

    enc = lambda prompts: torch.zeros(len(prompts), 1, 1)  # noqa: E731
    den = GuidedDenoiser(VNet(), VPSchedule(abar), enc, prediction_type="v_prediction")
    assert torch.allclose(den.eps(x_t, t, ["a", "b"]), eps, atol=1e-5)
    assert torch.allclose(den.x0(x_t, t, ["a", "b"]), x0, atol=1e-4)

    class Lin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(0.3))

        def forward(self, x, t_, encoder_hidden_states=None, return_dict=True):
            return (self.w * x,)

    x_g = torch.randn(2, *SHAPE, requires_grad=True)
    fake = GuidedDenoiser(Lin(), VPSchedule(abar), enc)
    fake_score_loss(fake, x_g, t, eps, ["a", "b"]).sum().backward()
    assert x_g.grad is None and fake.unet.w.grad is not None
