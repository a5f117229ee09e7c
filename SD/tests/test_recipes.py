"""The shell recipes resolve to the SPEC's SD defaults (dry run through torchrun, one process)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from conftest import SD_DIR, run_env


@pytest.mark.parametrize("recipe, forget_pairs, override", [
    ("celebrity.sh", 55, "a middle aged man"), ("nudity.sh", 12, "Boy")])
def test_recipe_dry_run(recipe, forget_pairs, override):
    env = run_env()
    env.update(NUM_GPUS="1", PATH=os.pathsep.join([str(SD_DIR.parent / ".venv" / "bin"), env["PATH"]]))
    res = subprocess.run(["bash", str(SD_DIR / "recipes" / recipe), "--dry-run"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    cfg = json.loads(res.stdout[res.stdout.index("{"):])
    assert (cfg["batch"], cfg["batch_gpu"], cfg["lr_fake"], cfg["lr_gen"], cfg["t_init"]) == (8, 8, 3e-6, 1e-6, 625)
    assert cfg["kappa_fake_train"] == cfg["kappa_fake_eval"] == cfg["kappa_teacher"] == 4.5
    assert cfg["resolved"]["forget_pairs"] == forget_pairs
    assert cfg["resolved"]["example_pair"][1].startswith(override)
