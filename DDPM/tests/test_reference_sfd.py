"""An independent reference for one whole SFD iteration, written from docs/method.md section 3 in plain torch
(it calls none of the package's losses, samplers or schedule), compared with the gradients the two
Adam optimisers actually receive. Small networks that depend on x, t and the label, with different
weights for teacher, fake score and generator (identical ones would make the generator loss vanish).
Plus: t stays in [t_min, t_max) (and in the warm-up range while warming up), the EMA moves towards
the generator by exactly (1 - decay) of the gap, and the real train.py SFD path opens no dataset."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import TINY, run_script
from sfd_ddpm import config as C
from sfd_ddpm.distributed import Dist
from sfd_ddpm.methods.common import unwrap
from sfd_ddpm.methods.sfd import SFD

N_CLASSES, CH, RES, BATCH = 3, 2, 4, 6


class TinyEps(nn.Module):
    """eps(x, t, c): two convolutions with a class and a timestep embedding in between."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.null_label = N_CLASSES
        self.conv1, self.conv2 = nn.Conv2d(CH, 8, 3, padding=1), nn.Conv2d(8, CH, 3, padding=1)
        self.emb_c, self.emb_t = nn.Embedding(N_CLASSES + 1, 8), nn.Linear(1, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x, t, label):
        h = self.conv1(x) + self.emb_c(label)[:, :, None, None] + self.emb_t(t.float()[:, None] / 1000)[:, :, None, None]
        return self.conv2(torch.tanh(h))


# ---- the reference, from docs/method.md sections 2 and 3 only -----------------------------------------------------
BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ABAR = torch.cumprod(1 - BETAS, 0)
A, B = ABAR.sqrt().float(), (1 - ABAR).sqrt().float()


def col(v):
    return v.view(-1, 1, 1, 1)


def ref_generate(gen, z, c, t_star):
    """G_theta(z, c) = (x_init - b* eps_theta(x_init, t*, c)) / a*, x_init = b* z."""
    x_init = B[t_star] * z
    return (x_init - B[t_star] * gen(x_init, torch.full((len(z),), t_star), c)) / A[t_star]


def ref_denoise(net, x_t, t, c):
    return (x_t - col(B[t]) * net(x_t, t, c)) / col(A[t])


def ref_phi_loss(fake, gen, d, t_star):
    with torch.no_grad():
        x_g = ref_generate(gen, d["z"], d["label"], t_star)
    x_t = col(A[d["t"]]) * x_g + col(B[d["t"]]) * d["eps"]
    return (d["eps"] - fake(x_t, d["t"], d["label"])).square().sum((1, 2, 3)).mean()


def ref_theta_loss(teacher, fake, gen, d, t_star, alpha):
    x_g = ref_generate(gen, d["z"], d["label"], t_star)
    x_t = col(A[d["t"]]) * x_g + col(B[d["t"]]) * d["eps"]
    c_teacher = d["override"] if d["forget"] else d["label"]
    f_psi = ref_denoise(teacher, x_t, d["t"], c_teacher)
    f_phi = ref_denoise(fake, x_t, d["t"], d["label"])
    omega = (f_psi - x_g).abs().mean((1, 2, 3)).clamp_min(1e-5).detach()
    per_sample = ((f_psi - f_phi) * ((f_psi - x_g) - alpha * (f_psi - f_phi))).sum((1, 2, 3)) / omega
    return per_sample.mean()


def ref_grads(loss_fn, draws, weights, net, clip):
    """Gradients of sum_k lambda_k L(term_k) w.r.t. ``net``, element-wise clipped at ``clip`` (0 = off)."""
    total = sum(w * loss_fn(d) for w, d in zip(weights, draws))
    grads = torch.autograd.grad(total, list(net.parameters()))
    return [g.clamp(-clip, clip) if clip > 0 else g for g in grads]


