"""Bounded disk use: state rotation with exact resume, the disk plan, the free-space refusal."""
from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner

from test_train import base_args


def invoke(args, env=None):
    from train import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def tensors(obj):
    """Every tensor of a nested state dict, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from tensors(obj[k])
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors(v)


def to_bytes(text: str) -> float:
    value, unit = text.split()
    return float(value) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12}[unit]


def states(run):
    return sorted(p.name for p in run.glob("training-state-*.pt"))


def test_rotation_keeps_the_last_k_and_resume_from_the_newest_is_exact(tiny_sd_dir, tmp_path):
    sched = ["tick_kimg=0.002", "snap_kimg=0.004", "state_kimg=0.002", "seed=5"]
    # Five states (2, 4, 6, 8, 10 images) are written; the default keeps the last two.
    res = invoke(base_args(tiny_sd_dir, tmp_path / "a", "duration_kimg=0.010", *sched))
    assert res.exit_code == 0, res.output
    run_a = next((tmp_path / "a").glob("00000-*"))
    assert states(run_a) == ["training-state-000000008.pt", "training-state-000000010.pt"]
    # Snapshots follow their own schedule and are all kept.
    assert sorted(p.name for p in run_a.glob("network-snapshot-*")) == [
        "network-snapshot-000000004", "network-snapshot-000000008", "network-snapshot-000000010"]

    # The printed size of one state is the real file size (to within pickling overhead).
    size = r"([\d.]+ [kMGT]?B)"
    m = re.search(rf"one training state {size}, one snapshot {size}; this run writes 5 state\(s\) "
                  rf"\(keeps the last 2\) and 3 snapshot\(s\): needs up to {size}", res.output)
    assert m, res.output
    one_state, one_snap, needed = (to_bytes(m.group(i)) for i in (1, 2, 3))
    actual = (run_a / "training-state-000000010.pt").stat().st_size
    assert abs(actual - one_state) / actual < 0.05, (actual, one_state)
    snap_file = (run_a / "network-snapshot-000000010" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert abs(snap_file - one_snap) / snap_file < 0.05, (snap_file, one_snap)
    assert needed == pytest.approx(3 * one_state + 3 * one_snap, rel=0.01)  # K + 1 states at once at most

    # Resume from the run dir (its newest state, 10) to 14 == a straight run to 14.
    res = invoke(base_args(tiny_sd_dir, tmp_path / "a", "duration_kimg=0.014", "--resume", str(run_a), *sched))
    assert res.exit_code == 0, res.output
    run_a2 = run_a  # resume continues in the run's own dir
    assert states(run_a2) == ["training-state-000000012.pt", "training-state-000000014.pt"]
    res = invoke(base_args(tiny_sd_dir, tmp_path / "b", "duration_kimg=0.014", "keep_states=0", *sched))
    assert res.exit_code == 0, res.output
    run_b = next((tmp_path / "b").glob("00000-*"))
    assert len(states(run_b)) == 7  # keep_states=0 keeps every state
    a = torch.load(run_a2 / "training-state-000000014.pt", weights_only=True)
    b = torch.load(run_b / "training-state-000000014.pt", weights_only=True)
    for key in ("fake_score", "generator", "opt_fake", "opt_gen"):
        ta, tb = list(tensors(a[key])), list(tensors(b[key]))
        assert len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb)), key

def test_too_little_free_space_refuses_before_writing(tiny_sd_dir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("models were loaded before the free-space check")

    monkeypatch.setattr("sfd_sd.models.load_sd_parts", no_loading)
    out = tmp_path / "runs"
    res = invoke(base_args(tiny_sd_dir, out, "duration_kimg=0.002"), env={"SFD_FAKE_FREE_BYTES": "1000000"})
    assert res.exit_code != 0
    assert "not enough free disk" in res.output and "two training states need" in res.output, res.output
    assert not out.exists()  # nothing written, not even the run dir


def test_disk_plan_counts():
    from sfd_sd.disk import DiskPlan, count_crossings

    assert count_crossings(0, 10, 2) == 5 and count_crossings(0, 11, 2) == 6 and count_crossings(4, 10, 2) == 3
    assert count_crossings(10, 10, 2) == 0 and count_crossings(0, 100_000, 5_000) == 20
    # The documented celebrity run: 20 states of ~20.6 GB; with K = 2 at most 3 exist at once.
    plan = DiskPlan(state_bytes=20_600_000_000, snapshot_bytes=3_440_000_000, states=20, snapshots=20, keep=2)
    assert plan.states_on_disk == 3 and plan.needed_bytes == 3 * 20_600_000_000 + 20 * 3_440_000_000
    assert DiskPlan(1, 0, states=2, snapshots=0, keep=2).states_on_disk == 2
    assert DiskPlan(1, 0, states=20, snapshots=0, keep=0).states_on_disk == 20


def test_rotate_states_by_number_not_name_order(tmp_path):
    from sfd_sd.disk import rotate_states

    for n in (2, 10, 100, 1000):
        (tmp_path / f"training-state-{n}.pt").write_bytes(b"x")
    (tmp_path / "training-state-notes.txt").write_bytes(b"keep me")
    assert [p.name for p in rotate_states(tmp_path, 2)] == ["training-state-2.pt", "training-state-10.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "training-state-100.pt", "training-state-1000.pt", "training-state-notes.txt"]
