"""Guidance distillation in SFD (sfd.guidance, guidance_fake_train, guidance_fake_eval, label_dropout).

Each test runs the real SFD loop on the analytic class-conditional Gaussians of tests/analytic.py (whose
null class has its own mean, so guided and unguided outputs differ by O(1)), spies on the loss calls,
and recomputes what entered them from explicit network calls: the guided output by hand is
(1 + w) net(x, t, c) - w net(x, t, null) from two separate calls.

Tolerance for the guided values: relative 1e-5 (plus 1e-6 absolute). Each test also checks that the
neighbouring wrong answers (w + 1 instead of w, a swapped scale, no guidance) miss by far more.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from analytic import EDMGaussianClassDenoiser, GaussianClassScore
from conftest import run_script, TINY
from sfd_ddpm import config as C
from sfd_ddpm.diffusion import Denoiser, NoGuidance, VPSchedule
from sfd_ddpm.distributed import Dist
from sfd_ddpm.edm import EDMSchedule
from sfd_ddpm.losses import fake_score_loss, sid_loss
from sfd_ddpm.methods import sfd as sfd_module
from sfd_ddpm.methods.forget_spec import ForgetSpec
from sfd_ddpm.methods.sfd import SFD

MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])
NULL = 3  # GaussianClassScore(MEANS): classes 0..2, null class 3
RTOL, ATOL = 1e-5, 1e-6
# three distinct scales, so that a swapped wiring cannot pass
W_TEACHER, W_FAKE_TRAIN, W_FAKE_EVAL = 0.5, 1.5, 3.0


def make_sfd(batch=8, **sfd) -> SFD:
    cfg = C.load_config(None, ["method=sfd", "data.channels=2", "data.image_size=1", "data.n_classes=3",
                               f"training.batch_size={batch}", "training.ema=0.9", "model.dropout=0.0"])
    cfg["sfd"].update({"forget": [0], "override": 1, **sfd})
    teacher = GaussianClassScore(MEANS, 0.3)
    with torch.no_grad():  # fake score and generator differ from the teacher, so that the SiD loss is not 0
        fake, gen = copy.deepcopy(teacher), copy.deepcopy(teacher)
        fake.means.add_(0.3)
        gen.log_var.add_(0.2)
    return SFD(cfg, Dist(), networks=(teacher, fake, gen))


def guided_by_hand(net, x_t, t, label, w):
    """(1 + w) net(x, c) - w net(x, null) from two explicit calls (no batching with the null pass)."""
    out_c = net(x_t, t, label)
    if w == 0:
        return out_c
    return (1 + w) * out_c - w * net(x_t, t, torch.full_like(label, NULL))


def close(a, b):
    return torch.allclose(a, b, rtol=RTOL, atol=ATOL)


def far(a, b):
    return not torch.allclose(a, b, rtol=1e3 * RTOL, atol=1e3 * ATOL)


class Spy:
    """Wraps a function of the sfd module: records its arguments and result (and runs ``check`` at call
    time, before the optimiser step changes the networks)."""

    def __init__(self, monkeypatch, name, check=None):
        self.fn, self.calls, self.check = getattr(sfd_module, name), [], check
        monkeypatch.setattr(sfd_module, name, self)

    def __call__(self, *args, **kwargs):
        result = self.fn(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        if self.check:
            self.check(*args, **kwargs, result=result)
        return result


def spy_sid(monkeypatch):
    """Record sid_loss's (x_g, f_teacher, f_fake) as the generator loss passes them."""
    import sfd_ddpm.losses as losses
    seen = []
    real = losses.sid_loss

    def recording(x_g, f_teacher, f_fake, alpha):
        seen.append((x_g.detach().clone(), f_teacher.detach().clone(), f_fake.detach().clone()))
        return real(x_g, f_teacher, f_fake, alpha)
    monkeypatch.setattr(losses, "sid_loss", recording)
    return seen


