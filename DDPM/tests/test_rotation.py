"""Training-state rotation: the newest training.keep_states states stay on disk; resume from the newest is exact."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_script


def names(run):
    return sorted(p.name for p in run.glob("training-state*.pt"))


@pytest.mark.slow  # three tiny training runs in subprocesses (~60 s on 2 shared cores)
def test_five_states_leave_the_last_two_and_resume_is_exact(tmp_path, tiny_teacher):
    args = ["--config", "configs/builtin_sfd.yaml", *TINY, f"sfd.init={tiny_teacher}", "training.state_every=1",
            "training.snapshot_every=100"]
    run_script("train.py", *args, "--outdir", tmp_path / "a", "training.n_iters=5")
    (run,) = (tmp_path / "a").iterdir()
    assert names(run) == ["training-state-0000004.pt", "training-state-0000005.pt"]
    assert torch.load(run / "training-state-0000005.pt", weights_only=True)["step"] == 5
    run_script("train.py", "--resume", run, "training.n_iters=7")
    assert names(run) == ["training-state-0000006.pt", "training-state-0000007.pt"]

    run_script("train.py", *args, "--outdir", tmp_path / "b", "training.n_iters=7", "training.keep_states=0")
    (run_b,) = (tmp_path / "b").iterdir()
    assert len(names(run_b)) == 7  # keep_states=0 keeps every state
    a = load_file(str(run / "network-0000007.safetensors"))
    b = load_file(str(run_b / "network-0000007.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_latest_state_by_iteration_and_legacy_file(tmp_path):
    from sfd_ddpm.rotation import latest_state, rotate_states

    assert latest_state(tmp_path).name == "training-state.pt"  # a run from before numbering
    for step in (9, 10, 100):
        (tmp_path / f"training-state-{step:07d}.pt").write_bytes(b"x")
    (tmp_path / "training-state-0000011.pt.tmp").write_bytes(b"partial")
    assert latest_state(tmp_path).name == "training-state-0000100.pt"
    assert [p.name for p in rotate_states(tmp_path, 1)] == ["training-state-0000009.pt", "training-state-0000010.pt"]
    assert rotate_states(tmp_path, 0) == [] and len(list(tmp_path.iterdir())) == 2
