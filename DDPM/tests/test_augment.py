"""SiD's CIFAR-10 augmentation (sfd.augment): EDM's geometric transforms and 9 labels, fed to the fake score only."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from sfd_ddpm import config as C
from sfd_ddpm.augment import GeometricAugment, _rotation, _translation, warp
from sfd_ddpm.diffusion import Denoiser
from sfd_ddpm.edm import EDMSchedule
from sfd_ddpm.losses import fake_score_loss, generator_loss
from sfd_ddpm.networks import build_network

TINY_EDM = ["model.arch=songunet", "model.base_channels=8", "model.channel_mult=[1,2]", "model.layers_per_block=1",
            "model.attn_resolutions=[8]", "model.dropout=0.0", "data.image_size=8", "data.n_classes=3",
            "model.augment_dim=9"]


def test_label_rates_follow_edm_at_p_012():
    """x-flip: half the images whatever p; y-flip p/2; scale, rotation, anisotropy, translation p each; the
    anisotropy axis is turned half of the time; the Gaussian draws have unit spread."""
    torch.manual_seed(0)
    n, p = 20000, 0.12
    _, labels = GeometricAugment(p)(torch.randn(n, 1, 4, 4))
    rate = (labels != 0).float().mean(0)
    expect = [0.5, p / 2, p, p, p, p, p / 2, p, p]
    for k, (got, want) in enumerate(zip(rate.tolist(), expect)):
        assert got == pytest.approx(want, abs=0.012), (k, got, want)
    for k in (2, 7, 8):  # log2-scale and translation draws ~ N(0, 1) where applied
        drawn = labels[labels[:, k] != 0, k]
        assert drawn.std().item() == pytest.approx(1.0, abs=0.08) and abs(drawn.mean().item()) < 0.1
    angle = torch.atan2(labels[:, 4], labels[:, 3] + 1)
    assert angle.abs().max() > 3.0 and (labels[:, 3] <= 1e-6).all()  # angles over (-pi, pi)


def test_flips_are_what_the_labels_say():
    torch.manual_seed(1)
    images = torch.randn(64, 3, 6, 6)
    out, labels = GeometricAugment(1e-12)(images)  # only EDM's unconditional x-flip remains
    flipped = labels[:, 0] == 1
    assert 10 < int(flipped.sum()) < 54 and torch.count_nonzero(labels[:, 1:]) == 0
    assert torch.equal(out[flipped], images[flipped].flip(3)) and torch.equal(out[~flipped], images[~flipped])


def test_warp_turns_and_shifts_pixels_exactly():
    """g_inv maps output pixels to input pixels (centred coordinates, y down), as EDM's G_inv: a quarter turn
    sends input (x, y) = (ix, n-1-iy) to output (iy, ix); a shift by -1 in x reads the left neighbour."""
    n = 6
    img = torch.randn(1, 2, n, n)
    turned = warp(img, _rotation(torch.tensor([math.pi / 2])))
    iy, ix = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    assert torch.allclose(turned[0], img[0][:, ix, n - 1 - iy], atol=1e-5)
    shifted = warp(img, _translation(torch.tensor([-1.0]), torch.tensor([0.0])))
    assert torch.allclose(shifted[0, :, :, 1:], img[0, :, :, :-1], atol=1e-5)
    assert torch.equal(warp(img, torch.eye(3)[None]), img)


def test_augment_labels_reach_the_network():
    torch.manual_seed(0)
    net = build_network(C.load_config(None, TINY_EDM))
    x, sigma, label = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([0, 2])
    zeros, ones = torch.zeros(2, 9), torch.ones(2, 9)
    assert torch.equal(net(x, sigma, label), net(x, sigma, label, augment_labels=zeros))
    assert not torch.equal(net(x, sigma, label), net(x, sigma, label, augment_labels=ones))  # F_x starts near 0
    with pytest.raises(ValueError, match="augment_dim"):
        net(x, sigma, label, augment_labels=torch.ones(2, 4))


class Recorder(torch.nn.Module):
    """D = 0 everywhere; records the augmentation labels it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, sigma, label, augment_labels=None):
        self.seen.append(augment_labels)
        return torch.zeros_like(x)