def theta_check(method, seen, expect):
    """A generator-loss check: recompute f_teacher and f_fake by hand from the call's inputs."""
    sched = method.schedule

    def check(teacher, fake, x_g, t, eps, label_teacher, label_fake, alpha, **kw):
        x_t = sched.add_noise(x_g, t, eps).detach()
        teacher_label = expect.get("teacher_label", label_teacher)
        with torch.no_grad():
            f_teacher = sched.x0_from(x_t, t, guided_by_hand(method.teacher_net, x_t, t, teacher_label,
                                                             expect["w_teacher"]))
            f_fake = sched.x0_from(x_t, t, guided_by_hand(method.fake_frozen.net, x_t, t, label_fake,
                                                          expect["w_fake"]))
            wrong_teacher = sched.x0_from(x_t, t, guided_by_hand(method.teacher_net, x_t, t, teacher_label,
                                                                 expect["w_teacher"] + 1))
        _, got_teacher, got_fake = seen[-1]
        expect.setdefault("results", []).append((close(got_teacher, f_teacher), close(got_fake, f_fake),
                                                 far(got_teacher, wrong_teacher),
                                                 close(kw["result"], sid_loss(x_g, f_teacher, f_fake, alpha))))
    return check


# ---- (a) the teacher's score in the generator loss is the guided combination ----------------------------
@pytest.mark.parametrize("batched", [True, False])
def test_teacher_score_in_the_generator_loss_is_guided(monkeypatch, batched):
    torch.manual_seed(0)
    method = make_sfd(batched=batched, guidance=W_TEACHER, guidance_fake_train=W_FAKE_TRAIN,
                      guidance_fake_eval=W_FAKE_EVAL)
    seen = spy_sid(monkeypatch)
    expect = {"w_teacher": W_TEACHER, "w_fake": W_FAKE_EVAL}
    Spy(monkeypatch, "generator_loss", theta_check(method, seen, expect))
    method.train_step(0)
    assert expect["results"] and all(all(r) for r in expect["results"]), expect["results"]


# ---- (b) w = 0: exactly today's losses ---------------------------------------------------------------
def test_unguided_losses_equal_the_plain_formula_bit_for_bit(monkeypatch):
    """Defaults (guidance 0, label_dropout 0.1 but inactive): phi and theta losses equal the pre-change
    formulas computed from direct network calls, exactly (same batch, same operations)."""
    torch.manual_seed(0)
    method = make_sfd()
    sched = method.schedule
    exact = []

    def phi_check(fake, x_g, label, t, eps, guidance=0.0, augment=None, result=None):
        x_t = sched.a(t).view(-1, 1, 1, 1) * x_g + sched.b(t).view(-1, 1, 1, 1) * eps
        with torch.no_grad():
            plain = (eps - method.fake_net(x_t, t, label)).square().flatten(1).sum(1)
        exact.append(torch.equal(result.detach(), plain) and label.lt(NULL).all().item())

    def theta_check_plain(teacher, fake, x_g, t, eps, label_teacher, label_fake, alpha, result=None, **kw):
        x_t = sched.add_noise(x_g, t, eps)
        with torch.no_grad():
            f_fake = sched.x0_from(x_t, t, method.fake_frozen.net(x_t, t, label_fake))
            f_teacher = sched.x0_from(x_t, t, method.teacher_net(x_t, t, label_teacher))
            exact.append(torch.equal(result.detach(), sid_loss(x_g, f_teacher, f_fake, alpha)))

    Spy(monkeypatch, "fake_score_loss", phi_check)
    Spy(monkeypatch, "generator_loss", theta_check_plain)
    for k in range(2):
        method.train_step(k)
    assert len(exact) == 4 and all(exact), exact


def test_unguided_runs_do_not_depend_on_label_dropout():
    """guidance 0: label_dropout draws nothing, so runs with 0.1 and 0.5 match bit for bit."""
    runs = []
    for p in (0.1, 0.5):
        torch.manual_seed(1)
        method = make_sfd(label_dropout=p)
        runs.append(([method.train_step(k) for k in range(2)], [q.detach().clone() for q in method.gen_net.parameters()]))
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("schedule,net", [(VPSchedule(), GaussianClassScore(MEANS, 0.3)),
                                          (EDMSchedule(), EDMGaussianClassDenoiser(MEANS, 0.3))])
