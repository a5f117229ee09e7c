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