# ---- the package, observed -------------------------------------------------------------------------
def make_sfd(**sfd):
    cfg = C.load_config(None, ["method=sfd", f"data.channels={CH}", f"data.image_size={RES}",
                               f"data.n_classes={N_CLASSES}", f"training.batch_size={BATCH}", "training.n_iters=4",
                               "training.ema=0.9"])
    cfg["sfd"].update({"forget": [0], "override": 1, **sfd})
    return SFD(cfg, Dist(), networks=(TinyEps(1), TinyEps(2), TinyEps(3)))


def observe(method):
    """Record every term's draws and the gradients each optimiser receives at its step."""
    seen = {"draws": [], "phi": None, "theta": None, "fake_after_phi": None}
    real_draw = method._draw

    def draw(*args, **kwargs):
        d = real_draw(*args, **kwargs)
        seen["draws"].append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in d.items()})
        return d

    method._draw = draw
    for name, opt, net in (("phi", method.opt_phi, method.fake_net), ("theta", method.opt_theta, method.gen_net)):
        real_step = opt.step

        def step(*a, _real=real_step, _name=name, _net=net, **k):
            seen[_name] = [p.grad.clone() for p in _net.parameters()]
            out = _real(*a, **k)
            if _name == "phi":
                seen["fake_after_phi"] = copy.deepcopy(unwrap(method.fake_net))
            return out

        opt.step = step
    return seen


CASES = {  # alpha, clip, warm-up fraction, weights (phi_r, phi_f, theta_r, theta_f), batched
    "alpha1.2-defaults": (1.2, 0.0, 0.0, (1.0, 0.01, 1.0, 0.01), True),
    "alpha1-warmup": (1.0, 0.0, 0.5, (1.0, 0.3, 0.7, 0.2), True),
    "alpha1.2-clip-warmup": (1.2, "active", 0.5, (1.0, 0.3, 0.7, 0.2), True),
    "alpha1-clip-separate": (1.0, "active", 0.0, (0.5, 2.0, 1.0, 3.0), False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_one_sfd_iteration_matches_the_reference(case):
    alpha, clip, warmup, (lpr, lpf, ltr, ltf), batched = CASES[case]
    torch.manual_seed(0)
    clip_value = 4.0 if clip == "active" else 0.0  # about the median |gradient| of both steps
    method = make_sfd(alpha=alpha, grad_clip_value=clip_value, forget_warmup=warmup, batched=batched,
                      lambda_phi_r=lpr, lambda_phi_f=lpf, lambda_theta_r=ltr, lambda_theta_f=ltf)
    t_star = method.cfg["sfd"]["t_init"]
    clipped_some = False
    for step in range(2):  # the second iteration starts from Adam-updated networks
        teacher, fake, gen = (copy.deepcopy(unwrap(n)) for n in (method.teacher_net, method.fake_net, method.gen_net))
        seen = observe(method)
        method.train_step(step)
        d_phi, d_theta = seen["draws"][:2], seen["draws"][2:]
        assert [d["forget"] for d in seen["draws"]] == [False, True, False, True]
        # phi step: DSM on stopped generator samples, remain at c and forget at c_f
        expected = ref_grads(lambda d: ref_phi_loss(fake, gen, d, t_star), d_phi, (lpr, lpf), fake, clip_value)
        for g_ref, g in zip(expected, seen["phi"], strict=True):
            assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item()), case
        # theta step against the fake score as updated by this iteration's phi step
        fake_now = seen["fake_after_phi"]
        expected = ref_grads(lambda d: ref_theta_loss(teacher, fake_now, gen, d, t_star, alpha), d_theta,
                             (ltr, ltf), gen, clip_value)
        for g_ref, g in zip(expected, seen["theta"], strict=True):
            assert torch.allclose(g, g_ref, rtol=1e-4, atol=1e-5 * g_ref.abs().max().item()), case
        if clip_value:
            raw = ref_grads(lambda d: ref_theta_loss(teacher, fake_now, gen, d, t_star, alpha), d_theta,
                            (ltr, ltf), gen, 0.0)
            flat = torch.cat([g.flatten().abs() for g in raw])
            clipped_some |= bool((flat > clip_value).any() and (flat < clip_value).any())
    assert clipped_some or not clip_value  # value clipping was active, on some elements only


def test_the_forget_term_really_counts():
    """The comparison above is sensitive to the forget term: dropping it changes the gradients."""
    torch.manual_seed(0)
    method = make_sfd(lambda_theta_f=0.01)
    t_star = method.cfg["sfd"]["t_init"]
    teacher, fake, gen = (copy.deepcopy(unwrap(n)) for n in (method.teacher_net, method.fake_net, method.gen_net))
    seen = observe(method)
    method.train_step(0)
    loss = lambda d: ref_theta_loss(teacher, seen["fake_after_phi"], gen, d, t_star, 1.2)  # noqa: E731
    with_forget = ref_grads(loss, seen["draws"][2:], (1.0, 0.01), gen, 0)
    without = ref_grads(loss, seen["draws"][2:3], (1.0,), gen, 0)
    rel = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(with_forget, without))
    assert rel > 1e-3  # far above the 1e-4 tolerance of the comparison


