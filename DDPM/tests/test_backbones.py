"""Every training method on both backbones (the DDPM UNet with its discrete VP timesteps, EDM's SongUNet with
continuous sigma), and the pieces that make SA, VDU and ESD speak each backbone's own noise levels: the
Fisher over the backbone's training distribution of levels, ESD's grid and its starting noise."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import TINY, TREE
from sfd_ddpm import config as C
from sfd_ddpm.checkpoints import save_weights
from sfd_ddpm.diffusion import Denoiser, VPSchedule, schedule_of
from sfd_ddpm.distributed import Dist
from sfd_ddpm.edm import EDMSchedule
from sfd_ddpm.fisher import diagonal_fisher
from sfd_ddpm.methods import METHODS, get_method
from sfd_ddpm.methods.esd import partial_ddim
from sfd_ddpm.networks import build_network
from test_edm import TINY_EDM

BACKBONES = {"unet2d": [], "songunet": TINY_EDM}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict:
    """A randomly initialised tiny teacher per backbone (an architecture to run against), with a Fisher file."""
    out = tmp_path_factory.mktemp("teachers")
    paths = {}
    for arch, extra in BACKBONES.items():
        cfg = C.load_config(TREE / "configs/builtin_train.yaml", [*TINY, *extra])
        torch.manual_seed(0)
        net = build_network(cfg)
        path = out / f"{arch}.safetensors"
        sd = net.state_dict()
        save_weights(path, {"ema": sd, "net": {n: v.clone() for n, v in sd.items()}}, cfg, 1, "ddpm")
        net.requires_grad_(True)
        fisher = diagonal_fisher(Denoiser(net, schedule_of(cfg), net.null_label), torch.rand(2, 3, 16, 16) * 2 - 1,
                                 torch.tensor([1, 2]), levels=2, generator=torch.Generator().manual_seed(0))
        save_file({n: f.contiguous() for n, f in fisher.items()}, str(out / f"{arch}_fisher.safetensors"))
        paths[arch] = (path, out / f"{arch}_fisher.safetensors")
    return paths


def _config(method: str, arch: str, teacher, fisher) -> dict:
    edm = arch == "songunet"
    tiny = [*TINY, *BACKBONES[arch], "training.batch_size=4"]
    if method in ("pretrain", "retrain"):
        return C.load_config(TREE / f"configs/builtin_{'train' if method == 'pretrain' else 'retrain'}.yaml", tiny)
    if method in ("sid", "sfd"):
        base = "builtin_edm_sfd.yaml" if edm else f"builtin_{method}.yaml"
        extra = ["method=sid", "sfd.forget=[]"] if method == "sid" else []
        return C.load_config(TREE / "configs" / base, [*tiny, f"sfd.init={teacher}", *extra])
    if method == "vdu":
        return C.load_config(TREE / "configs/builtin_vdu.yaml",
                             [*tiny, f"vdu.init={teacher}", "vdu.forget_subset=4", "vdu.fisher_samples=2",
                              "vdu.fisher_timesteps=2", "vdu.fisher_steps=2", "vdu.target_draws=1"])
    extra = {"sa": [f"baseline.sa_fisher={fisher}", "baseline.sa_replay_per_class=1", "baseline.sa_replay_steps=2"],
             "salun": ["baseline.salun_mask_batches=1"], "esd": ["baseline.esd_steps=3"]}[method]
    return C.load_config(TREE / f"configs/builtin_{method}.yaml", [*tiny, f"baseline.init={teacher}", *extra])


SLOW = {("sid", "songunet"), ("sfd", "songunet")}  # ~20 s each on a loaded machine; SiD/SFD on EDM also in test_edm


@pytest.mark.parametrize("method,arch", [pytest.param(m, a, marks=pytest.mark.slow) if (m, a) in SLOW else (m, a)
                                         for m in METHODS for a in BACKBONES])
def test_every_method_trains_on_both_backbones(method, arch, teachers):
    """A few iterations of each method from a tiny teacher of each backbone: finite losses, weights that move."""
    teacher, fisher = teachers[arch]
    cfg = _config(method, arch, teacher, fisher)
    torch.manual_seed(0)
    m = get_method(method)(cfg, Dist())
    assert isinstance(m.schedule, EDMSchedule if arch == "songunet" else VPSchedule)
    m.start(0)
    before = {k: {n: v.clone() for n, v in sd.items()} for k, sd in m.weights().items()}
    for step in range(2):
        logs = m.train_step(step)
        assert logs and all(math.isfinite(v) for v in logs.values()), logs
    after = m.weights()
    moved = [k for k in before if any(not torch.equal(before[k][n], after[k][n]) for n in before[k])]
    assert moved, f"{method} on {arch}: no network changed"


def test_methods_are_listed_once():
    assert sorted(METHODS) == sorted(["pretrain", "sid", "sfd", "retrain", "salun", "sa", "esd", "vdu"])


# -- the Fisher over the backbone's own noise levels ------------------------------------------------
class _Scale(nn.Module):
    """D(x; sigma, c) = w x (one parameter): its Fisher can be written out by hand."""
    null_label = 3

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, sigma, label):
        return self.w * x


class _Spy(EDMSchedule):
    """Records every level the loss is evaluated at."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def denoising_loss(self, denoiser, x0, label, sigma, eps, guidance=0.0, augment_labels=None):
        self.seen.append(sigma.detach().clone())
        return super().denoising_loss(denoiser, x0, label, sigma, eps, guidance, augment_labels)


