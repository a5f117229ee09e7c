"""Writers survive a crash mid-write: the previous file stays loadable and no temp file is left."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def _partial_then_crash(real_save):
    """A torch.save that writes half of the real bytes to its target, then dies (a killed write)."""
    def save(obj, f, *a, **kw):
        import io

        buf = io.BytesIO()
        real_save(obj, buf)
        Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise KeyboardInterrupt("killed mid-write")
    return save


def test_training_state_write_is_atomic(tmp_path, monkeypatch):
    from sfd_sd import checkpoints

    path = tmp_path / "training-state-000000008.pt"
    checkpoints.atomic_torch_save({"cur_nimg": 8, "w": torch.arange(1000.0)}, path)
    monkeypatch.setattr(torch, "save", _partial_then_crash(torch.save))
    with pytest.raises(KeyboardInterrupt):
        checkpoints.atomic_torch_save({"cur_nimg": 16, "w": torch.zeros(1000)}, path)
    state = torch.load(path, weights_only=True)
    assert state["cur_nimg"] == 8 and torch.equal(state["w"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the temp file went away


def test_json_and_bytes_writes_are_atomic(tmp_path, monkeypatch):
    import os

    from sfd_sd import checkpoints

    path = tmp_path / "config.json"
    checkpoints.atomic_write_json(path, {"a": 1})
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        checkpoints.atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_snapshot_write_is_atomic(tmp_path, monkeypatch):
    from sfd_sd import checkpoints

    net = torch.nn.Linear(2, 2)
    net.save_pretrained = lambda d, **kw: torch.save(net.state_dict(), Path(d) / "w.pt")  # a stand-in writer
    folder = checkpoints.save_generator_snapshot(net, tmp_path / "network-snapshot-000000008", {"images_seen": 8})
    assert json.loads((folder / "sfd_generator.json").read_text()) == {"images_seen": 8}

    def crash(d, **kw):
        (Path(d) / "w.pt").write_bytes(b"half")
        raise KeyboardInterrupt("killed")
    net.save_pretrained = crash
    with pytest.raises(KeyboardInterrupt):
        checkpoints.save_generator_snapshot(net, folder, {"images_seen": 16})
    assert json.loads((folder / "sfd_generator.json").read_text()) == {"images_seen": 8}
    assert torch.load(folder / "w.pt", weights_only=True).keys() == net.state_dict().keys()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


def test_latest_state_is_the_highest_count(tmp_path):
    from sfd_sd import checkpoints

    for n in (8, 16, 120):
        checkpoints.atomic_torch_save({"cur_nimg": n}, tmp_path / f"training-state-{n:09d}.pt")
    assert checkpoints.latest_training_state(tmp_path).name == "training-state-000000120.pt"
    assert checkpoints.latest_training_state(tmp_path / "nothing") is None
