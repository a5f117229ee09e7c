"""Unit tests of the foundation: schedule, denoiser, samplers, config, checkpoints, data."""
from __future__ import annotations

import json

import pytest
import torch

from sfd_ddpm import checkpoints, config as C
from sfd_ddpm.data import InfiniteSampler, load_dataset, make_builtin, split_by_label
from sfd_ddpm.diffusion import Denoiser, VPSchedule
from sfd_ddpm.samplers import image_seed, sample


def gaussian_denoiser(mu=0.5, s=0.2):
    """Exact eps-prediction for data ~ N(mu, s^2) per pixel: eps* = b (x_t - a mu) / (a^2 s^2 + b^2)."""
    sched = VPSchedule()

    def net(x, t, label):
        a, b = sched.a(t).view(-1, 1, 1, 1), sched.b(t).view(-1, 1, 1, 1)
        return (x - a * mu) * b / (a * a * s * s + b * b) + 0.0 * label.view(-1, 1, 1, 1)

    return Denoiser(net, sched, null_label=10)


def test_schedule_matches_paper_constants():
    sched = VPSchedule()
    assert sched.a(440).item() == pytest.approx(0.37109, abs=1e-4)
    assert sched.b(440).item() == pytest.approx(0.92860, abs=1e-4)
    assert sched.sigma(440).item() == pytest.approx(2.50233, abs=1e-3)
    sd = VPSchedule(0.00085, 0.012, kind="scaled_linear")
    assert sd.sigma(625).item() == pytest.approx(2.5017, abs=1e-3)


def test_denoiser_guidance_formula():
    sched = VPSchedule()
    net = lambda x, t, c: x * 0 + c.float().view(-1, 1, 1, 1)  # eps = label value
    d = Denoiser(net, sched, null_label=10)
    x = torch.zeros(2, 1, 2, 2)
    eps = d.eps(x, torch.tensor([5, 5]), torch.tensor([3, 4]), guidance=2.0)
    assert torch.allclose(eps[:, 0, 0, 0], torch.tensor([3 * 3 - 2 * 10.0, 3 * 4 - 2 * 10.0]))
    f = d(x, 5, torch.tensor([3, 4]))
    assert torch.allclose(f[:, 0, 0, 0], -sched.b(5) * torch.tensor([3.0, 4.0]) / sched.a(5))


@pytest.mark.parametrize("sampler,kw", [("ddim", dict(steps=20, eta=0.0)), ("ddim", dict(steps=20, eta=1.0)),
                                        ("ddpm", {})])
def test_sampling_is_per_seed_whatever_the_batch(sampler, kw):
    d = gaussian_denoiser()
    labels = torch.zeros(6, dtype=torch.long)
    seeds = [image_seed(7, 0, i) for i in range(6)]
    full = sample(d, sampler, labels, seeds, (1, 3, 3), **kw)
    parts = torch.cat([sample(d, sampler, labels[k:k + 2], seeds[k:k + 2], (1, 3, 3), **kw) for k in (0, 2, 4)])
    assert torch.allclose(full, parts, atol=1e-6)
    other = sample(d, sampler, labels, [image_seed(8, 0, i) for i in range(6)], (1, 3, 3), **kw)
    assert not torch.allclose(full, other)


def test_ddim_eta1_full_steps_matches_ancestral_in_distribution():
    """DDIM with T steps and eta 1 and the ancestral sampler draw the same distribution (different seeds),
    and both reproduce the known data distribution N(0.5, 0.2^2)."""
    d = gaussian_denoiser()
    n = 300
    labels = torch.zeros(n, dtype=torch.long)
    x_ddim = sample(d, "ddim", labels, [image_seed(1, 0, i) for i in range(n)], (1, 2, 2), steps=1000, eta=1.0)
    x_anc = sample(d, "ddpm", labels, [image_seed(2, 0, i) for i in range(n)], (1, 2, 2))
    for x in (x_ddim, x_anc):
        assert x.mean().item() == pytest.approx(0.5, abs=0.03)
        assert x.std().item() == pytest.approx(0.2, abs=0.02)
    assert abs(x_ddim.mean() - x_anc.mean()) < 0.04 and abs(x_ddim.std() - x_anc.std()) < 0.03
    # the same seeds give the same images: the two samplers are one process
    x_same = sample(d, "ddim", labels[:5], [image_seed(2, 0, i) for i in range(5)], (1, 2, 2), steps=1000, eta=1.0)
    assert torch.allclose(x_same, x_anc[:5], atol=1e-4)


