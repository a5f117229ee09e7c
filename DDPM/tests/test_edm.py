"""The EDM backbone: SongUNet layout, preconditioning, the EDM loss and sampler against hand computations
and a Gaussian whose denoiser is known in closed form."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sfd_ddpm import config as C
from sfd_ddpm.diffusion import Denoiser, NoGuidance, schedule_of
from sfd_ddpm.edm import EDMSchedule
from sfd_ddpm.networks import build_network, count_parameters
from sfd_ddpm.networks_edm import EDMNetwork, SongUNet
from sfd_ddpm.samplers import image_seed, nfe, sample

CIFAR_EDM = ["model.arch=songunet", "model.base_channels=128", "model.channel_mult=[2,2,2]", "model.layers_per_block=4",
             "model.attn_resolutions=[16]", "model.dropout=0.13", "model.augment_dim=9", "model.null_class=false"]
TINY_EDM = ["model.arch=songunet", "model.base_channels=16", "model.channel_mult=[1,2]", "model.layers_per_block=1",
            "model.attn_resolutions=[8]", "model.dropout=0.0", "data.image_size=16"]


class GaussianDenoiser(torch.nn.Module):
    """Exact D(x; sigma) for data x0 ~ N(mu, s^2) per pixel: D = (s^2 x + sigma^2 mu) / (s^2 + sigma^2).
    Counts its evaluations (images passed through it)."""

    def __init__(self, mu=0.5, s=0.2):
        super().__init__()
        self.mu, self.s, self.calls = mu, s, 0
        self.null_label = 10

    def forward(self, x, sigma, label):
        self.calls += 1
        sig2 = sigma.view(-1, 1, 1, 1) ** 2
        return (self.s ** 2 * x + sig2 * self.mu) / (self.s ** 2 + sig2)


def test_songunet_cifar10_layout_matches_nvidia_networks():
    """DDPM++ CIFAR-10 (EDM, Table 7): ~56M parameters, NVIDIA's key names and shapes."""
    net = build_network(C.load_config(None, CIFAR_EDM))
    assert 55.5e6 < count_parameters(net) < 56.0e6
    sd = net.state_dict()
    expect = {
        "model.map_label.weight": (128, 10), "model.map_augment.weight": (128, 9), "model.map_layer0.weight": (512, 128),
        "model.map_layer1.weight": (512, 512), "model.enc.32x32_conv.weight": (128, 3, 3, 3),
        "model.enc.32x32_block0.conv0.weight": (256, 128, 3, 3), "model.enc.32x32_block0.skip.weight": (256, 128, 1, 1),
        "model.enc.32x32_block0.affine.weight": (256, 512), "model.enc.16x16_down.conv0.resample_filter": (1, 1, 2, 2),
        "model.enc.16x16_block0.qkv.weight": (768, 256, 1, 1), "model.enc.16x16_block3.proj.weight": (256, 256, 1, 1),
        "model.dec.8x8_in0.norm2.weight": (256,), "model.dec.8x8_in1.conv1.weight": (256, 256, 3, 3),
        "model.dec.16x16_up.skip.weight": (256, 256, 1, 1), "model.dec.16x16_block4.qkv.weight": (768, 256, 1, 1),
        "model.dec.32x32_block0.conv0.weight": (256, 512, 3, 3), "model.dec.32x32_aux_norm.weight": (256,),
        "model.dec.32x32_aux_conv.weight": (3, 256, 3, 3),
    }
    for key, shape in expect.items():
        assert tuple(sd[key].shape) == shape, key
    assert "model.map_augment.bias" not in sd and "model.dec.16x16_block3.qkv.weight" not in sd
    assert not any(k.startswith("model.map_noise") for k in sd)
    assert len([k for k in sd if k.startswith("model.enc.")]) and sum(1 for k in sd if "resample_filter" in k) == 8
    assert torch.allclose(sd["model.enc.16x16_down.conv0.resample_filter"], torch.full((1, 1, 2, 2), 0.25))


class Probe(torch.nn.Module):
    """A stand-in SongUNet that records its inputs and returns a fixed F."""
    label_dim, augment_dim = 3, 0

    def __init__(self, F_x):
        super().__init__()
        self.F_x = F_x

    def forward(self, x, c_noise, class_vector=None, augment_vector=None):
        self.seen = (x, c_noise, class_vector)
        return self.F_x