def test_edm_fisher_averages_over_log_normal_sigma():
    """On EDM the per-sample gradient is the mean over fresh draws of ln sigma ~ N(P_mean, P_std^2): the levels
    seen have that distribution, differ between samples, and F matches a hand computation with weight 1/K."""
    torch.manual_seed(0)
    x0, labels = torch.rand(20, 1, 2, 2) * 2 - 1, torch.zeros(20, dtype=torch.long)
    sched, K = _Spy(), 50
    net = _Scale()
    F = diagonal_fisher(Denoiser(net, sched, 3), x0, labels, levels=K, chunk=1000,
                        generator=torch.Generator().manual_seed(5))
    seen = torch.stack(sched.seen)                            # (samples, K)
    assert seen.shape == (20, K)
    log = seen.log().flatten()
    assert log.mean().item() == pytest.approx(-1.2, abs=0.1) and log.std().item() == pytest.approx(1.2, abs=0.1)
    assert not torch.equal(seen[0], seen[1])                  # fresh draws per sample
    # by hand: l_k = lambda(s_k) ||w (x0 + s_k e_k) - x0||^2, dl/dw = 2 lambda(s_k) <w x_k - x0, x_k>
    g = torch.Generator().manual_seed(5)
    hand = 0.0
    for x in x0:
        s = sched.sample_train(K, "cpu", g)
        e = torch.randn((K, *x.shape), generator=g)
        xk = x + s.view(-1, 1, 1, 1) * e
        grad = (2 * sched.loss_weight(s) * ((0.7 * xk - x) * xk).flatten(1).sum(1)).mean()
        hand += grad.item() ** 2
    assert F["w"].item() == pytest.approx(hand / 20, rel=1e-4)


def test_vp_fisher_levels_are_the_evenly_spaced_timesteps_as_before():
    """DDPM: levels=k is exactly the explicit evenly spaced timesteps (what VDU passed before), scaled to T."""
    sched = VPSchedule(num_timesteps=100)
    t, scale = sched.fisher_levels(7)
    expect = torch.linspace(0, 99, 7).round().long().unique()
    assert torch.equal(t, expect) and scale == 100 / 7
    t, scale = sched.fisher_levels()
    assert torch.equal(t, torch.arange(100)) and scale == 1.0
    torch.manual_seed(0)
    net = _Scale()

    class _Eps(nn.Module):
        null_label = 3

        def __init__(self):
            super().__init__()
            self.w = net.w

        def forward(self, x, t, label):
            return self.w * x

    x0, c = torch.randn(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    den = Denoiser(_Eps(), sched, 3)
    a = diagonal_fisher(den, x0, c, levels=7, chunk=3, generator=torch.Generator().manual_seed(1))
    b = diagonal_fisher(den, x0, c, timesteps=expect, chunk=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a["w"], b["w"])


# -- ESD's grid in the backbone's own terms -------------------------------------------------------------
class _ZeroD(nn.Module):
    """D = 0 everywhere: the Euler/DDIM step x' = D + sigma' (x - D) / sigma scales x by sigma' / sigma."""
    null_label = 3

    def forward(self, x, sigma, label):
        return torch.zeros_like(x)


def test_esd_partial_sampling_on_edm_starts_at_sigma_max_and_stops_on_the_rho_grid():
    sched = EDMSchedule()
    den = Denoiser(_ZeroD(), sched, 3)
    z = torch.randn(2, 1, 2, 2)
    labels = torch.zeros(2, dtype=torch.long)
    grid = sched.ddim_grid(5)                                   # ascending sigma_min .. sigma_max
    assert grid[0] == pytest.approx(0.002) and grid[-1] == pytest.approx(80.0)
    out, s = partial_ddim(den, labels, z, steps=5, stop=4)
    assert s == grid[4] and torch.allclose(out, 80.0 * z)       # the top of the grid: sigma_max z
    out, s = partial_ddim(den, labels, z, steps=5, stop=1)
    assert s == grid[1] and torch.allclose(out, grid[1] * z, rtol=1e-5)


def test_esd_grid_bound_is_stated_by_the_backbone(teachers):
    """DDPM: esd_steps in [1, T]; EDM: at least 2 levels (sigma_max and sigma_min), refused when built."""
    with pytest.raises(ValueError, match=r"esd_steps must be at least 2 on an EDM network"):
        get_method("esd")(_with(_config("esd", "songunet", *teachers["songunet"]), esd_steps=1), Dist())
    get_method("esd")(_with(_config("esd", "songunet", *teachers["songunet"]), esd_steps=5000), Dist())
    with pytest.raises(ValueError, match=r"esd_steps must be in \[1, 1000\]"):
        get_method("esd")(_with(_config("esd", "unet2d", *teachers["unet2d"]), esd_steps=1001), Dist())


def _with(cfg: dict, **baseline) -> dict:
    cfg["baseline"].update(baseline)
    return cfg