def test_denoising_loss_guided_and_unguided(schedule, net):
    """VP and EDM: the fake-score loss at w = 0 is today's exactly; at w it uses the guided output."""
    torch.manual_seed(2)
    fake = Denoiser(net, schedule, NULL)
    x_g, eps, label = torch.randn(6, 2, 1, 1), torch.randn(6, 2, 1, 1), torch.randint(0, 3, (6,))
    t = torch.randint(38, 712, (6,)) if isinstance(schedule, VPSchedule) else schedule.sample_range(6, 0, 800, "cpu")
    x_t = schedule.add_noise(x_g, t, eps)

    def by_hand(w):
        out = guided_by_hand(net, x_t, t, label, w)
        if isinstance(schedule, VPSchedule):
            return (eps - out).square().flatten(1).sum(1)
        return schedule.loss_weight(t) * (out - x_g).square().flatten(1).sum(1)
    with torch.no_grad():
        assert torch.equal(fake_score_loss(fake, x_g, label, t, eps), by_hand(0))
        guided = fake_score_loss(fake, x_g, label, t, eps, 2.0)
        assert close(guided, by_hand(2.0)) and far(guided, by_hand(3.0)) and far(guided, by_hand(0))


# ---- (c) each fake-score scale reaches its own place ----------------------------------------------------
def test_guidance_fake_train_scales_the_fake_score_loss(monkeypatch):
    torch.manual_seed(0)
    method = make_sfd(guidance=W_TEACHER, guidance_fake_train=W_FAKE_TRAIN, guidance_fake_eval=W_FAKE_EVAL,
                      label_dropout=0.0)
    sched, results = method.schedule, []

    def check(fake, x_g, label, t, eps, guidance=0.0, augment=None, result=None):
        x_t = sched.add_noise(x_g, t, eps)
        with torch.no_grad():
            want = (eps - guided_by_hand(method.fake_net, x_t, t, label, W_FAKE_TRAIN)).square().flatten(1).sum(1)
            others = [(eps - guided_by_hand(method.fake_net, x_t, t, label, w)).square().flatten(1).sum(1)
                      for w in (0.0, W_TEACHER, W_FAKE_EVAL)]
        results.append(close(result, want) and all(far(result, o) for o in others))
    Spy(monkeypatch, "fake_score_loss", check)
    method.train_step(0)
    assert results == [True]


def test_guidance_fake_eval_scales_the_fake_score_in_the_generator_loss(monkeypatch):
    torch.manual_seed(0)
    method = make_sfd(guidance=W_TEACHER, guidance_fake_train=W_FAKE_TRAIN, guidance_fake_eval=W_FAKE_EVAL)
    seen = spy_sid(monkeypatch)
    Spy(monkeypatch, "generator_loss")
    method.train_step(0)
    (x_g, _, got_fake), = seen
    (args, kwargs, _), = sfd_module.generator_loss.calls
    t, eps, label_fake = args[3], args[4], args[6]
    x_t = method.schedule.add_noise(x_g, t, eps)
    net = method.fake_frozen.net
    with torch.no_grad():  # the fake score changed in the phi step before; f_fake is evaluated after it
        hand = {w: method.schedule.x0_from(x_t, t, guided_by_hand(net, x_t, t, label_fake, w))
                for w in (W_FAKE_EVAL, W_FAKE_TRAIN, W_TEACHER, 0.0)}
    assert close(got_fake, hand[W_FAKE_EVAL])
    assert all(far(got_fake, hand[w]) for w in (W_FAKE_TRAIN, W_TEACHER, 0.0))


