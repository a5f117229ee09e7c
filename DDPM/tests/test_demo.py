"""The main job (`make demo`) in a tiny budget, and the README's commands against the real scripts."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import TREE, run_script

REPORT_KEYS = {"forget_class", "override_class", "ua_teacher", "ua_sfd", "remaining_acc_teacher", "remaining_acc_sfd",
               "fid_teacher", "fid_sfd", "nfe_teacher", "nfe_sfd", "images_per_s_teacher", "images_per_s_sfd", "seconds"}


@pytest.mark.slow
def test_quick_demo_pipeline(tmp_path):
    out = tmp_path / "demo"
    proc = run_script("demo.py", "--quick", "--outdir", out)
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert report["forget_class"] == 0 and report["override_class"] == 1
    assert report["nfe_sfd"] == 1 and report["nfe_teacher"] == 8  # DDIM-3 = 4 grid timesteps (0, 333, 666, 999), guided
    assert report["images_per_s_sfd"] > report["images_per_s_teacher"]
    # the reported UAs are the ones evaluate.py measures on the saved samples with the saved classifier
    # (the quick budget makes their values meaningless, not their computation)
    for who in ("teacher", "sfd"):
        result = tmp_path / f"ua_{who}.json"
        run_script("evaluate.py", "ua", "--images", out / "samples" / who, "--classifier",
                   report["settings"]["classifier"], "--forget", "0", "--out", result)
        measured = json.loads(result.read_text())["results"]
        assert measured["ua"] == pytest.approx(report[f"ua_{who}"], abs=1e-12), who
        assert measured["remaining_accuracy"] == pytest.approx(report[f"remaining_acc_{who}"], abs=1e-12), who
    assert "classifier" in report["fid_kind"] and report["settings"]["teacher_sha256"]
    for name in ("report.md", "comparison.png", "curve.png"):
        assert (out / name).stat().st_size > 0
    assert "unlearning accuracy" in proc.stdout
    assert len(report["details"]["curve"]) == 3  # iteration 0 and the two SFD snapshots
    # the second run reuses the teacher
    proc = run_script("demo.py", "--quick", "--outdir", out)
    assert "reusing the teacher" in proc.stderr


def readme_commands():
    text = (TREE / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    lines = " ".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split("#")[0].strip() for line in lines if re.search(r"(python|torchrun .*?) \w+\.py", line)]


def test_readme_commands_use_real_scripts_and_options():
    """Every README command names a script of this tree and options its --help lists."""
    commands = readme_commands()
    assert len(commands) > 10
    helps = {}
    for cmd in commands:
        words = shlex.split(cmd.replace("$T", "T"))
        script = next(w for w in words if w.endswith(".py"))
        assert (TREE / script).exists(), cmd
        sub = words[words.index(script) + 1] if script == "evaluate.py" else None
        key = (script, sub)
        if key not in helps:
            helps[key] = run_script(script, *([sub] if sub else []), "--help").stdout
        after = words[words.index(script) + 1:]  # options before the script belong to torchrun
        for opt in (w.split("=")[0] for w in after if w.startswith("--")):
            assert opt in helps[key], f"{opt} of `{cmd}` is not an option of {script}"


def test_readme_dry_runs_resolve():
    out = run_script("train.py", "--config", "configs/cifar10_train.yaml", "--dry-run", "training.batch_size=64").stdout
    assert json.loads(out)["training"]["batch_size"] == 64
    from sfd_ddpm import config as C
    for name in ("cifar10_sfd", "cifar10_sid", "cifar10_sfd_2stage", "stl10_sfd", "stl10_train", "builtin_sfd"):
        cfg = json.loads(run_script("train.py", "--config", f"configs/{name}.yaml", "--dry-run").stdout)
        assert cfg == C.load_config(f"configs/{name}.yaml"), name  # the CLI resolves exactly as the library
        assert cfg["method"] == ("pretrain" if name.endswith("train") else "sid" if "sid" in name else "sfd"), name
