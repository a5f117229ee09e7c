"""The cluster path: torchrun on EDM networks with NVIDIA's augmentation input, one download for all
ranks, clear messages offline, and how folder images are read (flips, bit depth, oversized files)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import torchrun

# A tiny SongUNet with NVIDIA's 9-dimensional augmentation-label input (as in the public CIFAR-10 EDM networks).
TINY_EDM_AUG = ["data.builtin_per_class=8", "data.num_workers=0", "model.base_channels=8", "model.channel_mult=[1,2]",
                "model.attn_resolutions=[8]", "model.augment_dim=9", "training.batch_size=4", "training.n_iters=2",
                "training.log_every=1", "training.snapshot_every=2", "training.state_every=2", "grid.steps=2",
                "grid.per_class=1"]


@pytest.mark.slow  # ~1 min: two 2-rank runs
@pytest.mark.subprocess
def test_edm_with_augment_input_trains_under_torchrun(tmp_path):
    """DDP needs every parameter in the graph: the unused augment input crashed iteration 2 (issue 21)."""
    torchrun("train.py", "--config", "configs/builtin_edm_train.yaml", "--outdir", tmp_path / "teacher", *TINY_EDM_AUG,
             "--device", "cpu")
    (teacher,) = (tmp_path / "teacher").iterdir()
    ckpt = teacher / "network-0000002.safetensors"
    assert ckpt.exists()
    torchrun("train.py", "--config", "configs/builtin_edm_sfd.yaml", "--outdir", tmp_path / "sfd", f"sfd.init={ckpt}",
             *TINY_EDM_AUG, "--device", "cpu")
    (run,) = (tmp_path / "sfd").iterdir()
    assert (run / "network-0000002.safetensors").exists()


def test_augment_input_takes_part_in_the_graph_and_changes_nothing():
    """Zeros through map_augment: the same output, bit for bit, as skipping it; every parameter gets a grad."""
    import copy

    import torch

    from sfd_ddpm import config as C
    from sfd_ddpm.networks import build_network
    torch.manual_seed(0)
    cfg = C.load_config(None, ["model.arch=songunet", "model.base_channels=8", "model.channel_mult=[1,2]",
                               "model.layers_per_block=1", "model.attn_resolutions=[8]", "model.dropout=0.0",
                               "data.image_size=16", "model.augment_dim=9"])
    net = build_network(cfg)
    without = copy.deepcopy(net)
    without.model.map_augment = None  # what the network computed before (the input skipped)
    x, sigma, label = torch.randn(3, 3, 16, 16), torch.tensor([0.02, 1.0, 60.0]), torch.tensor([0, 4, 10])
    out = net(x, sigma, label)
    assert torch.equal(out, without(x, sigma, label))
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert torch.count_nonzero(net.model.map_augment.weight.grad) == 0  # Adam leaves it where it was
