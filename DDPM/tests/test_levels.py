"""Each backbone's own noise levels where SA, VDU and ESD need them: the diagonal Fisher as an expectation over
the backbone's training distribution of levels (DDPM: the timesteps as before; EDM: log-normal sigma), and
ESD's partial sampling on EDM's rho grid from sigma_max noise. Fast: no network is trained."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from sfd_ddpm.diffusion import Denoiser, VPSchedule
from sfd_ddpm.edm import EDMSchedule
from sfd_ddpm.fisher import diagonal_fisher
from sfd_ddpm.methods.esd import partial_ddim


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


