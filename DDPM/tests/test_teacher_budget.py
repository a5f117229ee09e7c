"""A teacher sized to the user's folder (sfd_ddpm/teacher_budget.py): epochs, checks, the stop rule, the
resolution from the images."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sfd_ddpm import teacher_budget as tb


class FakeTraining:
    """``run``: records each train.py command and writes the snapshot it would (a new run folder on the
    first); ``check``: the accuracies given, one per check; ``clock``: advances ``chunk`` seconds per chunk."""

    def __init__(self, parent: Path, accuracies, chunk=10.0):
        self.parent, self.accuracies, self.chunk = parent, list(accuracies), chunk
        self.commands, self.now = [], 0.0

    def run(self, cmd):
        cmd = [str(c) for c in cmd]
        self.commands.append(cmd)
        iters = int(next(c for c in cmd if c.startswith("training.n_iters=")).split("=")[1])
        run_dir = self.parent / "00000-run" if cmd[1] != "--resume" else Path(cmd[2])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / f"network-{iters:07d}.safetensors").write_text("x")
        self.now += self.chunk

    def check(self, ckpt, clf, forget, per_class, steps):
        assert Path(ckpt).exists() and forget == 1
        acc = self.accuracies.pop(0)
        return {"accuracy": acc, "forget_acc": acc, "remaining_acc": acc, "per_class_accuracy": [acc] * 3}

    def clock(self):
        return self.now


def sized(tmp_path, accuracies, minutes=10.0, chunk=10.0, n_train=4500, batch=64, rule=tb.RULE):
    fake = FakeTraining(tmp_path / "teacher", accuracies, chunk)
    rec = tb.train_sized_teacher(tmp_path / "teacher", ["train.py", "--config", "c.yaml"], n_train, batch, minutes,
                                 "clf.safetensors", 1, fake.run, rule, clock=fake.clock, check=fake.check)
    return rec, fake


def test_the_teacher_trains_in_epochs_and_stops_once_its_samples_reach_the_stop_accuracy(tmp_path):
    """4500 images at batch 64: checks every 3 epochs = 211, 422, 633 iterations (a fresh run, then resumes of
    the same run); the third check reaches 0.90 and training stops there, the record on disk."""
    rec, fake = sized(tmp_path, [0.5, 0.89, 0.90, 0.95])
    assert [c[-3:] if c[1] != "--resume" else c[1:] for c in fake.commands] == [
        ["training.n_iters=211", "training.snapshot_every=1000000000", "training.state_every=1000000000"],
        ["--resume", str(tmp_path / "teacher" / "00000-run"), "training.n_iters=422"],
        ["--resume", str(tmp_path / "teacher" / "00000-run"), "training.n_iters=633"]]
    assert rec["stop_reason"] == "accuracy" and rec["epochs"] == 9 and rec["iterations"] == 633
    assert [c["epoch"] for c in rec["checks"]] == [3, 6, 9] and fake.accuracies == [0.95]
    on_disk = json.loads((tmp_path / "teacher" / "00000-run" / tb.CHECKS_FILE).read_text())
    assert on_disk == rec and on_disk["finished"]
    assert tb.finished_sized_teacher(tmp_path / "teacher") == tmp_path / "teacher" / "00000-run" / \
        "network-0000633.safetensors"
    # the budget follows the data: a fifth of the images, a fifth of the iterations per epoch
    rec, fake = sized(tmp_path / "small", [0.95], n_train=900)
    assert rec["iterations"] == 43 == tb.iterations_for(3, 900, 64)


def test_the_teacher_stops_when_the_next_chunk_would_not_fit_the_budget_or_at_the_epoch_cap(tmp_path):
    """100 s a chunk in a 4-minute budget: after 200 s another 100 s would pass 240: stop at 6 epochs, said
    so; a 5-minute budget fits a third chunk. An unfinished record is not reused."""
    rec, fake = sized(tmp_path / "a", [0.1] * 9, minutes=4, chunk=100.0)
    assert rec["stop_reason"] == "time" and rec["epochs"] == 6 and len(fake.commands) == 2
    rec, _ = sized(tmp_path / "b", [0.1] * 9, minutes=5, chunk=100.0)
    assert rec["stop_reason"] == "time" and rec["epochs"] == 9
    rec, _ = sized(tmp_path / "c", [0.1] * 9, minutes=100, rule={**tb.RULE, "max_epochs": 7})
    assert rec["stop_reason"] == "max_epochs" and [c["epoch"] for c in rec["checks"]] == [3, 6, 7]
    assert "it reached the 7-epoch cap" in tb.stop_sentence(rec) and "3: 0.10, 6: 0.10, 7: 0.10" in tb.stop_sentence(rec)
    record = tmp_path / "c" / "teacher" / "00000-run" / tb.CHECKS_FILE
    record.write_text(json.dumps({**rec, "finished": False}))
    assert tb.finished_sized_teacher(tmp_path / "c" / "teacher") is None


@pytest.mark.parametrize("sizes, limit, want", [([(28, 28)], 32, 28), ([(64, 48)], 32, 32), ([(20, 20)], 32, 20),
                                                 ([(30, 40)], 32, 28), ([(28, 28)], 16, 16), ([(6, 6)], 32, 8),
                                                 ([(20, 20), (40, 30), (24, 48), (64, 64)], 32, 24)])
def test_the_resolution_follows_the_images_up_to_the_limit(tmp_path, sizes, limit, want):
    """The median shorter side, capped, rounded down to a multiple of 4, at least 8."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(8):
            Image.fromarray(np.zeros(sizes[i % len(sizes)][::-1], np.uint8)).save(tmp_path / name / f"{i}.png")
    assert tb.native_image_size(tmp_path, limit) == want
