"""The configs carry the paper's settings; the thin recipes run them end to end on the tiny SD models."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import yaml

from conftest import SD_DIR, run_env

CONFIGS = {  # config -> (recipe, extra env, forget pairs, override prompt of the first forget prompt)
    "celebrity_brad_pitt.yaml": ("celebrity.sh", {}, 55, "a middle aged man"),
    "celebrity_angelina_jolie.yaml": ("celebrity.sh", {"CELEB": "angelina_jolie"}, 55, "a middle aged woman"),
    "nudity.yaml": ("nudity.sh", {}, 12, "Boy"),
}


def recipe(name, env_extra, *args, cwd=None):
    env = run_env()
    env.update(NUM_GPUS="1", PATH=os.pathsep.join([str(SD_DIR.parent / ".venv" / "bin"), env["PATH"]]), **env_extra)
    return subprocess.run(["bash", str(SD_DIR / "recipes" / name), *map(str, args)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_config_dry_run_prints_the_papers_settings(config, tmp_path):
    """Through the recipe (torchrun, one process), from another directory; nothing loaded or written."""
    name, env, _, _ = CONFIGS[config]
    res = recipe(name, env, "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads(res.stdout[res.stdout.index("{"):])
    assert cfg["generator_init"] == str(SD_DIR / "checkpoints" / "sid-lsg-sd15-cfg4.5-t625")
    assert cfg["sd_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert (cfg["lr_fake"], cfg["lr_gen"], cfg["t_init"], cfg["t_min"], cfg["t_max"], cfg["alpha"]) == \
        (3e-6, 1e-6, 625, 20, 980, 1.0)
    assert cfg["kappa_fake_train"] == cfg["kappa_fake_eval"] == cfg["kappa_teacher"] == 4.5
    assert (cfg["batch"], cfg["duration_kimg"], cfg["ema_halflife_kimg"]) == (8, 100.0, 0.0)
    assert cfg["w_fake_remain"] == cfg["w_fake_forget"] == cfg["w_gen_remain"] == cfg["w_gen_forget"] == 1.0
    assert cfg["remain_prompts"] == str(SD_DIR / "data" / "laion_aesthetics_6plus.txt")
    assert "prepare_remain_prompts.py" in cfg["resolved"]["prompts"]  # not built yet: said, not guessed
    assert "NOT FOUND" in cfg["resolved"]["generator_init"]
    assert not list(tmp_path.iterdir())


def test_config_refuses_to_run_without_the_generator_start(tmp_path):
    res = recipe("celebrity.sh", {}, cwd=tmp_path)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert "generator_init" in last and "convert_sid_lsg.py" in last and "generator_init=teacher" in last, last
    assert not list(tmp_path.iterdir())


def test_configs_hold_only_known_keys_and_agree():
    from sfd_sd.config import load_config

    loaded = {c: yaml.safe_load((SD_DIR / "configs" / c).read_text()) for c in CONFIGS}
    for c in CONFIGS:
        load_config(SD_DIR / "configs" / c)  # unknown keys or bad types would raise
    shared = set.intersection(*(set(d) for d in loaded.values()))
    method_keys = {k for k in shared if k not in ("desc", "outdir", "forget_prompts", "val_prompts",
                                                  "concept_to_forget", "concept_to_override")}
    for k in method_keys:  # the method settings are the same in every config
        assert len({json.dumps(d[k]) for d in loaded.values()}) == 1, k


@pytest.mark.parametrize("config", list(CONFIGS))
def test_recipe_runs_end_to_end_on_tiny_models(config, tiny_sd_dir, converted_generator, tmp_path):
    """The paper's config through its recipe with a tiny teacher and a converted tiny SiD-LSG start;
    relative paths in the arguments resolve against the caller's directory."""
    name, env, pairs, _ = CONFIGS[config]
    (tmp_path / "remain.txt").write_text("a photo of a cat\na dog in a park\n")
    res = recipe(name, env, f"sd_model={tiny_sd_dir}", f"generator_init={converted_generator}",
                 "remain_prompts=remain.txt", "outdir=runs", "resolution=16", "batch=2", "duration_kimg=0.002",
                 "tick_kimg=0.002", "snap_kimg=0.002", "state_kimg=0.002", "grad_checkpointing=false", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = next((tmp_path / "runs").glob("00000-*"))
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["remain_prompts"] == str(tmp_path / "remain.txt") and cfg["resolved"]["remain_prompts"] == 2
    assert cfg["resolved"]["forget_pairs"] == pairs and cfg["kappa_teacher"] == 4.5
    assert (run / "network-snapshot-000000002" / "diffusion_pytorch_model.safetensors").is_file()
    assert (run / "training-state-000000002.pt").is_file()
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["images_seen"] for r in log] == [2]


LORA_CONFIGS = {  # LoRA config -> (its full-mode config, recipe, extra env)
    "celebrity_brad_pitt_lora.yaml": ("celebrity_brad_pitt.yaml", "celebrity.sh", {}),
    "celebrity_angelina_jolie_lora.yaml": ("celebrity_angelina_jolie.yaml", "celebrity.sh", {"CELEB": "angelina_jolie"}),
    "nudity_lora.yaml": ("nudity.yaml", "nudity.sh", {}),
}
LORA_ONLY = {"adapter", "lora_rank", "lora_alpha", "lora_targets", "lora_dropout", "batch_gpu", "grad_checkpointing",
             "lr_fake", "lr_gen", "outdir"}


@pytest.mark.parametrize("config", list(LORA_CONFIGS))
def test_lora_config_dry_run_prints_its_settings_and_memory_plan(config, tmp_path):
    """ADAPTER=lora picks the *_lora.yaml config (one process); the paper's method settings are kept and
    the computed plan of the settings (SD v1.5, 512 px, bf16, per-GPU batch 1, checkpointing) is printed."""
    from sfd_sd.config import load_config

    full, name, env = LORA_CONFIGS[config]
    res = recipe(name, dict(env, ADAPTER="lora"), "--dry-run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads(res.stdout[res.stdout.index("{"):])
    assert (cfg["adapter"], cfg["lora_rank"], cfg["lora_alpha"], cfg["batch"], cfg["batch_gpu"]) == ("lora", 16, 16.0, 8, 1)
    assert cfg["lora_targets"] == ["to_q", "to_k", "to_v", "to_out.0"] and cfg["grad_checkpointing"] is True
    paper = load_config(SD_DIR / "configs" / full).to_json()
    assert {k: v for k, v in cfg.items() if k not in LORA_ONLY | {"resolved"}} == \
        {k: v for k, v in paper.items() if k not in LORA_ONLY | {"resolved"}}
    plan = cfg["resolved"]["memory_plan"]
    assert plan["adapter"] == "lora" and plan["batch_gpu"] == 1 and plan["resolution"] == 512
    assert plan["adapter_parameters"] == 3_188_736 and plan["peak_gb"] < 16 and plan["static_total_gb"] < 4.5
    assert not list(tmp_path.iterdir())


def test_recipe_refuses_an_unknown_adapter(tmp_path):
    res = recipe("nudity.sh", {"ADAPTER": "qlora"}, "--dry-run", cwd=tmp_path)
    assert res.returncode == 2 and "ADAPTER must be full or lora" in res.stderr