def test_timesteps_stay_in_their_ranges():
    """t ~ U{t_min..t_max-1} for every term; during the forget warm-up the forget terms use the
    warm-up range and the remain terms keep theirs; every value of each range occurs."""
    torch.manual_seed(0)
    method = make_sfd(t_min=500, t_max=503, forget_warmup=0.5, warmup_t_min=100, warmup_t_max=103)
    assert method.warmup_iters == 2
    seen = observe(method)
    by_phase = {}
    for step in range(4):
        start = len(seen["draws"])
        method.train_step(step)
        for d in seen["draws"][start:]:
            key = ("warm" if step < 2 else "after", "forget" if d["forget"] else "remain")
            by_phase.setdefault(key, set()).update(d["t"].tolist())
    assert by_phase[("warm", "remain")] == by_phase[("after", "remain")] == {500, 501, 502}
    assert by_phase[("after", "forget")] == {500, 501, 502}
    assert by_phase[("warm", "forget")] == {100, 101, 102}


def test_default_timestep_range_is_the_papers():
    torch.manual_seed(0)
    method = make_sfd()
    seen = observe(method)
    for step in range(30):
        method.train_step(step)
    t = torch.cat([d["t"] for d in seen["draws"]])
    assert t.min() >= 38 and t.max() <= 711 and t.min() < 80 and t.max() > 670


@pytest.mark.parametrize("rampup", [False, True])
def test_ema_moves_towards_the_generator_by_one_minus_decay(rampup):
    torch.manual_seed(0)
    method = make_sfd(lr_theta=1e-2)
    method.cfg["training"]["ema_rampup"] = rampup
    for step in range(3):
        before = [p.clone() for p in method.gen_ema.parameters()]
        method.train_step(step)
        decay = min(0.9, (1 + step) / (10 + step)) if rampup else 0.9
        after_gen = list(unwrap(method.gen_net).parameters())
        moved = 0.0
        for e0, e1, g in zip(before, method.gen_ema.parameters(), after_gen, strict=True):
            assert torch.allclose(e1, decay * e0 + (1 - decay) * g, atol=1e-7)
            moved = max(moved, (g - e0).abs().max().item())
        assert moved > 1e-4  # the generator did move, so the check above has something to see


@pytest.mark.subprocess
def test_train_py_sfd_opens_no_dataset(tmp_path, tiny_teacher):
    """The real entry point, with every dataset loader replaced by a function that fails."""
    out = tmp_path / "runs"
    proc = run_script("tests/no_dataset_train.py", "--config", "configs/builtin_sfd.yaml", "--outdir", out, *TINY,
                      f"sfd.init={tiny_teacher}", "training.n_iters=2", check=False)
    assert proc.returncode == 0, proc.stderr
    (run,) = out.iterdir()
    assert (run / "network-0000002.safetensors").exists()
    # and the guard works: a pretraining run, which needs images, is stopped by it
    proc = run_script("tests/no_dataset_train.py", "--config", "configs/builtin_train.yaml", "--outdir",
                      tmp_path / "pre", *TINY, "training.n_iters=1", check=False)
    assert proc.returncode != 0 and "opened a dataset" in proc.stderr