def test_fake_score_learns_augmented_images_and_the_generator_loss_does_not():
    """EDM's loss on the augmented image y with its labels: lambda(sigma) ||D(y + sigma eps; a) - y||^2."""
    sched, rec = EDMSchedule(), Recorder()
    fake = Denoiser(rec, sched, None)
    x_g, label = torch.randn(16, 1, 6, 6), torch.zeros(16, dtype=torch.long)
    sigma, eps = torch.full((16,), 1.5), torch.randn(16, 1, 6, 6)
    augment = GeometricAugment(0.5)
    torch.manual_seed(3)
    y, labels = augment(x_g)
    torch.manual_seed(3)
    loss = fake_score_loss(fake, x_g, label, sigma, eps, augment=augment)
    assert torch.equal(rec.seen[-1], labels) and not torch.equal(y, x_g)
    assert torch.allclose(loss, sched.loss_weight(sigma) * y.square().flatten(1).sum(1))
    fake_score_loss(fake, x_g, label, sigma, eps)
    generator_loss(Denoiser(Recorder(), sched, None), fake, x_g, sigma, eps, label, label, 1.2)
    assert rec.seen[-1] is None and rec.seen[-2] is None


def sfd_on_tiny_songunet(augment: float, augment_dim: int = 9):
    from sfd_ddpm.distributed import Dist
    from sfd_ddpm.methods.sfd import SFD
    cfg = C.load_config(None, ["method=sfd", "training.batch_size=4", "sfd.t_min=0", "sfd.t_max=800",
                               "sfd.fake_score_levels=pretrain", f"sfd.augment={augment}", "sfd.lr_phi=1e-2",
                               *TINY_EDM[:-1], f"model.augment_dim={augment_dim}"])
    torch.manual_seed(0)
    teacher = build_network(cfg)
    return SFD(cfg, Dist(), networks=(teacher, copy.deepcopy(teacher), copy.deepcopy(teacher)))


@pytest.mark.parametrize("augment", [0.0, 0.12])
def test_sfd_augment_moves_only_the_fake_scores_augment_input(augment):
    method = sfd_on_tiny_songunet(augment)
    before = method.fake_net.model.map_augment.weight.clone(), method.gen_net.model.map_augment.weight.clone()
    torch.manual_seed(1)
    method.train_step(0)
    fake_moved = not torch.equal(method.fake_net.model.map_augment.weight, before[0])
    assert fake_moved == (augment > 0)
    assert torch.equal(method.gen_net.model.map_augment.weight, before[1])


def test_augment_is_refused_for_a_network_without_augmentation_input():
    with pytest.raises(ValueError, match="augment_dim=9"):
        sfd_on_tiny_songunet(0.12, augment_dim=0)
    with pytest.raises(C.ConfigError):
        C.load_config(None, ["sfd.augment=1.5"])


@pytest.mark.parametrize("only", ["rotate", "scale", "translate"])
def test_each_transform_is_the_one_its_labels_name(only):
    """One transform at a time (the others' multipliers 0): the images equal the warp that the labels describe."""
    torch.manual_seed(2)
    off = {k: 0 for k in ("yflip", "scale", "rotate", "aniso", "translate") if k != only}
    images = torch.randn(200, 1, 8, 8)
    out, a = GeometricAugment(1.0, **off)(images)
    keep = a[:, 0] == 0  # not x-flipped
    if only == "rotate":
        g_inv = _rotation(torch.atan2(a[:, 4], a[:, 3] + 1))
    elif only == "scale":
        s = (a[:, 2] * 0.2).exp2()
        g_inv = torch.diag_embed(torch.stack([1 / s, 1 / s, torch.ones_like(s)], 1))
    else:
        g_inv = _translation(-a[:, 7] * 8 * 0.125, -a[:, 8] * 8 * 0.125)
    assert torch.count_nonzero(a[:, 1:]) > 0
    assert torch.allclose(out[keep], warp(images[keep], g_inv[keep]), atol=1e-5)