@pytest.mark.parametrize("precond", ["vp", "edm"])
def test_preconditioning_against_hand_computation(precond):
    torch.manual_seed(0)
    x, F_x = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    sigma = torch.tensor([0.3, 7.0])
    net = EDMNetwork(Probe(F_x), n_classes=3, precond=precond, sigma_data=0.5, null_class=True)
    D = net(x, sigma, torch.tensor([2, 3]))
    for i, s in enumerate(sigma.tolist()):
        if precond == "vp":  # beta_d 19.9, beta_min 0.1, M 1000
            t = (math.sqrt(0.1 ** 2 + 2 * 19.9 * math.log(1 + s * s)) - 0.1) / 19.9
            c_skip, c_out, c_in, c_noise = 1.0, -s, 1 / math.sqrt(1 + s * s), 999 * t
        else:
            c_skip, c_out = 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25)
            c_in, c_noise = 1 / math.sqrt(s * s + 0.25), math.log(s) / 4
        x_in, noise, vec = net.model.seen
        assert torch.allclose(x_in[i], c_in * x[i], atol=1e-6)
        assert noise[i].item() == pytest.approx(c_noise, rel=1e-5)
        assert torch.allclose(D[i], c_skip * x[i] + c_out * F_x[i], atol=1e-5)
    # class 2 -> one-hot, the null class 3 -> the all-zero vector (EDM's dropped label)
    assert vec.tolist() == [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]


def test_edm_loss_against_hand_computation():
    sched = EDMSchedule()
    net = GaussianDenoiser()
    den = Denoiser(net, sched, None)
    x0, eps = torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    loss = den.loss(x0, torch.zeros(3, dtype=torch.long), sigma, eps)
    for i, s in enumerate(sigma.tolist()):
        x = x0[i] + s * eps[i]
        D = (0.04 * x + s * s * 0.5) / (0.04 + s * s)
        weight = (s * s + 0.25) / (s * 0.5) ** 2
        assert loss[i].item() == pytest.approx(weight * (D - x0[i]).square().sum().item(), rel=1e-5)


def test_pretraining_sigma_distribution():
    torch.manual_seed(0)
    sigma = EDMSchedule().sample_train(200_000, "cpu")
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert sigma.log().std().item() == pytest.approx(1.2, abs=0.01)


def test_rho_schedule_and_sampler_grid():
    sched = EDMSchedule()
    grid = sched.sampler_sigmas(18)
    assert len(grid) == 19 and grid[-1] == 0.0
    assert grid[0] == pytest.approx(80.0) and grid[-2] == pytest.approx(0.002)
    i = 7  # eq. 5 of Karras et al. by hand
    hand = (80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert grid[i] == pytest.approx(hand, rel=1e-9)
    assert all(a > b for a, b in zip(grid, grid[1:]))
    # SiD's distillation levels: u = t / 1000 in [0, 0.8) -> sigma in [0.002, ~24.4)
    torch.manual_seed(0)
    s = sched.sample_range(20000, 0, 800, "cpu")
    assert s.min() >= 0.002 - 1e-6 and s.max() < 24.5 and s.max() > 20
    assert sched.rho_sigma(torch.tensor(0.8)).item() == pytest.approx(24.4, abs=0.1)


def heun_factor(s: float, steps: int, heun: bool = True) -> float:
    """The factor by which N steps of Heun (or Euler) on EDM's grid take x - mu from sigma_max to 0 for N(mu, s^2) data:
    a scalar recursion on dy/dsigma = y sigma / (s^2 + sigma^2), written out by hand."""
    r, lo, hi = 7, 0.002 ** (1 / 7), 80 ** (1 / 7)
    grid = [(hi + i / (steps - 1) * (lo - hi)) ** r for i in range(steps)] + [0.0]
    y = 1.0
    for a, b in zip(grid, grid[1:]):
        d1 = y * a / (s * s + a * a)
        y1 = y + (b - a) * d1
        y = y + (b - a) * (d1 + y1 * b / (s * s + b * b)) / 2 if (b > 0 and heun) else y1
    return y


@pytest.mark.parametrize("steps", [18, 100])
def test_heun_sampler_reproduces_the_gaussian(steps):
    """With the exact denoiser the sampler follows the probability-flow ODE, whose solution is known:
    x(0) = mu + (x(sigma_max) - mu) s / sqrt(s^2 + sigma_max^2). The mean is reproduced exactly; the
    variance up to the discretisation error of the step count: 18 steps (35 evaluations) over-disperse
    a Gaussian by ~5.5% in std (computed by hand below; Euler on the same grid is ~15% short), 100 steps
    by 0.15%. Every sample lands where the hand-computed Heun recursion puts it."""
    s, mu = 0.5, 0.5
    net = GaussianDenoiser(mu=mu, s=s)
    den = Denoiser(net, EDMSchedule(), 10)
    n = 400
    labels = torch.zeros(n, dtype=torch.long)
    seeds = [image_seed(3, 0, i) for i in range(n)]
    x = sample(den, "edm", labels, seeds, (1, 4, 4), steps=steps)
    assert net.calls == 2 * steps - 1 == nfe("edm", steps, 0.0)  # 18 steps: 35
    from sfd_ddpm.samplers import NoiseStreams
    z = NoiseStreams(seeds, (1, 4, 4), "cpu").randn()
    factor = heun_factor(s, steps)  # the exact ODE has s / sqrt(s^2 + 80^2)
    assert torch.allclose(x, mu + (80 * z - mu) * factor, atol=2e-4)
    assert abs(factor / heun_factor(s, steps, heun=False) - 1) > 0.02  # Euler would fail the line above
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.07 if steps == 18 else 0.01)