def test_fake_scales_default_to_the_teacher_scale_and_are_recorded():
    method = make_sfd(guidance=2.0)
    s = method.cfg["sfd"]
    assert (s["guidance"], s["guidance_fake_train"], s["guidance_fake_eval"]) == (2.0, 2.0, 2.0)
    assert (method.guidance.teacher, method.guidance.fake_train, method.guidance.fake_eval) == (2.0, 2.0, 2.0)
    method = make_sfd(guidance=2.0, guidance_fake_train=0, guidance_fake_eval=1)
    assert (method.guidance.fake_train, method.guidance.fake_eval) == (0.0, 1.0)


# ---- (d) label dropout --------------------------------------------------------------------------------
@pytest.mark.parametrize("scales,p,share", [
    ({"guidance": 2.0}, 0.25, 0.25),                                                   # fake guided (defaults)
    ({"guidance": 0.0, "guidance_fake_train": 1.0}, 0.25, 0.25),                       # kappa1 alone
    ({"guidance": 0.0, "guidance_fake_eval": 1.0}, 0.25, 0.25),                        # kappa2 alone
    ({"guidance": 2.0, "guidance_fake_train": 0.0, "guidance_fake_eval": 0.0}, 0.25, 0.0),  # teacher only
    ({"guidance": 0.0}, 0.25, 0.0),                                                    # unguided
    ({"guidance": 2.0}, 0.0, 0.0),                                                     # dropout off
])
def test_label_dropout_replaces_fake_training_labels_by_null(monkeypatch, scales, p, share):
    torch.manual_seed(0)
    n = 2000
    method = make_sfd(batch=n, label_dropout=p, **scales)
    gen_labels = []
    real_generate = method._generate
    method._generate = lambda terms: (gen_labels.append(torch.cat([d["label"] for d in terms])), real_generate(terms))[1]
    Spy(monkeypatch, "fake_score_loss")
    Spy(monkeypatch, "generator_loss")
    method.train_step(0)
    (args, _, _), = sfd_module.fake_score_loss.calls
    label = args[2]
    for part, classes in ((label[:n], {1, 2}), (label[n:], {0})):  # remain, forget term
        null = part.eq(NULL).float().mean().item()
        assert abs(null - share) < 0.04, (null, share)
        assert set(part[part.ne(NULL)].tolist()) == classes
    assert torch.equal(gen_labels[0], label)  # dropped samples are generated at the null class too
    (targs, _, _), = sfd_module.generator_loss.calls
    assert targs[6].lt(NULL).all() and gen_labels[1].lt(NULL).all()  # the theta step never drops


# ---- (e) the forget term's teacher: override label, guided ----------------------------------------------
def test_forget_term_teacher_is_guided_at_the_override(monkeypatch):
    torch.manual_seed(0)
    n = 8
    method = make_sfd(batch=n, guidance=W_TEACHER, guidance_fake_eval=W_FAKE_EVAL)
    seen = spy_sid(monkeypatch)
    Spy(monkeypatch, "generator_loss")
    method.train_step(0)
    (args, _, _), = sfd_module.generator_loss.calls
    x_g, t, eps, label_teacher, label_fake = args[2], args[3], args[4], args[5], args[6]
    assert label_fake[n:].eq(0).all() and label_teacher[n:].eq(1).all()  # forget half: c_f for phi, c_o for psi
    x_t = method.schedule.add_noise(x_g, t, eps)[n:]
    with torch.no_grad():
        hand = {w: method.schedule.x0_from(x_t, t[n:], guided_by_hand(method.teacher_net, x_t, t[n:],
                                                                      torch.ones(n, dtype=torch.long), w))
                for w in (W_TEACHER, W_TEACHER + 1, 0.0)}
        at_forget = method.schedule.x0_from(x_t, t[n:], guided_by_hand(method.teacher_net, x_t, t[n:],
                                                                       torch.zeros(n, dtype=torch.long), W_TEACHER))
    got = seen[0][1][n:]
    assert close(got, hand[W_TEACHER]) and far(got, hand[W_TEACHER + 1]) and far(got, hand[0.0])
    assert far(got, at_forget)


