"""The diagonal Fisher equals the hand-averaged squared per-sample gradients on a tiny model."""
import torch

from sfd_ddpm.diffusion import Denoiser, VPSchedule, eps_loss
from sfd_ddpm.fisher import diagonal_fisher


def test_fisher_matches_hand_computation():
    torch.manual_seed(0)

    class Net(torch.nn.Conv2d):
        def forward(self, x, t, c):
            return super().forward(x) * (1 + c.float().view(-1, 1, 1, 1))

    net = Net(2, 2, 1)
    den = Denoiser(net, VPSchedule(), 3)
    x, c = torch.randn(3, 2, 2, 2), torch.tensor([0, 1, 2])
    ts = torch.tensor([5, 300, 700, 999])
    fisher = diagonal_fisher(den, x, c, timesteps=ts, chunk=3, generator=torch.Generator().manual_seed(1))
    # by hand: the same noise draws, one timestep at a time
    g = torch.Generator().manual_seed(1)
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for n_ in range(3):
        eps_chunks = [torch.randn((len(t), 2, 2, 2), generator=g) for t in ts.split(3)]
        eps = torch.cat(eps_chunks)
        grads = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
        for j, t in enumerate(ts):
            net.zero_grad()
            eps_loss(den, x[n_:n_ + 1], c[n_:n_ + 1], t.view(1), eps[j:j + 1]).sum().backward()
            for n, p in net.named_parameters():
                grads[n] += p.grad * (1000 / len(ts))
        for n in grads:
            expected[n] += grads[n] ** 2 / 3
    for n in expected:
        assert torch.allclose(fisher[n], expected[n], rtol=1e-4, atol=1e-7), n