def test_heun_sampler_is_per_seed_whatever_the_batch():
    den = Denoiser(GaussianDenoiser(), EDMSchedule(), 10)
    labels = torch.zeros(6, dtype=torch.long)
    seeds = [image_seed(7, 0, i) for i in range(6)]
    full = sample(den, "edm", labels, seeds, (1, 3, 3), steps=5)
    parts = torch.cat([sample(den, "edm", labels[k:k + 3], seeds[k:k + 3], (1, 3, 3), steps=5) for k in (0, 3)])
    assert torch.allclose(full, parts, atol=1e-6)


def test_guidance_needs_a_null_class():
    cfg = C.load_config(None, TINY_EDM + ["model.null_class=false"])
    net = build_network(cfg).eval()
    den = Denoiser(net, schedule_of(cfg), net.null_label)
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(NoGuidance, match="no null class"):
        sample(den, "edm", labels, [0, 1], (3, 16, 16), steps=2, guidance=1.0)
    sample(den, "edm", labels, [0, 1], (3, 16, 16), steps=2)  # unguided works
    with pytest.raises(ValueError, match="does not fit"):
        sample(den, "ddim", labels, [0, 1], (3, 16, 16), steps=2)


def test_guided_edm_sampling_combines_conditional_and_null_passes():
    cfg = C.load_config(None, TINY_EDM)
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    for p in net.parameters():  # non-trivial weights: the label must matter
        p.data.normal_(0, 0.3)
    den = Denoiser(net, schedule_of(cfg), net.null_label)
    x, s, c = torch.randn(2, 3, 16, 16), torch.tensor([1.5, 1.5]), torch.tensor([4, 7])
    null = torch.full_like(c, 10)
    with torch.no_grad():
        guided = den(x, s, c, guidance=2.0)
        hand = 3 * net(x, s, c) - 2 * net(x, s, null)
    assert torch.allclose(guided, hand, atol=1e-5) and not torch.allclose(guided, net(x, s, c), atol=1e-3)


def test_with_architecture_returns_a_new_config():
    cfg = C.load_config(None, ["method=sfd"])
    arch = C.load_config(None, TINY_EDM + ["edm.precond=edm"])
    del arch["edm"]["rho"]  # a checkpoint older than a key takes its default
    new = C.with_architecture(cfg, arch)
    assert new["model"]["arch"] == "songunet" and new["edm"]["precond"] == "edm" and new["edm"]["rho"] == 7.0
    assert new["data"]["image_size"] == 16 and cfg["model"]["arch"] == "unet2d" and cfg["data"]["image_size"] == 32