def test_builtin_dataset_is_deterministic_and_balanced():
    x1, y1 = make_builtin(5, 16, seed=3)
    x2, y2 = make_builtin(5, 16, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (50, 3, 16, 16) and x1.min() >= -1 and x1.max() <= 1
    assert torch.bincount(y1).tolist() == [5] * 10
    remain, forget = split_by_label(load_dataset("builtin", builtin_per_class=20), [0, 3], 10)
    assert len(forget) == 40 and len(remain) == 160
    assert {remain.dataset.targets[i] for i in remain.indices}.isdisjoint({0, 3})
    with pytest.raises(ValueError, match="out of range"):
        split_by_label(load_dataset("builtin", builtin_per_class=20), [10], 10)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")


def test_infinite_sampler_resumes_and_splits_ranks():
    full = iter(InfiniteSampler(10, 0, 2, seed=1))
    stream = [next(full) for _ in range(12)]
    resumed = iter(InfiniteSampler(10, 0, 2, seed=1, start=7))
    assert [next(resumed) for _ in range(5)] == stream[7:]
    other = iter(InfiniteSampler(10, 1, 2, seed=1))
    assert set(stream[:5]).isdisjoint({next(other) for _ in range(5)})


def test_config_overrides_and_errors(tmp_path):
    cfg = C.load_config("configs/builtin_train.yaml", ["training.lr=0.5", "model.channel_mult=[1,2]"])
    assert cfg["training"]["lr"] == 0.5 and cfg["model"]["channel_mult"] == [1, 2]
    with pytest.raises(C.ConfigError, match="did you mean 'training.lr'"):
        C.load_config(None, ["training.lrr=1"])
    with pytest.raises(C.ConfigError, match="must be a number"):
        C.load_config(None, ["training.lr=fast"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  datset: cifar10\n")
    with pytest.raises(C.ConfigError, match="unknown config key 'data.datset'"):
        C.load_config(bad)
    with pytest.raises(C.ConfigError, match="not found"):
        C.load_config(tmp_path / "missing.yaml")


def test_atomic_write_keeps_the_old_file_when_killed(tmp_path):
    target = tmp_path / "w.safetensors"
    checkpoints.save_weights(target, {"net": {"w": torch.ones(2)}}, {"a": 1}, 1, "ddpm")
    before = target.read_bytes()

    def dies(tmp):
        open(tmp, "wb").write(b"half a fi")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_write(target, dies)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left behind
    nets, meta = checkpoints.load_weights(target)
    assert meta["config"] == {"a": 1} and meta["kind"] == "ddpm" and torch.equal(nets["net"]["w"], torch.ones(2))


def test_checkpoint_errors(tmp_path):
    with pytest.raises(checkpoints.CheckpointError, match="not found"):
        checkpoints.load_weights(tmp_path / "nope.safetensors")
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(checkpoints.CheckpointError, match="not a readable safetensors"):
        checkpoints.load_weights(corrupt)
    net = torch.nn.Linear(3, 2)
    with pytest.raises(checkpoints.CheckpointError, match="different architecture"):
        checkpoints.load_into(net, torch.nn.Linear(4, 2).state_dict(), "x.safetensors")
    state = tmp_path / "s.pt"
    state.write_bytes(b"garbage")
    with pytest.raises(checkpoints.CheckpointError, match="not a loadable training state"):
        checkpoints.load_state(state)


def test_training_state_refuses_pickled_code(tmp_path):
    """Training states are loaded weights-only: a pickle that would run code is rejected."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, path, _use_new_zipfile_serialization=True, pickle_module=pickle)
    with pytest.raises(checkpoints.CheckpointError):
        checkpoints.load_state(path)
