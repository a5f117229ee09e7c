"""Every training method on both backbones (the DDPM UNet with its discrete VP timesteps, EDM's SongUNet with
continuous sigma), and ESD's grid bound stated by each backbone. The levels themselves (the Fisher over the
backbone's training distribution, ESD's grid and starting noise) are tested in tests/test_levels.py."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from conftest import TINY, TREE
from sfd_ddpm import config as C
from sfd_ddpm.checkpoints import save_weights
from sfd_ddpm.diffusion import Denoiser, VPSchedule, schedule_of
from sfd_ddpm.distributed import Dist
from sfd_ddpm.edm import EDMSchedule
from sfd_ddpm.fisher import diagonal_fisher
from sfd_ddpm.methods import METHODS, get_method
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


# -- forgetting with a known answer on the EDM backbone --------------------------------------------
# Three 2-pixel Gaussian classes with an exact EDM teacher (tests/analytic.py); the null class's mean is the
# average of the class means, (0, 2/3).
MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])


def _analytic_finetune(method: str, monkeypatch, *overrides) -> object:
    import copy

    from analytic import EDMGaussianClassDenoiser
    from sfd_ddpm.methods import finetune
    cfg = C.load_config(None, [f"method={method}", "model.arch=songunet", "data.channels=2", "data.image_size=1",
                               "data.n_classes=3", "training.batch_size=64", "training.ema=0.0",
                               "baseline.forget=[0]", "baseline.lr=3e-2", *overrides])
    teacher = EDMGaussianClassDenoiser(MEANS, 0.3)
    monkeypatch.setattr(finetune, "load_pretrained", lambda cfg, network: (copy.deepcopy(teacher), cfg))
    torch.manual_seed(0)
    m = get_method(method)(cfg, Dist())
    m.start(0)
    return m


def _edm_samples(m, c: int, n: int = 1000) -> torch.Tensor:
    from sfd_ddpm.samplers import sample
    den = Denoiser(m.ema, m.schedule, 3)
    return sample(den, "edm", torch.full((n,), c), list(range(n)), (2, 1, 1), steps=18).flatten(1)


def test_edm_esd_sends_the_forget_class_where_negative_guidance_points(monkeypatch):
    """ESD's target 2 D(null) - D(c_f) (eta 1) is, for this teacher, the Gaussian with mean 2 m_null - m_0 =
    (-2, 4/3): after ESD on the rho grid the forget class samples there, and the other classes are untouched."""
    m = _analytic_finetune("esd", monkeypatch, "baseline.esd_steps=10", "baseline.esd_eta=1.0")
    for k in range(600):
        m.train_step(k)
    with torch.no_grad():
        s0, s1, s2 = (_edm_samples(m, c) for c in range(3))
    assert (s0.mean(0) - torch.tensor([-2.0, 4 / 3])).norm() < 0.2, s0.mean(0)
    assert ((s0.std(0) > 0.25) & (s0.std(0) < 0.36)).all(), s0.std(0)   # the teacher's spread, 0.3
    assert (s0 - MEANS[0]).norm(dim=1).lt(1.0).float().mean() < 0.02
    assert (s1.mean(0) - MEANS[1]).norm() < 0.05 and (s2.mean(0) - MEANS[2]).norm() < 0.05


def test_edm_sa_sends_the_forget_class_to_its_surrogate_noise(monkeypatch, tmp_path):
    """SA's forget term fits class 0 to uniform noise in [-1, 1]^2 (mean 0, standard deviation 1/sqrt(3)): after
    SA with EDM's loss, replay and Fisher the forget class samples with those moments instead of N((2, 0), 0.3^2),
    and the other classes stay."""
    from analytic import EDMGaussianClassDenoiser
    teacher = EDMGaussianClassDenoiser(MEANS, 0.3)
    x = MEANS[torch.arange(30) % 3] + 0.3 * torch.randn(30, 2)
    fisher = diagonal_fisher(Denoiser(teacher, EDMSchedule(), 3), x.view(30, 2, 1, 1), torch.arange(30) % 3,
                             levels=20, generator=torch.Generator().manual_seed(0))
    save_file(fisher, str(tmp_path / "f.safetensors"))
    m = _analytic_finetune("sa", monkeypatch, f"baseline.sa_fisher={tmp_path / 'f.safetensors'}",
                           "baseline.sa_replay_per_class=200", "baseline.sa_replay_steps=18",
                           "baseline.sa_replay_guidance=0", "baseline.sa_lambda=1e-3")
    for k in range(600):
        m.train_step(k)
    with torch.no_grad():
        s0, s1, s2 = (_edm_samples(m, c) for c in range(3))
    assert s0.mean(0).norm() < 0.25, s0.mean(0)
    assert ((s0.std(0) > 0.5) & (s0.std(0) < 0.66)).all(), s0.std(0)     # U[-1, 1]: 1/sqrt(3) = 0.577; teacher 0.3
    assert (s1.mean(0) - MEANS[1]).norm() < 0.15 and (s2.mean(0) - MEANS[2]).norm() < 0.15


def test_fisher_command_on_an_edm_teacher(teachers, tmp_path):
    """fisher.py on a SongUNet: samples with EDM's sampler, --levels sigma draws per image, its settings
    recorded; a DDPM-only option (--timesteps-stride) is refused with a message."""
    import json

    from click.testing import CliRunner
    from safetensors import safe_open

    import fisher as fisher_cli
    teacher, _ = teachers["songunet"]
    out = tmp_path / "f.safetensors"
    res = CliRunner().invoke(fisher_cli.main, ["--ckpt", str(teacher), "--out", str(out), "--samples", "2",
                                               "--levels", "3", "--steps", "2", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    with safe_open(str(out), "pt") as f:
        settings = json.loads(f.metadata()["settings"])
        assert settings["levels"] == 3 and settings["timesteps_stride"] is None
        assert all(f.get_tensor(k).abs().sum() > 0 for k in list(f.keys())[:3])
    res = CliRunner().invoke(fisher_cli.main, ["--ckpt", str(teacher), "--out", str(out), "--timesteps-stride", "10"])
    assert res.exit_code != 0 and "no timesteps" in res.output
