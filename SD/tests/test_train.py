"""train.py end to end on a tiny model: CLI, artefacts, exact resume, 2-process torchrun."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import SD_DIR, run_env

PROMPTS = SD_DIR / "prompts"


def base_args(sd_dir, out, *extra):
    """KEY=VALUE overrides of a tiny run (the batch of 2 is one iteration)."""
    return [f"sd_model={sd_dir}", f"remain_prompts={PROMPTS / 'remain_prompts_small.txt'}",
            f"forget_prompts={PROMPTS / 'brad_pitt_prompts.txt'}", "concept_to_forget=brad pitt",
            "concept_to_override=a middle aged man", "generator_init=teacher", "resolution=16", "batch=2",
            "grad_checkpointing=false", "lr_fake=1e-4", "lr_gen=1e-4", f"outdir={out}", *extra]


def invoke(args):
    from train import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_dry_run_resolves_prompts_without_loading_a_model(tmp_path):
    """The dry run reads the prompt files and substitutes the override, loads no model, writes nothing."""
    res = invoke(base_args(tmp_path / "no-such-model", tmp_path, "kappa_fake_eval=3", "alpha=1.2", "--dry-run"))
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output[res.output.index("{"):])
    assert cfg["kappa_fake_eval"] == 3.0 and cfg["kappa_teacher"] == 4.5 and cfg["alpha"] == 1.2
    assert cfg["resolved"]["forget_pairs"] == 55 and cfg["resolved"]["remain_prompts"] == 40
    forget = (PROMPTS / "brad_pitt_prompts.txt").read_text().splitlines()[0]
    override = re.sub("brad pitt", "a middle aged man", forget, flags=re.IGNORECASE)
    assert override != forget and cfg["resolved"]["example_pair"] == [forget, override]
    assert "NOT the paper's setting" in cfg["resolved"]["generator_init"]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["concept_to_override=null"], "override"),
    (["batch=3", "batch_gpu=2"], "not divisible"),
    (["t_min=500", "t_max=400"], "t_min"),
    (["sid_w_neg=true"], "negative_prompts"),
    (["sd_model=./no/such/folder"], "not found"),
    (["generator_init=missing-folder"], "folder not found"),
    (["generator_init=sid.pkl"], "convert_sid_lsg.py"),
    (["generator_init=null"], "generator_init is not set"),
    (["batch=0"], "batch must be >= 1, got 0"),
    (["batch=8.5"], "batch must be a whole number"),
    (["duration_kimg=-5"], "duration_kimg must be > 0"),
    (["lr_gen=fast"], "lr_gen must be a number"),
    (["alpah=1.2"], "did you mean 'alpha'"),
])
def test_bad_input_exits_nonzero_with_message(tiny_sd_dir, tmp_path, extra, message):
    res = CliRunner().invoke(__import__("train").main, base_args(tiny_sd_dir, tmp_path / "runs", *extra))
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), res.output
    assert message in res.output.strip().splitlines()[-1], res.output
    assert not (tmp_path / "runs").exists()  # nothing created


def test_list_keys_shows_every_key_with_its_default():
    from sfd_sd.config import schema_fields

    res = invoke(["--list-keys"])
    for f in schema_fields():
        assert f"\n{f.name} = " in "\n" + res.output, f.name
    assert "kappa_teacher = 4.5" in res.output and "generator_grad_clip_value = null" in res.output


def _state(run_dir: Path, nimg: int) -> dict:
    return torch.load(run_dir / f"training-state-{nimg:09d}.pt", weights_only=True)


def test_run_artefacts_and_exact_resume(tiny_sd_dir, tmp_path):
    """N steps straight == N/2 steps, resume, N/2 steps (identical weights on CPU)."""
    extra = [f"keywords={PROMPTS / 'nsfw_keywords.txt'}", f"negative_prompts={PROMPTS / 'nsfw_negative_prompt.txt'}",
             "sid_w_neg=true", "neg_fake_train=true", "ema_halflife_kimg=0.01",
             f"val_prompts={PROMPTS / 'brad_pitt_prompts_val.txt'}", "tick_kimg=0.002", "snap_kimg=0.004",
             "state_kimg=0.004", "seed=3"]
    res = invoke(base_args(tiny_sd_dir, tmp_path / "a", "duration_kimg=0.008", *extra))
    assert res.exit_code == 0, res.output
    run_a = next((tmp_path / "a").glob("00000-*"))
    names = {p.name for p in run_a.iterdir()}
    assert {"config.json", "log.jsonl", "grid-train-000000000.png", "grid-val-000000008.png",
            "network-snapshot-000000004", "network-snapshot-000000008", "training-state-000000008.pt"} <= names
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    log = [json.loads(line) for line in (run_a / "log.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in log] == [2, 4, 6, 8]
    for key in ("loss_fake_remain", "loss_fake_forget", "loss_gen_remain", "loss_gen_forget",
                "images_per_sec", "peak_memory_gb"):  # real numbers, not a 0.0 stand-in (test_faults: exact values)
        assert all(math.isfinite(r[key]) and r[key] != 0.0 for r in log), key
    assert all(r["loss_fake_remain"] != log[0]["loss_fake_remain"] for r in log[1:])  # fresh draws every step
    assert all(r["dropped_samples"] == 0 for r in log)
    snap = run_a / "network-snapshot-000000008"
    assert (snap / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((snap / "sfd_generator.json").read_text())["t_init"] == 625
    cfg = json.loads((run_a / "config.json").read_text())
    assert cfg["resolved"]["accumulation_rounds"] == 1 and cfg["sid_w_neg"] is True

    res = invoke(base_args(tiny_sd_dir, tmp_path / "b", "duration_kimg=0.004", *extra))
    assert res.exit_code == 0, res.output
    run_b = next((tmp_path / "b").glob("00000-*"))
    res = invoke(["--resume", run_b, "duration_kimg=0.008"])  # the run's own settings, longer
    assert res.exit_code == 0, res.output
    assert [p.name for p in (tmp_path / "b").iterdir()] == [run_b.name]  # continued in the same run dir
    log_b = [json.loads(line) for line in (run_b / "log.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in log_b] == [2, 4, 6, 8]
    assert json.loads((run_b / "config.json").read_text())["resolved"]["resumes"] == [
        {"images_seen": 4, "changed_settings": {}}]
    a, b = _state(run_a, 8), _state(run_b, 8)
    for key in ("fake_score", "generator", "generator_ema"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    first = _state(run_a, 4)
    assert not all(torch.equal(first["generator"][k], a["generator"][k]) for k in a["generator"])  # it trained


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tiny_sd_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py",
           *base_args(tiny_sd_dir, tmp_path, "batch=4", "batch_gpu=1", "duration_kimg=0.008",
                      "tick_kimg=0.004", "snap_kimg=0.008", "state_kimg=0.008", "device=cpu")]
    res = subprocess.run(cmd, cwd=SD_DIR, env=run_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = next(tmp_path.glob("00000-*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2 and cfg["resolved"]["accumulation_rounds"] == 2
    assert [json.loads(x)["images_seen"] for x in (run / "log.jsonl").read_text().splitlines()] == [4, 8]
    state = _state(run, 8)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["noise"], state["rng"][1]["noise"])
    assert (run / "network-snapshot-000000008" / "config.json").is_file()