# ---------------------------------------------------------------------------------------------
# SiD / SFD in sigma space (docs/method.md section 4)

def test_edm_generator_loss_and_gradient_against_hand_computation():
    """x_g = theta z, x_t = x_g + sigma n, affine teacher/fake denoisers D(x) = a x + b (Gaussian data):
    L = sum (f_psi - f_phi)((f_psi - x_g) - alpha (f_psi - f_phi)) / omega, omega detached, and
    dL/dtheta = sum [u' v + u v'] / omega with u = f_psi - f_phi, v = f_psi - x_g - alpha u."""
    from analytic import EDMGaussianClassDenoiser
    from sfd_ddpm.losses import generator_loss
    torch.manual_seed(0)
    sched, alpha = EDMSchedule(), 1.2
    # float64 throughout: at small sigma the loss is a small difference of products
    teacher = Denoiser(EDMGaussianClassDenoiser(torch.tensor([[1.0, -1.0]]), 0.4).double(), sched, None)
    fake = Denoiser(EDMGaussianClassDenoiser(torch.tensor([[0.3, 0.5]]), 0.7).double(), sched, None)
    theta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    z, n = torch.randn(5, 2, 1, 1, dtype=torch.float64), torch.randn(5, 2, 1, 1, dtype=torch.float64)
    sigma = sched.sample_range(5, 0, 800, "cpu").double()
    label = torch.zeros(5, dtype=torch.long)
    loss = generator_loss(teacher, fake, theta * z, sigma, n, label, label, alpha)
    loss.sum().backward()
    for i in range(5):
        s2 = sigma[i].item() ** 2
        a_p, a_f = 0.16 / (0.16 + s2), 0.49 / (0.49 + s2)
        b_p = s2 * torch.tensor([1.0, -1.0], dtype=torch.float64) / (0.16 + s2)
        b_f = s2 * torch.tensor([0.3, 0.5], dtype=torch.float64) / (0.49 + s2)
        xg, x = 0.8 * z[i].flatten(), 0.8 * z[i].flatten() + sigma[i].item() * n[i].flatten()
        f_p, f_f = a_p * x + b_p, a_f * x + b_f
        omega = (f_p - xg).abs().mean()
        u, v = f_p - f_f, (f_p - xg) - alpha * (f_p - f_f)
        assert loss[i].item() == pytest.approx((u * v).sum().item() / omega.item(), rel=1e-6)
        du, dv = (a_p - a_f) * z[i].flatten(), (a_p - 1) * z[i].flatten() - alpha * (a_p - a_f) * z[i].flatten()
        hand_grad = (du * v + u * dv).sum() / omega if i == 0 else hand_grad + (du * v + u * dv).sum() / omega
    assert theta.grad.item() == pytest.approx(hand_grad.item(), rel=1e-6)


def test_edm_fake_score_loss_is_edm_weighted_and_stops_the_generator():
    from analytic import EDMGaussianClassDenoiser
    from sfd_ddpm.losses import fake_score_loss
    sched = EDMSchedule()
    net = EDMGaussianClassDenoiser(torch.tensor([[0.3, 0.5]]), 0.7)
    x_g = torch.randn(4, 2, 1, 1, requires_grad=True)
    sigma, eps = sched.sample_train(4, "cpu"), torch.randn(4, 2, 1, 1)
    label = torch.zeros(4, dtype=torch.long)
    loss = fake_score_loss(Denoiser(net, sched, None), x_g, label, sigma, eps)
    w = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2
    hand = w * (net(x_g + sigma.view(-1, 1, 1, 1) * eps, sigma, label) - x_g).square().flatten(1).sum(1)
    assert torch.allclose(loss, hand, rtol=1e-5)
    loss.sum().backward()
    assert x_g.grad is None and net.means.grad is not None


