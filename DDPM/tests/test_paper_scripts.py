"""The paper-table scripts (scripts/*.sh): reruns reuse finished work and resume interrupted work,
a short run is never evaluated, the dry run prints stages and a cost estimate, table.md is one table.

The stage helper (scripts/stage.py) is tested in process; one script is run for real (killed mid-training,
rerun, rerun again). tests/test_baselines.py and tests/test_edm.py run every script twice end to end."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, TREE

SCRIPTS = sorted((TREE / "scripts").glob("*.sh"))
ROW_SCRIPTS = [p for p in SCRIPTS if p.name != "common.sh"]


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, TREE / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


stage = load("stage")


# -- the stage helper ---------------------------------------------------------------------------------
def write_safetensors(path: Path, n_bytes: int = 16, truncate: int = 0) -> None:
    """A minimal safetensors file (one float32 tensor), optionally cut short by ``truncate`` bytes."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_bytes // 4], "data_offsets": [0, n_bytes]},
                         "__metadata__": {"step": "1"}}).encode()
    data = struct.pack("<Q", len(header)) + header + bytes(n_bytes)
    path.write_bytes(data[:len(data) - truncate])


def make_run(stage_dir: Path, name: str, n_iters: int, states=(), snapshots=(), overrides: dict | None = None,
             method: str = "pretrain") -> Path:
    """A run folder as train.py leaves it: config.json, training states and snapshots."""
    run = stage_dir / name
    run.mkdir(parents=True)
    cfg = {"method": method, "training": {"n_iters": n_iters, "batch_size": 8}, "data": {"root": "./data"}}
    for key, value in (overrides or {}).items():
        section, leaf = key.split(".")
        cfg.setdefault(section, {})[leaf] = value
    (run / "config.json").write_text(json.dumps(cfg))
    for step in states:
        (run / f"training-state-{step:07d}.pt").write_bytes(b"state")
    for step in snapshots:
        write_safetensors(run / f"network-{step:07d}.safetensors")
    return run


def test_stage_status_finished_unfinished_none(tmp_path):
    d = tmp_path / "teacher"
    assert stage.stage_status(d) == ("none", None)
    # killed at iteration 20 of 2000: snapshots exist, but the run is resumed, never consumed
    run = make_run(d, "00000-builtin_train", 2000, states=(18, 20), snapshots=(4, 8, 16, 20))
    assert stage.stage_status(d, ["training.n_iters=2000"], "configs/builtin_train.yaml") == ("unfinished", run)
    # the final snapshot cut short (a copy that did not finish) is not a finished run either
    write_safetensors(run / "network-0002000.safetensors", truncate=3)
    assert stage.stage_status(d) == ("unfinished", run)
    write_safetensors(run / "network-0002000.safetensors")
    assert stage.stage_status(d) == ("finished", run / "network-0002000.safetensors")
    # a run killed before its first training state holds nothing to resume: a new run is started
    e = tmp_path / "early"
    make_run(e, "00000-builtin_train", 2000, snapshots=(1,))
    assert stage.stage_status(e) == ("none", None)


def test_stage_status_prefers_finished_and_refuses_other_settings(tmp_path):
    d = tmp_path / "sfd" / "train"
    old = make_run(d, "00000-builtin_sfd", 4, states=(4,), snapshots=(4,), overrides={"sfd.forget": [0]}, method="sfd")
    make_run(d, "00001-builtin_sfd", 4, states=(2,), overrides={"sfd.forget": [0]}, method="sfd")
    assert stage.stage_status(d, ["sfd.forget=[0]"]) == ("finished", old / "network-0000004.safetensors")
    # asked for other settings than any run holds: refused with the difference, not reused
    with pytest.raises(stage.StageError, match=r"sfd.forget: run has \[0\], asked for \[3\]"):
        stage.stage_status(d, ["sfd.forget=[3]"])
    with pytest.raises(stage.StageError, match="made from builtin_sfd.yaml, asked for builtin_sid.yaml"):
        stage.stage_status(d, ["sfd.forget=[0]"], "configs/builtin_sid.yaml")
    # a method starting from a checkpoint takes its architecture from it, whatever was asked
    assert stage.stage_status(d, ["sfd.forget=[0]", "model.base_channels=64"])[0] == "finished"
    assert stage.stage_status(d, ["sfd.forget=[3]", "sfd.forget=[0]"])[0] == "finished"  # the last one wins
    # a path written another way is the same setting; numbers compare by value
    assert stage.stage_status(d, ["training.n_iters=4.0", f"data.root={Path.cwd() / 'data'}"])[0] == "finished"