def test_classifier_pseudo_labels_reach_the_guided_teacher(monkeypatch):
    """override=classifier: the teacher is guided at the pseudo-label (here always class 2)."""
    torch.manual_seed(0)
    n = 8
    method = make_sfd(batch=n, guidance=W_TEACHER)
    method.spec = ForgetSpec([0], [1, 2], "classifier", classifier_mode="argmax",
                             classifier=lambda x: torch.tensor([[9.0, 1.0, 5.0]]).repeat(x.shape[0], 1))
    seen = spy_sid(monkeypatch)
    Spy(monkeypatch, "generator_loss")
    method.train_step(0)
    (args, _, _), = sfd_module.generator_loss.calls
    x_g, t, eps, label_fake = args[2], args[3], args[4], args[6]
    teacher_label = torch.cat([label_fake[:n], torch.full((n,), 2)])
    x_t = method.schedule.add_noise(x_g, t, eps)
    with torch.no_grad():
        hand = method.schedule.x0_from(x_t, t, guided_by_hand(method.teacher_net, x_t, t, teacher_label, W_TEACHER))
        plain = method.schedule.x0_from(x_t, t, guided_by_hand(method.teacher_net, x_t, t, teacher_label, 0.0))
    assert callable(args[5])
    assert close(seen[0][1], hand) and far(seen[0][1][n:], plain[n:])


# ---- refusals and the shipped config ------------------------------------------------------------------
class NoNull(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    null_label = None

    def forward(self, x, t, label):
        return self.inner(x, t, label)


@pytest.mark.parametrize("key", ["guidance", "guidance_fake_train", "guidance_fake_eval"])
def test_guidance_is_refused_without_a_null_class(key):
    cfg = C.load_config(None, ["method=sfd", "data.channels=2", "data.image_size=1", "data.n_classes=3"])
    cfg["sfd"].update({"forget": [0], "override": 1, key: 1.0})
    net = NoNull(GaussianClassScore(MEANS, 0.3))
    with pytest.raises(NoGuidance, match=f"sfd.{key}=1.0: this network has no null class"):
        SFD(cfg, Dist(), networks=(net, copy.deepcopy(net), copy.deepcopy(net)))
    cfg["sfd"][key] = 0.0
    SFD(cfg, Dist(), networks=(net, copy.deepcopy(net), copy.deepcopy(net)))  # unguided: fine


@pytest.mark.parametrize("key,value,message", [("guidance", -1.0, "must be >= 0"),
                                               ("guidance_fake_eval", "two", "must be a number"),
                                               ("label_dropout", 1.0, r"must lie in \[0, 1\)")])
def test_bad_guidance_settings_are_refused(key, value, message):
    with pytest.raises(ValueError, match=message):
        make_sfd(**{key: value})


def test_guided_config_runs_and_records_the_resolved_scales(tiny_teacher, tmp_path):
    run_script("train.py", "--config", "configs/builtin_sfd_guided.yaml", "--outdir", tmp_path, *TINY,
               f"sfd.init={tiny_teacher}", "training.n_iters=2")
    (run,) = tmp_path.iterdir()
    s = json.loads((run / "config.json").read_text())["sfd"]
    assert s["guidance"] == 2.0 and s["guidance_fake_train"] == 2.0 and s["guidance_fake_eval"] == 2.0
    assert s["label_dropout"] == 0.1


@pytest.mark.parametrize("k", [1, 3])
def test_fake_updates_steps_the_fake_score_k_times_per_generator_step(k):
    """sfd.fake_updates = k: k Adam steps of the fake score, each on its own fresh samples, then one of the
    generator (1: the paper's alternation)."""
    torch.manual_seed(0)
    method = make_sfd(fake_updates=k)
    drawn = []
    phi_terms = method._phi_terms
    method._phi_terms = lambda terms: drawn.append(terms[0]["z"]) or phi_terms(terms)
    for step in range(2):
        method.train_step(step)
    steps = lambda opt: {int(st["step"]) for st in opt.state.values()}
    assert steps(method.opt_phi) == {2 * k} and steps(method.opt_theta) == {2}
    assert len(drawn) == 2 * k and all(not torch.equal(drawn[0], z) for z in drawn[1:])
