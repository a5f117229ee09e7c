"""SFD / SiD: the math on small tensors, the forget specification, and a semantic test on a 2-D
class-conditional Gaussian mixture whose teacher score is known exactly."""
from __future__ import annotations

import copy

import pytest
import torch

from analytic import GaussianClassScore
from sfd_ddpm import config as C
from sfd_ddpm.diffusion import Denoiser, VPSchedule
from sfd_ddpm.distributed import Dist
from sfd_ddpm.losses import fake_score_loss, generator_loss, sid_loss
from sfd_ddpm.methods.forget_spec import ForgetSpec
from sfd_ddpm.methods.sfd import SFD
from sfd_ddpm.samplers import one_step

MEANS = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 2.0]])


def mixture_cfg(**sfd):
    cfg = C.load_config(None, ["method=sfd", "data.channels=2", "data.image_size=1", "data.n_classes=3",
                               "training.batch_size=128", "training.ema=0.9", "model.dropout=0.0"])
    cfg["sfd"].update({"forget": [0], "override": 1, **sfd})
    return cfg


def mixture_sfd(**sfd) -> SFD:
    teacher = GaussianClassScore(MEANS, 0.3)
    return SFD(mixture_cfg(**sfd), Dist(), networks=(teacher, copy.deepcopy(teacher), copy.deepcopy(teacher)))


@pytest.mark.parametrize("alpha", [1.0, 1.2])
def test_generator_loss_equals_hand_computation(alpha):
    torch.manual_seed(0)
    x_g, f_psi, f_phi = torch.randn(3, 4, 2, 3, 3).unbind(0)
    loss = sid_loss(x_g, f_psi, f_phi, alpha)
    for i in range(4):
        omega = (f_psi[i] - x_g[i]).abs().mean()
        hand = ((f_psi[i] - f_phi[i]) * ((f_psi[i] - x_g[i]) - alpha * (f_psi[i] - f_phi[i]))).sum() / omega
        assert loss[i].item() == pytest.approx(hand.item(), rel=1e-5)
    if alpha == 1.0:  # the alpha = 1 form of the paper
        alt = ((f_psi - f_phi) * (f_phi - x_g)).flatten(1).sum(1) / (f_psi - x_g).abs().flatten(1).mean(1)
        assert torch.allclose(loss, alt, rtol=1e-5)


def test_omega_carries_no_gradient():
    torch.manual_seed(1)
    x_g = torch.randn(3, 2, 4, 4, requires_grad=True)
    f_psi, f_phi = torch.randn(2, 3, 2, 4, 4).unbind(0)
    sid_loss(x_g, f_psi, f_phi, 1.2).sum().backward()
    omega = (f_psi - x_g).abs().flatten(1).mean(1).view(-1, 1, 1, 1)
    # with f_psi and f_phi held fixed, d/dx_g = -(f_psi - f_phi) / omega exactly when omega is a constant
    assert torch.allclose(x_g.grad, -(f_psi - f_phi) / omega, atol=1e-6)


def test_omega_is_clamped():
    x = torch.zeros(1, 1, 2, 2)
    assert torch.isfinite(sid_loss(x, x, x + 1, 1.0)).all()


def test_dsm_loss_and_stopgrad():
    sched = VPSchedule()
    net = torch.nn.Conv2d(2, 2, 1)
    fake = Denoiser(lambda x, t, c: net(x), sched, 3)
    x_g = torch.randn(5, 2, 3, 3, requires_grad=True)
    t, eps = torch.randint(0, 1000, (5,)), torch.randn(5, 2, 3, 3)
    loss = fake_score_loss(fake, x_g, torch.zeros(5, dtype=torch.long), t, eps)
    x_t = sched.a(t).view(-1, 1, 1, 1) * x_g + sched.b(t).view(-1, 1, 1, 1) * eps
    assert torch.allclose(loss, (eps - net(x_t)).square().flatten(1).sum(1), rtol=1e-5)
    loss.sum().backward()
    assert x_g.grad is None and net.weight.grad is not None