def test_stage_status_refuses_a_run_being_written(tmp_path):
    import socket

    d = tmp_path / "teacher"
    run = make_run(d, "00000-builtin_train", 10, states=(2,))
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(stage.StageError, match="is being trained by"):
        stage.stage_status(d)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert stage.stage_status(d) == ("unfinished", run)  # a killed run's lock is not held


def test_samples_and_metrics_are_reused_only_when_complete_and_current(tmp_path):
    ckpt = tmp_path / "network-0000004.safetensors"
    write_safetensors(ckpt)
    samples = tmp_path / "row" / "samples"
    samples.mkdir(parents=True)
    args = ["--per-class", "2", "--sampler", "ddim", "--steps", "2", "--guidance", "0"]
    # killed before sample.py's final settings.json (complete: false), even with every image written
    settings = {"checkpoint_sha256": stage.file_hash(ckpt), "per_class": 2, "images_per_class": {"0": 2, "1": 2},
                "complete": False}
    (samples / "settings.json").write_text(json.dumps(settings))
    stage.command_file(samples).write_text(json.dumps({"command": args}))
    assert not stage.samples_done(samples, ckpt, args)  # interrupted: sample.py completes it
    settings.update(complete=True, images_per_class={"0": 2, "1": 1})
    (samples / "settings.json").write_text(json.dumps(settings))
    assert not stage.samples_done(samples, ckpt, args)  # an image missing
    settings.update(images_per_class={"0": 2, "1": 2})
    (samples / "settings.json").write_text(json.dumps(settings))
    assert stage.samples_done(samples, ckpt, args)
    assert not stage.samples_done(samples, ckpt, [*args[:-1], "2"])  # another guidance
    write_safetensors(ckpt, n_bytes=32)  # another checkpoint at the same path
    assert not stage.samples_done(samples, ckpt, args)

    result, evaluate_args = tmp_path / "row" / "ua.json", ["ua", "--images", str(samples)]
    assert not stage.metric_done(result, [str(samples / "settings.json")], evaluate_args)
    result.write_text(json.dumps({"command": ["evaluate.py", *evaluate_args]}))
    assert stage.metric_done(result, [str(samples / "settings.json")], evaluate_args)
    assert not stage.metric_done(result, [str(samples / "settings.json")], [*evaluate_args, "--batch", "8"])
    later = result.stat().st_mtime_ns + 10**9
    os.utime(samples / "settings.json", ns=(later, later))  # the images changed after the metric
    assert not stage.metric_done(result, [str(samples / "settings.json")], evaluate_args)


def test_estimate_counts_the_configured_work():
    cfg = stage._config("configs/cifar10_train.yaml", [])
    hours, text = stage.train_estimate(cfg)
    assert hours == pytest.approx(800000 * 128 / stage.EST_TRAIN_IMG_S / 3600)
    assert "800000 of 800000 iterations x batch 128" in text
    assert stage.train_estimate(cfg, done_iters=600000)[0] == pytest.approx(hours / 4)  # a resume costs the rest
    assert stage.nfe(cfg, "ddpm", None, 2.0) == 2000 and stage.nfe(cfg, "edm", 18, 0) == 35


