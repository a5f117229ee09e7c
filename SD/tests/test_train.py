"""train.py end to end on a tiny model: CLI, artefacts, exact resume, 2-process torchrun."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import SD_DIR, run_env

PROMPTS = SD_DIR / "prompts"


def base_args(sd_dir, out, *extra):
    return ["--sd-model", str(sd_dir), "--remain-prompts", str(PROMPTS / "remain_prompts_small.txt"),
            "--forget-prompts", str(PROMPTS / "brad_pitt_prompts.txt"), "--concept-to-forget", "brad pitt",
            "--concept-to-override", "a middle aged man", "--resolution", "16", "--batch", "2",
            "--no-grad-checkpointing", "--lr-fake", "1e-4", "--lr-gen", "1e-4", "--outdir", str(out), *extra]


def invoke(args):
    from train import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def test_dry_run_prints_resolved_config(tiny_sd_dir, tmp_path):
    res = invoke(base_args(tiny_sd_dir, tmp_path, "--dry-run"))
    assert res.exit_code == 0, res.output
    cfg = json.loads(res.output)
    assert cfg["t_init"] == 625 and cfg["kappa_teacher"] == 4.5 and cfg["alpha"] == 1.0
    assert cfg["resolved"]["forget_pairs"] == 55
    assert cfg["resolved"]["example_pair"][1].startswith("a middle aged man")
    assert not (tmp_path / "00000-sfd").exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--concept-to-override", None], "override"),
    (["--batch", "3", "--batch-gpu", "2"], "not divisible"),
    (["--t-min", "500", "--t-max", "400"], "t-min"),
    (["--sid-w-neg", "FLAG"], "negative-prompts"),
    (["--sd-model", "./no/such/folder"], "not found"),
    (["--init-generator", "missing.pkl"], "no such file"),
])
def test_bad_input_exits_nonzero_with_message(tiny_sd_dir, tmp_path, extra, message):
    args = base_args(tiny_sd_dir, tmp_path)
    for i in range(0, len(extra), 2):
        k = args.index(extra[i]) if extra[i] in args else None
        if k is not None:
            del args[k:k + 2]
        if extra[i + 1] == "FLAG":
            args.append(extra[i])
        elif extra[i + 1] is not None:
            args += [extra[i], extra[i + 1]]
    res = CliRunner().invoke(__import__("train").main, args + ["--duration", "0.002"])
    assert res.exit_code != 0
    assert message in res.output, res.output


def test_pickle_init_needs_opt_in(tiny_sd_dir, tmp_path):
    import pickle

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(0.25)
    with open(tmp_path / "sid_lsg.pkl", "wb") as f:
        pickle.dump({"ema": unet}, f)
    args = base_args(tiny_sd_dir, tmp_path / "runs", "--init-generator", str(tmp_path / "sid_lsg.pkl"),
                     "--duration", "0.002", "--lr-gen", "1e-12")
    res = CliRunner().invoke(__import__("train").main, args)
    assert res.exit_code != 0 and "--allow-pickle" in res.output
    res = invoke(args + ["--allow-pickle"])
    assert res.exit_code == 0, res.output
    snap = next((tmp_path / "runs").glob("*/network-snapshot-*"))
    loaded = UNet2DConditionModel.from_pretrained(snap)
    assert torch.allclose(loaded.conv_out.bias, torch.full_like(loaded.conv_out.bias, 0.25), atol=1e-6)


def _state(run_dir: Path, nimg: int) -> dict:
    return torch.load(run_dir / f"training-state-{nimg:09d}.pt", weights_only=True)


def test_run_artefacts_and_exact_resume(tiny_sd_dir, tmp_path):
    """N steps straight == N/2 steps, resume, N/2 steps (identical weights on CPU)."""
    extra = ["--keywords", str(PROMPTS / "nsfw_keywords.txt"), "--negative-prompts",
             str(PROMPTS / "nsfw_negative_prompt.txt"), "--sid-w-neg", "--neg-in-fake-train", "--ema", "0.01",
             "--val-prompts", str(PROMPTS / "brad_pitt_prompts_val.txt"), "--tick", "0.002", "--snap", "0.004",
             "--state", "0.004", "--seed", "3"]
    res = invoke(base_args(tiny_sd_dir, tmp_path / "a", "--duration", "0.008", *extra))
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

    res = invoke(base_args(tiny_sd_dir, tmp_path / "b", "--duration", "0.004", *extra))
    assert res.exit_code == 0, res.output
    run_b = next((tmp_path / "b").glob("00000-*"))
    res = invoke(base_args(tiny_sd_dir, tmp_path / "b", "--duration", "0.008", "--resume", str(run_b), *extra))
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
           *base_args(tiny_sd_dir, tmp_path, "--batch", "4", "--batch-gpu", "1", "--duration", "0.008",
                      "--tick", "0.004", "--snap", "0.008", "--state", "0.008", "--device", "cpu")]
    res = subprocess.run(cmd, cwd=SD_DIR, env=run_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = next(tmp_path.glob("00000-*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["resolved"]["world_size"] == 2 and cfg["resolved"]["accumulation_rounds"] == 2
    assert [json.loads(x)["images_seen"] for x in (run / "log.jsonl").read_text().splitlines()] == [4, 8]
    state = _state(run, 8)
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["noise"], state["rng"][1]["noise"])
    assert (run / "network-snapshot-000000008" / "config.json").is_file()