def test_edm_one_step_generator_formula():
    from analytic import EDMGaussianClassDenoiser
    from sfd_ddpm.samplers import one_step
    net = EDMGaussianClassDenoiser(torch.tensor([[2.0, 0.0]]), 0.3)
    z = torch.randn(3, 2, 1, 1)
    x = one_step(Denoiser(net, EDMSchedule(), None), torch.zeros(3, dtype=torch.long), z, 2.5)
    assert torch.allclose(x, (0.09 * 2.5 * z + 6.25 * torch.tensor([2.0, 0.0]).view(1, 2, 1, 1)) / (0.09 + 6.25), atol=1e-6)


MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])


def edm_mixture_sfd(**sfd):
    from analytic import EDMGaussianClassDenoiser
    from sfd_ddpm.distributed import Dist
    from sfd_ddpm.methods.sfd import SFD
    import copy
    cfg = C.load_config(None, ["method=sfd", "model.arch=songunet", "data.channels=2", "data.image_size=1",
                               "data.n_classes=3", "training.batch_size=128", "training.ema=0.95",
                               "sfd.t_min=0", "sfd.t_max=800", "sfd.fake_score_levels=pretrain"])
    cfg["sfd"].update({"forget": [0], "override": 1, **sfd})
    teacher = EDMGaussianClassDenoiser(MEANS, 0.3)
    return SFD(cfg, Dist(), networks=(teacher, copy.deepcopy(teacher), copy.deepcopy(teacher)))


def test_edm_sfd_draws_sid_levels():
    """theta terms: sigma on the rho-schedule with u < 0.8; phi terms: log-normal (fake_score_levels=pretrain)."""
    torch.manual_seed(0)
    method = edm_mixture_sfd()
    assert isinstance(method.schedule, EDMSchedule) and method.t_init == 2.5
    theta = torch.cat([method._draw(False, False)["t"] for _ in range(40)])
    phi = torch.cat([method._draw(False, False, phi=True)["t"] for _ in range(40)])
    assert theta.max() < 24.5 and theta.min() >= 0.0019 and theta.dtype == torch.float32
    assert phi.log().mean().item() == pytest.approx(-1.2, abs=0.06) and phi.log().std().item() == pytest.approx(1.2, abs=0.06)


def test_edm_sfd_moves_the_forget_class_onto_the_override_component():
    """The DDPM tree's semantic test in sigma space: forget class 0 (N((2,0), 0.3^2)) into override 1
    (N((-2,0), 0.3^2)) while class 2 stays N((0,2), 0.3^2); exact EDM teacher, copies for phi and theta."""
    from sfd_ddpm.samplers import one_step
    torch.manual_seed(0)
    method = edm_mixture_sfd(lr_phi=3e-2, lr_theta=1e-2, lambda_phi_f=1.0, lambda_theta_f=1.0, alpha=1.2)
    for k in range(1500):
        method.train_step(k)
    z = torch.randn(2000, 2, 1, 1)
    gen = Denoiser(method.gen_ema, method.schedule, 3)
    with torch.no_grad():
        samples = {c: one_step(gen, torch.full((2000,), c), z, 2.5).flatten(1) for c in range(3)}
    for c, target in ((0, MEANS[1]), (1, MEANS[1]), (2, MEANS[2])):
        mean, std = samples[c].mean(0), samples[c].std(0)
        assert (mean - target).norm() < 0.15, (c, mean)
        assert (std > 0.22).all() and (std < 0.38).all(), (c, std)
    assert (samples[0] - MEANS[0]).norm(dim=1).lt(1.0).float().mean() < 0.02


# ---------------------------------------------------------------------------------------------
# Through the entry scripts

EDM_CLI = ["data.builtin_per_class=16", "data.num_workers=0", "model.base_channels=16", "model.channel_mult=[1,2]",
           "model.attn_resolutions=[8]", "training.batch_size=8", "training.log_every=1", "training.snapshot_every=2",
           "training.state_every=2", "training.n_iters=2", "grid.steps=2", "grid.per_class=1"]