# -- aggregate.py's table ------------------------------------------------------------------------------
@pytest.mark.parametrize("attacks", [False, True])
def test_aggregate_table_is_one_markdown_table(tmp_path, attacks):
    """table.md renders as exactly one table (CommonMark + GFM tables, markdown-it-py), one body row per
    model, every row as wide as the header."""
    from markdown_it import MarkdownIt

    aggregate = load("aggregate")
    for k, row in enumerate(("sfd", "retrain")):
        (tmp_path / row).mkdir()
        (tmp_path / row / "ua.json").write_text(json.dumps({"results": {"ua": 0.9, "remaining_accuracy": 0.8}}))
        (tmp_path / row / "fid.json").write_text(json.dumps({"results": {"classifier_fid": 3.0 + k}}))
        if attacks:
            (tmp_path / row / "attack.json").write_text(json.dumps({
                "settings": {"budgets": [0, 50]},
                "results": {"at_budget": {"noise": {"success_rate": 0.5}}, "embedding_best": {"success_rate": 0.25}}}))
    from click.testing import CliRunner
    result = CliRunner().invoke(aggregate.main, ["--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "table.md").read_text()
    tokens = MarkdownIt("commonmark").enable("table").parse(text)
    assert [t.type for t in tokens].count("table_open") == 1
    rows, row = [], None
    for t in tokens:
        if t.type == "tr_open":
            row = []
        elif t.type in ("th_open", "td_open"):
            row.append("")
        elif t.type == "inline" and row is not None and row and row[-1] == "":
            row[-1] = t.content
        elif t.type == "tr_close":
            rows.append(row)
            row = None
    header, body = rows[0], rows[1:]
    assert len(header) == 8 + 2 * attacks + 5 and header[0] == "model" and header[-1] == "ref. recall"
    assert [r[0] for r in body] == [name for _, name in aggregate.row_list(tmp_path)]  # the 6 paper rows
    assert all(len(r) == len(header) for r in body)
    sfd = body[[r[0] for r in body].index("SFD one-step")]
    assert sfd[header.index("FID (ours)")] == "3.000" and sfd[header.index("ref. FID")] == "5.32"
    assert "SPEC" not in text and "2409.11219" in text


# -- the scripts themselves ---------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.subprocess
def test_dry_run_prints_stages_commands_and_estimate_for_every_script(tmp_path):
    out = tmp_path / "paper"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "OUT": str(out), "DRY_RUN": "1"}
    procs = {p.name: subprocess.Popen(["bash", str(p.relative_to(TREE))], cwd=TREE, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for p in ROW_SCRIPTS}
    for name, proc in procs.items():
        text = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, f"{name}:\n{text}"
        assert "== train " in text or name == "edm_teacher.sh" or name == "pretrained.sh", name
        assert "+ " in text and "estimate:" in text and "GPU-hours in all" in text, f"{name}:\n{text}"
        assert "DRY_RUN: nothing was run" in text and "assumed, not measured: EST_TRAIN_IMG_S=" in text, name
    # the teacher at the paper's scale: 800k iterations of batch 128
    text = subprocess.run(["bash", "scripts/pretrained.sh", "--dry-run"], cwd=TREE, env=env, text=True,
                          capture_output=True).stdout
    assert "pretrain: 800000 of 800000 iterations x batch 128" in text and "50000 images x 1000 NFE" in text
    assert "+ " + sys.executable + " train.py --config configs/cifar10_train.yaml" in text
    assert "--root ./data" in text and "data.root=./data" in text
    assert not out.exists()  # nothing written


def tiny_env(out: Path, teacher_iters: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "DATASET": "builtin", "OUT": str(out),
            "TEACHER_ARGS": " ".join([*TINY, f"training.n_iters={teacher_iters}", "training.snapshot_every=12"]),
            "CLASSIFIER_ARGS": "--epochs 1 --builtin-per-class 60", "PER_CLASS": "2", "REF_PER_CLASS": "4",
            "DDPM_SAMPLER": "ddim", "DDPM_STEPS": "2", "FID_FEATURES": "classifier", "ATTACKS": "0", "GUIDED": "0"}


def files_and_times(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
@pytest.mark.subprocess
def test_killed_teacher_is_resumed_in_place_and_never_evaluated(tmp_path):
    """pretrained.sh killed while pretraining the teacher: the rerun resumes the same run folder to
    training.n_iters and evaluates that network; a third run does nothing."""
    out, n_iters = tmp_path / "paper", 24
    env = tiny_env(out, n_iters)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(["bash", "scripts/pretrained.sh"], cwd=TREE, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("teacher/*/training-state-*.pt")):
        assert proc.poll() is None and time.time() < deadline, (tmp_path / "first.log").read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    while time.time() < deadline:  # until the killed train.py is gone too (SIGKILL lands after a write)
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    (run,) = (out / "teacher").iterdir()
    assert not (run / f"network-{n_iters:07d}.safetensors").exists(), "the teacher finished before the kill"
    assert not (out / "pretrained").exists()

    second = subprocess.run(["bash", "scripts/pretrained.sh"], cwd=TREE, env=env, text=True, capture_output=True,
                            timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"unfinished: resume {run}" in second.stdout
    assert [p.name for p in (out / "teacher").iterdir()] == [run.name]  # no new run beside it
    settings = json.loads((out / "pretrained" / "samples" / "settings.json").read_text())
    assert settings["checkpoint"] == str(run / f"network-{n_iters:07d}.safetensors") and settings["step"] == n_iters
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, n_iters + 1))  # every iteration trained once, in one run

    before = files_and_times(out)
    third = subprocess.run(["bash", "scripts/pretrained.sh"], cwd=TREE, env=env, text=True, capture_output=True,
                           timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert files_and_times(out) == before  # no training, sampling or evaluation the second time
    assert "+ " not in third.stdout and "finished: reuse" in third.stdout
    # asking for another teacher length is refused, not answered with the old run
    other = subprocess.run(["bash", "scripts/pretrained.sh"], cwd=TREE, env=tiny_env(out, 48), text=True,
                           capture_output=True, timeout=600)
    assert other.returncode != 0 and "training.n_iters: run has 24, asked for 48" in other.stderr
    assert files_and_times(out) == before
