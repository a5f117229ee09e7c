"""Two new runs on one outdir never share a run folder (or a number): the folder is claimed atomically,
and a run started while another is writing gets the next number."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_train import base_args


def cfg_for(outdir, desc):
    from sfd_sd.config import TrainConfig

    return TrainConfig(outdir=str(outdir), desc=desc)


def test_concurrent_claims_get_distinct_numbers(tmp_path, monkeypatch):
    """Eight runs claim at once, with different names (a name clash alone would not stop them), each
    pausing between its scan of the folder and its mkdir."""
    real_iterdir = Path.iterdir

    def slow_iterdir(self):
        found = list(real_iterdir(self))
        time.sleep(0.05)
        return iter(found)

    monkeypatch.setattr(Path, "iterdir", slow_iterdir)
    from sfd_sd.config import new_run_dir

    got, start = [], threading.Barrier(8)

    def claim(i):
        start.wait()
        got.append(new_run_dir(cfg_for(tmp_path, f"run{i}"), 1, "fp32"))

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(p.name[:5] for p in got) == [f"{i:05d}" for i in range(8)]
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in got)


def test_a_folder_made_between_scan_and_mkdir_moves_the_claim_on(tmp_path, monkeypatch):
    from sfd_sd import config

    real_mkdir, made = Path.mkdir, []

    def mkdir(self, *args, **kwargs):
        if self.parent == tmp_path and not made:  # another writer gets there first with the same name
            made.append(self)
            real_mkdir(self)
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    run_dir = config.new_run_dir(cfg_for(tmp_path, "x"), 1, "fp32")
    assert made[0].name.startswith("00000-") and run_dir.name.startswith("00001-")


def test_numbering_waits_for_the_lock_on_outdir(tmp_path):
    """While another process numbers a run in outdir (it holds the lock), a claim waits for it."""
    from sfd_sd.config import new_run_dir

    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('locked', flush=True); time.sleep(1.5); os.mkdir(os.path.join(sys.argv[1], '00000-other'))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        run_dir = new_run_dir(cfg_for(tmp_path, "x"), 1, "fp32")
        assert time.monotonic() - t0 > 0.5 and run_dir.name.startswith("00001-")
    finally:
        holder.kill()
        holder.wait()


def test_a_run_started_while_another_loads_gets_the_next_folder(tiny_sd_dir, tmp_path, monkeypatch):
    """The issue's case: run B (seed 2) starts, and finishes, while run A (seed 1) loads its models."""
    from click.testing import CliRunner

    from sfd_sd import training
    from train import main

    args = ("duration_kimg=0.002", "tick_kimg=0.002", "snap_kimg=0.002", "state_kimg=0.002")
    real_build, nested = training.build, []

    def build(*a, **kw):
        if not nested:  # A, loading
            nested.append(None)
            nested[0] = CliRunner().invoke(main, [str(x) for x in base_args(tiny_sd_dir, tmp_path, *args, "seed=2")])
        return real_build(*a, **kw)

    monkeypatch.setattr(training, "build", build)
    res = CliRunner().invoke(main, [str(x) for x in base_args(tiny_sd_dir, tmp_path, *args, "seed=1")])
    assert res.exit_code == 0 and nested[0].exit_code == 0, (res.output, nested[0].output)
    runs = sorted(tmp_path.iterdir())
    assert [r.name[:5] for r in runs] == ["00000", "00001"], runs
    assert [json.loads((r / "config.json").read_text())["seed"] for r in runs] == [2, 1]  # B numbered first
    for run in runs:
        assert [json.loads(x)["images_seen"] for x in (run / "log.jsonl").read_text().splitlines()] == [2]
        assert (run / "network-snapshot-000000002").is_dir() and (run / "training-state-000000002.pt").is_file()