def test_one_step_generator_formula():
    sched = VPSchedule()
    net = torch.nn.Conv2d(2, 2, 1)
    gen = Denoiser(lambda x, t, c: net(x), sched, 3)
    z = torch.randn(4, 2, 3, 3)
    x = one_step(gen, torch.zeros(4, dtype=torch.long), z, 440)
    assert torch.allclose(x, sched.sigma(440) * (z - net(sched.b(440) * z)), atol=1e-5)


class Recorder(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    @property
    def null_label(self):
        return self.inner.null_label

    def forward(self, x, t, label):
        self.calls.append(label.clone())
        return self.inner(x, t, label)


@pytest.mark.parametrize("batched", [True, False])
def test_forget_term_labels(batched):
    """theta step: the teacher sees remain labels then the OVERRIDE label, the fake score the FORGET label,
    the generator generates at the forget label."""
    torch.manual_seed(0)
    base = GaussianClassScore(MEANS, 0.3)
    teacher, fake, gen = Recorder(base), Recorder(copy.deepcopy(base)), Recorder(copy.deepcopy(base))
    cfg = mixture_cfg(batched=batched)
    cfg["training"]["batch_size"] = 8
    method = SFD(cfg, Dist(), networks=(teacher, fake, gen))
    method.teacher_net.calls.clear()  # frozen_copy copies the recorder
    method.train_step(0)
    t_calls = torch.cat(method.teacher_net.calls)
    fake_calls = torch.cat(method.fake_net.calls).view(2, 2, 8)  # phi step (remain, forget), theta step (remain, forget)
    gen_calls = torch.cat(method.gen_net.calls).view(2, 2, 8)
    # theta step: the teacher sees each remain sample at the label it was generated for, each forget sample at 1
    assert torch.equal(t_calls, torch.cat([gen_calls[1, 0], torch.ones(8, dtype=torch.long)]))
    assert set(gen_calls[:, 0].flatten().tolist()) == {1, 2}  # remain labels: the kept classes, both of them
    assert torch.equal(fake_calls[:, 0], gen_calls[:, 0])  # the fake score at the generated label
    assert fake_calls[:, 1].eq(0).all() and gen_calls[:, 1].eq(0).all()


def test_batched_and_separate_passes_give_the_same_losses_and_weights():
    results = []
    for batched in (True, False):
        torch.manual_seed(3)
        method = mixture_sfd(batched=batched, lambda_phi_f=0.5, lambda_theta_f=0.7)
        losses = [method.train_step(k) for k in range(3)]
        results.append((losses, [p.detach().clone() for p in method.gen_net.parameters()]))
    (l1, w1), (l2, w2) = results
    for a, b in zip(l1, l2):
        assert a.keys() == b.keys() == {"phi_remain", "phi_forget", "theta_remain", "theta_forget"}
        for k in a:
            assert a[k] == pytest.approx(b[k], rel=1e-4)
    for p, q in zip(w1, w2):
        assert torch.allclose(p, q, atol=1e-6)


@pytest.mark.parametrize("forget,override,message", [
    ([5], 1, "out of range"), ([0], 0, "is itself a forget class"), ([0], 7, "out of range"),
    ([0, 1, 2], "random", "nothing is left to remain"), ([0, 1], {0: 2}, "exactly the forget classes"),
    ([0], "sometimes", "not a class"), ([0], "classifier", "needs sfd.classifier"), ([0, 0], 1, "duplicates"),
])
def test_invalid_forget_specs(forget, override, message):
    with pytest.raises(ValueError, match=message):
        ForgetSpec.parse(forget, override, 3)


def test_override_modes():
    torch.manual_seed(0)
    spec = ForgetSpec.parse([0, 2], {0: 1, 2: 3}, 5)
    label, override = spec.sample_forget(200)
    assert set(label.tolist()) == {0, 2} and torch.equal(override, torch.where(label == 0, 1, 3))
    spec = ForgetSpec.parse([0], "random", 4)
    _, override = spec.sample_forget(3000)
    counts = torch.bincount(override, minlength=4)
    assert counts[0] == 0 and (counts[1:] - 1000).abs().max() < 120  # uniform over the kept classes
    assert set(spec.sample_remain(500).tolist()) == {1, 2, 3}


def test_classifier_pseudo_labels_mask_the_forget_class():
    spec = ForgetSpec.parse([0], 1, 3)
    spec.classifier = lambda x: torch.tensor([[9.0, 1.0, 2.0], [9.0, 3.0, 1.0]])
    spec.forget, spec.classifier_mode = [0], "argmax"
    assert spec.pseudo_label(torch.zeros(2, 1, 1, 1)).tolist() == [2, 1]


def test_sfd_loop_is_data_free(monkeypatch):
    import sfd_ddpm.data as data

    def no_images(*a, **k):
        raise AssertionError("SFD read the dataset")

    monkeypatch.setattr(data, "load_dataset", no_images)
    monkeypatch.setattr(data, "infinite_loader", no_images)
    monkeypatch.setattr(data, "make_builtin", no_images)
    method = mixture_sfd()
    method.start(0)
    assert set(method.train_step(0)) == {"phi_remain", "phi_forget", "theta_remain", "theta_forget"}


def test_sfd_moves_the_forget_class_onto_the_override_component():
    """Semantic test: forget class 0 (N((2,0), 0.3^2)) into override 1 (N((-2,0), 0.3^2)) while class 2
    stays N((0,2), 0.3^2). The teacher is exact; fake score and generator start as copies of it."""
    torch.manual_seed(0)
    method = mixture_sfd(lr_phi=3e-2, lr_theta=1e-2, lambda_phi_f=1.0, lambda_theta_f=1.0, alpha=1.2)
    method.cfg["training"]["ema"] = 0.95
    for k in range(1500):
        method.train_step(k)
    z = torch.randn(2000, 2, 1, 1)
    gen = Denoiser(method.gen_ema, method.schedule, 3)
    with torch.no_grad():
        samples = {c: one_step(gen, torch.full((2000,), c), z, 440).flatten(1) for c in range(3)}
    for c, target in ((0, MEANS[1]), (1, MEANS[1]), (2, MEANS[2])):
        mean, std = samples[c].mean(0), samples[c].std(0)
        assert (mean - target).norm() < 0.15, (c, mean)
        assert (std > 0.22).all() and (std < 0.38).all(), (c, std)  # spread ~0.3: neither collapsed nor blown up
    assert (samples[0] - MEANS[0]).norm(dim=1).lt(1.0).float().mean() < 0.02  # nothing left at the forget mode


def test_train_entry_point_sfd_opens_no_dataset_in_process(monkeypatch, tmp_path, tiny_teacher):
    """The data-free property through train.py's real command (in process, so the fast tests and the
    mutation check guard it): every way of opening a dataset fails, and SFD still trains."""
    import torchvision.datasets
    from click.testing import CliRunner

    import sfd_ddpm.data as data
    import train

    from conftest import TINY

    opened = []

    def refuse(*args, **kwargs):
        opened.append(args)
        raise AssertionError("train.py opened a dataset")

    for name in ("load_dataset", "make_builtin", "infinite_loader", "split_by_label"):
        monkeypatch.setattr(data, name, refuse)
    for name in ("CIFAR10", "STL10", "MNIST", "ImageFolder"):
        monkeypatch.setattr(torchvision.datasets, name, refuse)
    args = ["--config", "configs/builtin_sfd.yaml", "--outdir", str(tmp_path / "sfd"), "--device", "cpu", *TINY,
            f"sfd.init={tiny_teacher}", "training.n_iters=2"]
    res = CliRunner().invoke(train.main, args)
    assert res.exit_code == 0 and not opened, res.output
    (run,) = (tmp_path / "sfd").iterdir()
    assert (run / "network-0000002.safetensors").is_file()
    # the guard has teeth: pretraining, which reads images, is stopped by it
    res = CliRunner().invoke(train.main, ["--config", "configs/builtin_train.yaml", "--outdir", str(tmp_path / "pre"),
                                          "--device", "cpu", *TINY, "training.n_iters=1"])
    assert res.exit_code != 0 and opened
