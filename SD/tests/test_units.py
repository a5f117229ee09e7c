"""Unit tests: loading, guided denoiser, prompts, term routing, losses."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch


# ---------------------------------------------------------------- loading
def test_tiny_folder_loads_through_the_hub_code_path(tiny_sd_dir, tiny_parts):
    from sfd_sd.models import load_sd_parts

    assert tiny_parts.prediction_type == "epsilon"
    assert tiny_parts.alphas_cumprod.shape == (1000,)
    ids = tiny_parts.tokenizer("a photo of a cat").input_ids
    assert len(ids) == 7 and ids[0] == tiny_parts.tokenizer.bos_token_id  # words are single tokens
    assert tiny_parts.unet.training is False and not any(p.requires_grad for p in tiny_parts.unet.parameters())
    parts = load_sd_parts(str(tiny_sd_dir), load_vae=False, load_unet=False)
    assert parts.unet is None and parts.vae is None


def test_missing_local_model_fails_clearly(tmp_path):
    from sfd_sd.models import ModelLoadError, load_sd_parts

    with pytest.raises(ModelLoadError, match="not found"):
        load_sd_parts(str(tmp_path / "nope"))


def test_generator_init_teacher_and_folder_not_pickle(tmp_path, tiny_parts):
    from sfd_sd.models import ModelLoadError, load_generator_init
    from tiny_sd import tiny_unet

    teacher = tiny_parts.unet
    g = load_generator_init("teacher", teacher)
    assert g is not teacher and torch.equal(g.conv_in.weight, teacher.conv_in.weight)
    other = tiny_unet(seed=5)
    other.save_pretrained(tmp_path / "gen")
    g = load_generator_init(str(tmp_path / "gen"), teacher)
    assert torch.equal(g.conv_in.weight, other.conv_in.weight)
    with open(tmp_path / "sid.pkl", "wb") as f:
        pickle.dump({"ema": other}, f)
    with pytest.raises(ModelLoadError, match="convert_sid_lsg.py"):  # never unpickled here
        load_generator_init(str(tmp_path / "sid.pkl"), teacher)
    tiny_unet(channels=(16, 32)).save_pretrained(tmp_path / "small")
    with pytest.raises(ModelLoadError, match="architecture"):
        load_generator_init(str(tmp_path / "small"), teacher)


def test_gradient_checkpointing_recomputes_blocks(tiny_parts):
    """diffusers checkpointing is really on: block forwards run again during backward."""
    from sfd_sd.models import configure_unet

    counts = {}
    for ckpt in (False, True):
        unet = copy.deepcopy(tiny_parts.unet).requires_grad_(True)
        configure_unet(unet, "sdpa", grad_checkpointing=ckpt)
        n = [0]
        unet.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda *a: n.__setitem__(0, n[0] + 1))
        out = unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 16, 32)).sample
        out.square().mean().backward()
        counts[ckpt] = n[0]
    assert counts == {False: 1, True: 2}


# ---------------------------------------------------------------- denoiser
@pytest.fixture(scope="module")
def den(tiny_parts):
    from sfd_sd.denoiser import GuidedDenoiser, PromptEncoder, VPSchedule

    enc = PromptEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, "cpu")
    return GuidedDenoiser(tiny_parts.unet, VPSchedule(tiny_parts.alphas_cumprod), enc)


def _raw(den, x, t, prompts):
    with torch.no_grad():
        return den.unet(x, t, den.encoder(prompts)).sample


def test_guided_denoiser_without_and_with_negative_prompt(den):
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300, 700])
    prompts, neg = ["a photo of a cat", "a dog in a park"], ["nudity", "a painting of a fish"]
    with torch.no_grad():
        assert torch.allclose(den.eps(x, t, prompts, 1.0), _raw(den, x, t, prompts), atol=1e-5)
        # kappa = 1 is one conditional pass: the negative prompt changes nothing
        assert torch.allclose(den.eps(x, t, prompts, 1.0, neg), _raw(den, x, t, prompts), atol=1e-5)
        c, u, n = _raw(den, x, t, prompts), _raw(den, x, t, ["", ""]), _raw(den, x, t, neg)
        assert torch.allclose(den.eps(x, t, prompts, 4.5), u + 4.5 * (c - u), atol=1e-4)
        assert torch.allclose(den.eps(x, t, prompts, 4.5, neg), n + 4.5 * (c - n), atol=1e-4)
        assert not torch.allclose(den.eps(x, t, prompts, 4.5, neg), den.eps(x, t, prompts, 4.5), atol=1e-3)
        a, b = den.schedule.a(t, x), den.schedule.b(t, x)
        assert torch.allclose(den.x0(x, t, prompts, 4.5, neg), (x - b * den.eps(x, t, prompts, 4.5, neg)) / a, atol=1e-4)


def test_long_negative_prompt_is_truncated_not_broken(den):
    long_neg = ", ".join(["nudity naked explicit lewd"] * 30)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with pytest.warns(UserWarning, match="truncated"):
        out = den.eps(x, t, ["a photo of a man"], 4.5, [long_neg])
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_one_step_generator_formula(den):
    from sfd_sd.denoiser import one_step_generate

    z = torch.randn(2, 4, 8, 8)
    t = torch.tensor([625, 625])
    b = den.schedule.b(t, z)
    expected = den.schedule.sigma(625) * (z - _raw(den, b * z, t, ["a cat", "a dog"]))
    with torch.no_grad():
        assert torch.allclose(one_step_generate(den, z, ["a cat", "a dog"], 625), expected, atol=1e-4)
    assert abs(den.schedule.sigma(625) - 2.5017) < 1e-3  # docs/method.md / upstream notes: sigma_625 for SD v1.5


# ---------------------------------------------------------------- prompts
def test_override_substitution_and_cartesian_pairing():
    from sfd_sd.prompts import PromptError, build_forget_pairs, substitute_concept

    assert substitute_concept("Brad Pitt and BRAD PITT", "brad pitt", "a middle aged man") == \
        "a middle aged man and a middle aged man"
    assert substitute_concept("a (c.a.t) photo", "(c.a.t)", "dog") == "a dog photo"  # literal, not regex
    assert substitute_concept("cat photo", "c.t", "dog") == "cat photo"
    pairs = build_forget_pairs(["Brad Pitt smiling", "brad pitt at night"], "brad pitt", "a middle aged man")
    assert pairs == [("Brad Pitt smiling", "a middle aged man smiling"), ("brad pitt at night", "a middle aged man at night")]
    assert build_forget_pairs(["Man", "Woman"], "", "") == [("Man", "Man"), ("Woman", "Woman")]
    pairs = build_forget_pairs(["f1", "f2"], None, None, override_prompts=["o1", "o2", "o3"])
    assert pairs == [(f, o) for f in ("f1", "f2") for o in ("o1", "o2", "o3")]
    with pytest.raises(PromptError):
        build_forget_pairs(["x"], "brad pitt", None)
    with pytest.raises(PromptError):
        build_forget_pairs(["x"], "", "dog")


def test_keyword_augmentation_before_or_after():
    from sfd_sd.prompts import PromptSampler

    s = PromptSampler(["r"], [("Man", "Man"), ("Woman", "Woman")], keywords=["nudity", "topless"])
    b = s.forget_batch(2000, torch.Generator().manual_seed(0))
    before = sum(any(f == f"{k} {o}" for k in ("nudity", "topless")) for f, o in zip(b.forget, b.override))
    after = sum(any(f == f"{o}, {k}" for k in ("nudity", "topless")) for f, o in zip(b.forget, b.override))
    assert before + after == 2000 and 900 < before < 1100
    assert set(b.override) == {"Man", "Woman"} and b.negative is None


def test_prompt_dropout_rate_and_routing():
    from sfd_sd.prompts import ForgetBatch, RemainBatch, dropout_mask
    from sfd_sd.terms import GuidanceSettings, route

    mask = dropout_mask(20000, 0.1, torch.Generator().manual_seed(0))
    assert 0.09 < sum(mask) / 20000 < 0.11  # 10% +- > 4 sigma
    # the authors' trigger: the fake score's own guidance (kappa1 or kappa2), not the teacher's kappa4
    assert GuidanceSettings().dropout_active
    assert not GuidanceSettings(kappa_fake_train=1, kappa_fake_eval=1, kappa_teacher=1).dropout_active
    assert not GuidanceSettings(kappa_fake_train=1, kappa_fake_eval=1, kappa_teacher=2).dropout_active
    assert GuidanceSettings(kappa_fake_train=2, kappa_fake_eval=1, kappa_teacher=1).dropout_active
    assert GuidanceSettings(kappa_fake_train=1, kappa_fake_eval=2, kappa_teacher=1).dropout_active
    assert not GuidanceSettings(kappa_fake_train=2, dropout=0.0).dropout_active
    # a dropped remain item keeps its negative prompt; a dropped forget item's negative becomes ""
    batch = RemainBatch(["p0", "p1", "p2"], ["n0", "n1", "n2"])
    tp = route("fake_remain", batch, GuidanceSettings(neg_fake_train=True), dropped=[False, True, False])
    assert tp.generator == tp.fake == ["p0", "", "p2"] and tp.fake_negative == ["n0", "n1", "n2"]
    fb = ForgetBatch(["f0", "f1"], ["o0", "o1"], ["n0", "n1"])
    tp = route("fake_forget", fb, GuidanceSettings(neg_fake_train=True), dropped=[True, False])
    assert tp.generator == tp.fake == ["", "f1"] and tp.fake_negative == ["", "n1"]


# ---------------------------------------------------------------- terms
def test_which_prompts_reach_which_network():
    from sfd_sd.prompts import ForgetBatch, RemainBatch
    from sfd_sd.terms import GuidanceSettings, route

    rb = RemainBatch(["c"], None)
    fb = ForgetBatch(["brad pitt, nudity"], ["a middle aged man"], ["neg"])
    g = GuidanceSettings(kappa_fake_train=1.5, kappa_fake_eval=2.5, kappa_teacher=3.5)
    t = route("fake_remain", rb, g)
    assert (t.generator, t.fake, t.teacher, t.fake_guidance) == (["c"], ["c"], None, 1.5)
    t = route("gen_remain", rb, g)
    assert (t.generator, t.fake, t.teacher, t.fake_guidance, t.teacher_guidance) == (["c"], ["c"], ["c"], 2.5, 3.5)
    t = route("fake_forget", fb, g)
    assert (t.generator, t.fake, t.teacher, t.fake_negative) == (["brad pitt, nudity"], ["brad pitt, nudity"], None, None)
    t = route("gen_forget", fb, g)
    assert (t.generator, t.fake, t.teacher) == (["brad pitt, nudity"], ["brad pitt, nudity"], ["a middle aged man"])
    assert (t.fake_negative, t.teacher_negative) == (None, ["neg"])  # default use_neg = 0,0,1
    g2 = GuidanceSettings(sg_w_override=True, neg_fake_train=True, neg_fake_eval=True, neg_teacher=False)
    t = route("fake_forget", fb, g2)
    assert (t.generator, t.fake, t.fake_negative) == (["brad pitt, nudity"], ["a middle aged man"], ["neg"])
    t = route("gen_forget", fb, g2)
    assert (t.generator, t.fake, t.teacher) == (["brad pitt, nudity"], ["a middle aged man"], ["a middle aged man"])
    assert (t.fake_negative, t.teacher_negative) == (["neg"], None)
    t = route("gen_remain", RemainBatch(["c"], ["n"]), GuidanceSettings())  # sid_w_neg batch
    assert (t.fake_negative, t.teacher_negative) == (None, ["n"])


class _Recorder(torch.nn.Module):
    """A stand-in denoiser that records what it is asked; eps = w * x_t (differentiable)."""

    def __init__(self, name, log, schedule):
        super().__init__()
        self.name, self.log, self.schedule = name, log, schedule
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    @property
    def unet(self):
        return self

    def eps(self, x_t, t, prompts, guidance=1.0, negative=None):
        self.log.append((self.name, list(prompts), guidance, None if negative is None else list(negative)))
        return self.w * x_t

    def x0(self, x_t, t, prompts, guidance=1.0, negative=None):
        e = self.eps(x_t, t, prompts, guidance, negative)
        return (x_t - self.schedule.b(t, x_t) * e) / self.schedule.a(t, x_t)


def test_training_step_sends_the_routed_prompts(tiny_parts):
    """The real SFDStep, with recording denoisers: prompts per network per term."""
    from sfd_sd.config import TrainConfig
    from sfd_sd.denoiser import VPSchedule
    from sfd_sd.distributed import Dist
    from sfd_sd.prompts import PromptSampler
    from sfd_sd.training import Nets, SFDStep
    from sfd_sd.terms import GuidanceSettings

    log = []
    sch = VPSchedule(tiny_parts.alphas_cumprod)
    nets = Nets(teacher=_Recorder("teacher", log, sch), fake=_Recorder("fake", log, sch),
                generator=_Recorder("generator", log, sch), ema=None)
    cfg = TrainConfig(batch=2, prompt_dropout=0.0)
    sampler = PromptSampler(["remain A"], [("Brad Pitt x", "a middle aged man x")], negatives=["neg"])
    g = GuidanceSettings(sg_w_override=True, dropout=0.0)
    opt = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)  # noqa: E731
    sc = torch.amp.GradScaler("cpu", enabled=False)
    step = SFDStep(cfg, nets, sampler, g, Dist(), opt(nets.fake), opt(nets.generator), sc, sc,
                   torch.Generator().manual_seed(0), torch.Generator().manual_seed(1), (4, 8, 8))
    step(0)
    calls = [(n, p[0], k, None if neg is None else neg[0]) for n, p, k, neg in log]
    assert calls == [
        ("generator", "remain A", 1.0, None), ("fake", "remain A", 4.5, None),                   # phi remain
        ("generator", "Brad Pitt x", 1.0, None), ("fake", "a middle aged man x", 4.5, None),      # phi forget
        ("generator", "remain A", 1.0, None), ("teacher", "remain A", 4.5, None), ("fake", "remain A", 4.5, None),
        ("generator", "Brad Pitt x", 1.0, None), ("teacher", "a middle aged man x", 4.5, "neg"),  # theta forget
        ("fake", "a middle aged man x", 4.5, None),
    ]


# ---------------------------------------------------------------- losses
def test_nan_samples_are_dropped(den):
    from sfd_sd.losses import clean_gradients_, fake_score_loss, masked_sum, sid_generator_loss

    torch.manual_seed(0)
    gen = copy.deepcopy(den.unet).requires_grad_(True)
    x_g = torch.randn(3, 4, 8, 8, requires_grad=True)
    x_bad = torch.cat([x_g[:1] * float("nan"), x_g[1:]])
    eps, t = torch.randn(3, 4, 8, 8), torch.tensor([100, 500, 900])
    prompts = ["a cat", "a dog", "a fish"]
    per = fake_score_loss(den, x_bad, t, eps, prompts, 1.0)
    loss, kept = masked_sum(per, 3)
    ref = fake_score_loss(den, x_g[1:], t[1:], eps[1:], prompts[1:], 1.0)
    assert kept == 2 and torch.allclose(loss, ref.sum() / 3)
    per = sid_generator_loss(den, den, x_bad, t, eps, teacher_prompts=prompts, fake_prompts=prompts)
    loss, kept = masked_sum(per, 3)
    assert kept == 2 and torch.isfinite(loss)
    # NaN inputs leak NaN into shared weight gradients even when masked; cleaning removes them.
    z = torch.randn(2, 4, 8, 8)
    z[0] = float("nan")
    out = gen(z, torch.tensor([625, 625]), den.encoder(["a", "b"])).sample
    per = out.flatten(1).square().sum(1)
    loss, kept = masked_sum(per, 2)
    loss.backward()
    assert kept == 1 and any(not torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)
    clean_gradients_(gen.parameters())
    assert all(torch.isfinite(p.grad).all() for p in gen.parameters() if p.grad is not None)


def test_sid_loss_alpha_one_form_and_gradient_path(den):
    from sfd_sd.losses import sid_generator_loss

    torch.manual_seed(1)
    x_g = torch.randn(2, 4, 8, 8, requires_grad=True)
    eps, t = torch.randn(2, 4, 8, 8), torch.tensor([200, 800])
    fake = copy.copy(den)
    fake.unet = copy.deepcopy(den.unet)
    with torch.no_grad():
        fake.unet.conv_out.bias.add_(0.1)
    per = sid_generator_loss(den, fake, x_g, t, eps, teacher_prompts=["a cat"] * 2, fake_prompts=["a cat"] * 2, alpha=1.0)
    with torch.no_grad():
        x_t = den.schedule.add_noise(x_g, eps, t)
        f_psi, f_phi = den.x0(x_t, t, ["a cat"] * 2), fake.x0(x_t, t, ["a cat"] * 2)
        omega = (f_psi - x_g).abs().flatten(1).mean(1)
        ref = ((f_psi - f_phi) * (f_phi - x_g)).flatten(1).sum(1) / omega
    assert torch.allclose(per, ref, rtol=1e-4, atol=1e-4)
    per.sum().backward()
    assert x_g.grad is not None and x_g.grad.abs().sum() > 0
    assert all(p.grad is None for p in den.unet.parameters())  # frozen teacher gets no gradient


def test_numerics_follow_the_authors_precision_rule():
    """Adam eps 1e-6 and generator value clip 1 in fp16 (the authors' fp16 runs), else 1e-8 and off;
    explicit values win."""
    from sfd_sd.config import TrainConfig

    cfg = TrainConfig()
    assert (cfg.adam_eps_for("fp16"), cfg.generator_clip_for("fp16")) == (1e-6, 1.0)
    for p in ("bf16", "fp32"):
        assert (cfg.adam_eps_for(p), cfg.generator_clip_for(p)) == (1e-8, 0.0)
    cfg = TrainConfig(adam_eps=1e-5, generator_grad_clip_value=0.0)
    assert (cfg.adam_eps_for("fp16"), cfg.generator_clip_for("fp16")) == (1e-5, 0.0)
