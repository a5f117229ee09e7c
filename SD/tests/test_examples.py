"""examples/tiny.sh: the whole pipeline (models, convert, train, generate, export, evaluate) on tiny
random models, run as a user runs it, from another directory."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import SD_DIR, run_env


def tiny_sh(work, cwd):
    env = dict(run_env(), PYTHON=sys.executable)
    return subprocess.run(["bash", str(SD_DIR / "examples" / "tiny.sh"), str(work)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_tiny_example_runs_every_stage(tmp_path):
    work = tmp_path / "w"
    res = tiny_sh(work, tmp_path)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    run = next((work / "runs").glob("00000-sfd-brad-pitt-*"))
    assert [json.loads(x)["images_seen"] for x in (run / "log.jsonl").read_text().splitlines()] == [2, 4]
    assert (run / "network-snapshot-000000004" / "config.json").is_file()
    for model in ("sfd", "sd15"):
        manifest = json.loads((work / "out" / model / "manifest.json").read_text())
        assert manifest["complete"] and len(manifest["images"]) == 12  # 6 prompts x 2 seeds
        assert all((work / "out" / model / r["path"]).is_file() for r in manifest["images"])
    assert json.loads((work / "export" / "model_index.json").read_text())["_class_name"][1] == "SFDOneStepPipeline"
    clip = json.loads((work / "metrics" / "sfd-clip.json").read_text())["totals"]
    fid = json.loads((work / "metrics" / "sfd-fid.json").read_text())["totals"]
    assert clip["images"] == 12 and 0 <= clip["clip_score"] <= 100 and fid["fid_vs_original"] >= 0
    assert "| SFD |" in (work / "metrics" / "table.md").read_text()

    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    again = tiny_sh(work, tmp_path)  # a second run into the same folder is refused, nothing touched
    assert again.returncode == 1 and "exists" in again.stderr.strip().splitlines()[-1]
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before
