"""Two new runs on one --outdir never share a run folder (or a number): the folder is claimed
atomically, and a run started while another is writing gets the next number."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from click.testing import CliRunner

from conftest import TINY

import train as train_script
from sfd_ddpm import training
from sfd_ddpm.training import new_run_dir


def test_concurrent_claims_get_distinct_numbers(tmp_path, monkeypatch):
    """Eight runs claim at once, with different names (a name clash alone would not stop them), each
    pausing between its scan of the folder and its mkdir."""
    real_iterdir = Path.iterdir

    def slow_iterdir(self):
        found = list(real_iterdir(self))
        time.sleep(0.05)
        return iter(found)

    monkeypatch.setattr(Path, "iterdir", slow_iterdir)
    got, start = [], threading.Barrier(8)

    def claim(i):
        start.wait()
        got.append(new_run_dir(tmp_path, f"run{i}"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name[:5] for p in got) == [f"{i:05d}" for i in range(8)]
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in got)


def test_a_folder_made_between_scan_and_mkdir_moves_the_claim_on(tmp_path, monkeypatch):
    real_mkdir, made = Path.mkdir, []

    def mkdir(self, *args, **kwargs):
        if self.parent == tmp_path and not made:  # another writer gets there first with the same name
            made.append(self)
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    assert new_run_dir(tmp_path, "x").name == "00001-x" and made[0].name == "00000-x"


def test_a_run_started_while_another_writes_gets_the_next_folder(tmp_path, monkeypatch):
    """Run B (seed 2) starts and finishes while run A (seed 1) is in its first iteration."""
    args = ["--config", "configs/builtin_train.yaml", "--outdir", tmp_path, *TINY, "training.n_iters=2",
            "training.snapshot_every=2"]
    real_train, nested = training.train, []

    def train(method, cfg, run_dir, *a, **kw):
        if not nested:  # A: its folder is claimed; B runs start to end now
            nested.append(None)
            nested[0] = CliRunner().invoke(train_script.main, [*map(str, args), "seed=2"])
        return real_train(method, cfg, run_dir, *a, **kw)

    monkeypatch.setattr(training, "train", train)
    res = CliRunner().invoke(train_script.main, [*map(str, args), "seed=1"])
    assert res.exit_code == 0 and nested[0].exit_code == 0, (res.output, nested[0].output)
    runs = sorted(tmp_path.iterdir())
    assert [r.name for r in runs] == ["00000-builtin_train", "00001-builtin_train"]
    assert [json.loads((r / "config.json").read_text())["seed"] for r in runs] == [1, 2]
    for run in runs:
        assert [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()] == [1, 2]
        assert (run / "network-0000002.safetensors").is_file() and not (run / "run.lock").exists()