@pytest.mark.slow  # ~40 s idle, longer on a shared machine
def test_edm_pretraining_and_sampling_through_the_scripts(tmp_path):
    import json

    from conftest import run_script
    from sfd_ddpm.checkpoints import read_metadata
    run_script("train.py", "--config", "configs/builtin_edm_train.yaml", "--outdir", tmp_path / "runs", *EDM_CLI)
    (run,) = (tmp_path / "runs").iterdir()
    meta = read_metadata(run / "network-0000002.safetensors")
    assert meta["config"]["model"]["arch"] == "songunet" and meta["config"]["edm"]["precond"] == "edm"
    out = tmp_path / "samples"
    run_script("sample.py", "--ckpt", run, "--out", out, "--classes", "0,1", "--per-class", "2", "--steps", "3",
               "--guidance", "1")
    settings = json.loads((out / "settings.json").read_text())
    assert settings["sampler"] == "edm" and settings["nfe_per_image"] == 10 and len(list(out.glob("*.png"))) == 4
    bad = run_script("sample.py", "--ckpt", run, "--out", tmp_path / "x", "--sampler", "ddim", check=False)
    assert bad.returncode != 0 and "does not fit" in bad.stderr
    # a network without a null class refuses guidance, before any sampling
    run_script("train.py", "--config", "configs/builtin_edm_train.yaml", "--outdir", tmp_path / "nonull", *EDM_CLI,
               "model.null_class=false", "training.label_dropout=0", "grid.guidance=0")
    (run2,) = (tmp_path / "nonull").iterdir()
    bad = run_script("sample.py", "--ckpt", run2, "--out", tmp_path / "y", "--guidance", "2", check=False)
    assert bad.returncode != 0 and "no null class" in bad.stderr and not (tmp_path / "y").exists()
    bad = run_script("train.py", "--config", "configs/builtin_edm_train.yaml", "--outdir", tmp_path / "z", *EDM_CLI,
                     "model.null_class=false", check=False)
    assert bad.returncode != 0 and "null class" in bad.stderr


@pytest.mark.slow  # ~1-2 min: an EDM teacher, SiD and SFD on the built-in dataset with a tiny budget
def test_edm_paper_table_rows_run_end_to_end(tmp_path):
    import os
    import subprocess
    import sys

    from conftest import TREE
    out = tmp_path / "paper"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "DATASET": "builtin", "OUT": str(out),
           "TEACHER_ARGS": " ".join([*EDM_CLI, "training.n_iters=2"]),
           "METHOD_ARGS": " ".join(["training.batch_size=4", "training.n_iters=2", "training.snapshot_every=2",
                                    "grid.per_class=1"]),
           "CLASSIFIER_ARGS": "--epochs 1 --builtin-per-class 60", "PER_CLASS": "2", "REF_PER_CLASS": "4",
           "EDM_STEPS": "2", "FID_FEATURES": "classifier"}
    for row in ("edm_teacher", "edm_sid", "edm_sfd"):
        proc = subprocess.run(["bash", f"scripts/{row}.sh"], cwd=TREE, env=env, text=True, capture_output=True,
                              timeout=900)
        assert proc.returncode == 0, f"scripts/{row}.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert (out / row / "ua.json").exists() and (out / row / "fid.json").exists()
    # run twice: the second time every stage is reused (no command runs, no file changes)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    for row in ("edm_teacher", "edm_sid", "edm_sfd"):
        proc = subprocess.run(["bash", f"scripts/{row}.sh"], cwd=TREE, env=env, text=True, capture_output=True,
                              timeout=900)
        assert proc.returncode == 0 and "\n+ " not in proc.stdout and "reuse" in proc.stdout, proc.stdout[-3000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    settings = json.loads((out / "edm_teacher" / "samples" / "settings.json").read_text())
    assert settings["sampler"] == "edm" and settings["nfe_per_image"] == 3
    agg = subprocess.run([sys.executable, "scripts/aggregate.py", "--out", out], cwd=TREE, text=True,
                         capture_output=True)
    assert agg.returncode == 0, agg.stderr
    table = (out / "table.md").read_text()
    assert "SFD one-step (EDM)" in table and "SiD one-step (EDM)" in table and "EDM teacher" in table


def test_discrete_timesteps_are_refused_with_a_message():
    """EDM has no integer timestep grid: code written for one (the DDPM/DDIM samplers) stops with a message,
    while SA's/VDU's Fisher and ESD's grid ask the schedule for its own levels (tests/test_backbones.py)."""
    with pytest.raises(ValueError, match="continuous noise levels sigma, not discrete DDPM timesteps"):
        EDMSchedule().num_timesteps
