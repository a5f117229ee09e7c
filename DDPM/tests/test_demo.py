"""The main job (`make demo`) in a tiny budget, and the README's commands against the real scripts."""
from __future__ import annotations

import json
import re
import shlex

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import demo
from conftest import TREE, run_script

REPORT_KEYS = {"forget_class", "override_class", "protocol", "fid_kind", "rows", "skipped", "curves", "seconds",
               "stage_seconds", "settings"}
ROW_KEYS = {"key", "model", "title", "label", "variant", "nfe", "distillation_target", "checkpoint", "sha256",
            "samples", "metrics", "per_seed"}


@pytest.mark.slow
def test_quick_demo_pipeline(tmp_path):
    """demo.py --quick: four rows (teacher unguided and guided, SFD, SFD guided) under the protocol, every
    number a mean with a t interval over the sampling seeds; each seed's UA is what evaluate.py measures on
    that seed's saved images; the markdown shows the JSON's numbers."""
    from sfd_ddpm.demo_report import fmt
    from sfd_ddpm.protocol import mean_interval

    out = tmp_path / "demo"
    proc = run_script("demo.py", "--quick", "--outdir", out, "--sampling-seeds", "3", "--guidance", "1.5")
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and report["skipped"] == {}
    assert report["forget_class"] == 0 and report["override_class"] == 1
    rows = {r["key"]: r for r in report["rows"]}
    # --guidance 1.5 differs from builtin_sfd_guided.yaml's w = 2: the teacher gets a third row at w = 2,
    # the guided generator's distillation target
    assert list(rows) == ["teacher_unguided", "teacher_guided", "teacher_w2", "sfd", "sfd_guided"]
    assert all(ROW_KEYS <= set(r) for r in rows.values())
    # the protocol's settings reach the samplers: DDIM-3 = 4 grid timesteps (0, 333, 666, 999), guided x2
    assert [rows[k]["variant"]["guidance"] for k in rows] == [0.0, 1.5, 2.0, 0.0, 0.0]
    assert [rows[k]["nfe"] for k in rows] == [4, 8, 8, 1, 1]
    assert rows["teacher_guided"]["variant"]["header"] == "DDIM-3, w=1.5, 8 NFE"
    # each generator as distilled: w from its run's sfd.guidance, its target the teacher at that w
    w_guided = report["settings"]["sfd"]["sfd_guided"]["sfd_config"]["guidance"]
    assert w_guided > 0 and rows["sfd_guided"]["variant"]["w"] == w_guided
    assert rows["sfd"]["variant"]["w"] == 0.0 and rows["sfd"]["distillation_target"] == "teacher_unguided"
    assert rows["sfd_guided"]["distillation_target"] == f"teacher_w{w_guided:g}"
    # every metric: 3 seeds, the interval of the per-seed values; each seed's UA = evaluate.py on its images
    for key, row in rows.items():
        assert [p["seed"] for p in row["per_seed"]] == [0, 1, 2], key
        for name, interval in row["metrics"].items():
            assert interval == mean_interval([p[name] for p in row["per_seed"]]), (key, name)
        assert row["metrics"]["ua"]["n"] == 3 and row["metrics"]["ua"]["half"] is not None
    for key in ("teacher_guided", "sfd_guided"):
        for seed in (0, 2):
            result = tmp_path / f"ua_{key}_{seed}.json"
            run_script("evaluate.py", "ua", "--images", out / "samples" / key / f"seed{seed}", "--classifier",
                       report["settings"]["classifier"], "--forget", "0", "--out", result)
            measured = json.loads(result.read_text())["results"]
            assert measured["ua"] == pytest.approx(rows[key]["per_seed"][seed]["ua"], abs=1e-12), key
            assert measured["remaining_accuracy"] == pytest.approx(rows[key]["per_seed"][seed]["remaining_acc"],
                                                                   abs=1e-12), key
    # the sampling seeds are different draws
    fids = [p["classifier_fid"] for p in rows["teacher_unguided"]["per_seed"]]
    assert len(set(fids)) == 3
    # the markdown cells are the JSON's numbers
    md = (out / "report.md").read_text()
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if line.startswith("| ")}
    order = [r["key"] for r in report["rows"]]
    assert cells["classifier-feature FID, remaining classes (lower = better)"] == \
        [fmt(rows[k]["metrics"]["classifier_fid"]) for k in order]
    assert cells["unlearning accuracy (class 0), higher = forgotten"] == [fmt(rows[k]["metrics"]["ua"]) for k in order]
    assert cells["network evaluations per image"] == [str(rows[k]["nfe"]) for k in order]
    assert "95% Student-t interval over 3 sampling seeds" in md
    # a 6-iteration teacher cannot judge forgetting: the report's first lines say so, with its measured accuracies
    check = report["teacher_check"]
    head = "\n".join(md.splitlines()[:5])
    assert check["warning"] and f"**WARNING: {check['warning']}.**" in head
    for v, key in zip(check["variants"], ("teacher_unguided", "teacher_guided", "teacher_w2")):
        m = rows[key]["metrics"]
        assert v["forget_acc"] == pytest.approx(1 - m["ua"]["mean"]) and v["remaining_acc"] == m["remaining_acc"]["mean"]
        assert (f"draws class 0 (red square) as itself {v['forget_acc']:.2f} of the time and the remaining classes "
                f"correctly {v['remaining_acc']:.2f}" in head) == v["weak"]
    assert rows["sfd"]["teacher_accuracy"]["of"] == "teacher_unguided"
    # the references the FID used, as read (8 per remaining class at --quick), and the flip settings
    ref = report["protocol"]["reference"]
    assert ref["n_images"] == 72 and set(ref["per_class"].values()) == {8} and ref["feature_dim"] > 0
    assert "72 real images of the remaining classes from the test split (8 per class)" in md
    small = min(72, ref["generated_per_seed"]) < ref["feature_dim"]   # 3 images x 9 classes per seed at --quick
    assert ref["generated_per_seed"] == 27 and (ref["warning"] is not None) == small
    assert "Random left-right flips" in md
    assert "classifier" in report["fid_kind"] and report["settings"]["teacher_sha256"]
    for name in ("report.md", "comparison.png", "curve.png"):
        assert (out / name).stat().st_size > 0
    assert "unlearning accuracy" in proc.stdout
    # both SFD runs have a curve: iteration 0 and the two snapshots; they trained side by side
    assert {k: len(v["points"]) for k, v in report["curves"].items()} == {"sfd": 3, "sfd_guided": 3}
    assert (out / "sfd.log").exists() and (out / "sfd_guided.log").exists()
    # the second run reuses the teacher; a missing guided config is skipped with its reason
    proc = run_script("demo.py", "--quick", "--outdir", out, "--sampling-seeds", "1", "--guided-config",
                      tmp_path / "missing.yaml")
    assert "reusing the teacher" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert "missing.yaml does not exist" in report["skipped"]["sfd_guided"]
    assert [r["key"] for r in report["rows"]] == ["teacher_unguided", "teacher_guided", "sfd"]
    assert report["rows"][0]["metrics"]["ua"]["half"] is None and "Not run: sfd_guided" in (out / "report.md").read_text()


@pytest.mark.slow
def test_quick_demo_on_the_edm_backbone(tmp_path):
    """--backbone edm: the teacher's rows use EDM's Heun sampler; the guided SFD run is skipped, said so."""
    out = tmp_path / "demo"
    run_script("demo.py", "--quick", "--backbone", "edm", "--outdir", out, "--sampling-seeds", "2")
    report = json.loads((out / "report.json").read_text())
    rows = {r["key"]: r for r in report["rows"]}
    assert list(rows) == ["teacher_unguided", "teacher_guided", "sfd"]
    assert [(r["variant"]["sampler"], r["variant"]["steps"], r["nfe"]) for r in rows.values()] == \
        [("edm", 2, 3), ("edm", 2, 6), ("one_step", 1, 1)]   # Heun-2: 3 evaluations, guided x2
    assert report["skipped"] == {"sfd_guided": "no guided SFD config for the edm backbone"}
    cfg = json.loads((next((out / "sfd").iterdir()) / "config.json").read_text())
    assert cfg["model"]["arch"] == "songunet" and cfg["sfd"]["fake_score_levels"] == "pretrain"


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


def image_folder(root, counts: dict[str, int], size: int = 8):
    """Class folders of random PNGs: {class name: number of images}."""
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def stop_at_first_stage(monkeypatch):
    """demo.run records the command of the first stage (the classifier) and stops the demo there."""
    seen = []

    def run(cmd):
        seen.append([str(c) for c in cmd])
        raise RuntimeError("stopped before training")
    monkeypatch.setattr(demo, "run", run)
    return seen


def test_demo_outputs_default_to_the_repository_runs_from_any_cwd(tmp_path, monkeypatch):
    """No --outdir: runs/demo at the repository root (where `make demo`, cd DDPM && --outdir ../runs/demo,
    writes), from any current directory; an explicit --outdir and --data-root are relative to the cwd."""
    from sfd_ddpm import demo_report
    assert demo_report.default_dir("demo") == TREE.parent / "runs" / "demo" == (TREE / "../runs/demo").resolve()
    make = (TREE.parent / "Makefile").read_text()
    assert "cd DDPM && $(abspath $(PY)) demo.py --outdir ../runs/demo" in make
    monkeypatch.setattr(demo_report, "REPO_RUNS", tmp_path / "repo_runs")   # the test writes nothing into the repo
    monkeypatch.chdir(tmp_path)
    seen = stop_at_first_stage(monkeypatch)
    assert isinstance(CliRunner().invoke(demo.main, ["--quick"]).exception, RuntimeError)
    assert seen[-1][seen[-1].index("--out") + 1] == str(tmp_path / "repo_runs" / "demo" / "classifier.safetensors")
    image_folder(tmp_path / "imgs", {"a": 4, "b": 4, "c": 4})
    CliRunner().invoke(demo.main, ["--quick", "--outdir", "mine", "--data-root", "imgs", "--image-size", "8"])
    cmd = seen[-1]
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "mine" / "classifier.safetensors")
    assert cmd[cmd.index("--root") + 1] == str(tmp_path / "imgs")   # the stages run inside DDPM/


def test_demo_refuses_a_folder_too_small_for_its_references_before_training(tmp_path, monkeypatch):
    """Two classes of 5 images: the remaining class holds out 1 image and FID needs 2: one line saying
    how many images the class needs, before any stage runs and before the output folder is made."""
    seen = stop_at_first_stage(monkeypatch)
    root = image_folder(tmp_path / "tiny", {"cat": 5, "dog": 5})
    result = CliRunner().invoke(demo.main, ["--quick", "--data-root", str(root), "--image-size", "8",
                                            "--outdir", str(tmp_path / "out"), "--forget", "cat", "--override", "dog"])
    assert result.exit_code == 2 and not seen and not (tmp_path / "out").exists()
    assert "the FID needs at least 2: give a remaining class at least 15 images" in result.output
    image_folder(tmp_path / "enough", {"cat": 5, "dog": 15})   # dog holds out 2: the demo starts
    result = CliRunner().invoke(demo.main, ["--quick", "--data-root", str(tmp_path / "enough"), "--image-size", "8",
                                            "--outdir", str(tmp_path / "out"), "--forget", "cat", "--override", "dog"])
    assert isinstance(result.exception, RuntimeError) and seen


def test_report_states_the_references_read_and_warns_below_the_feature_dimension(tmp_path):
    """A small folder holds out 1-2 images per class, not the 200 requested: the record counts what was read,
    the report says so, and warns that FID is unstable with fewer references than feature dimensions."""
    from sfd_ddpm.classifiers import SmallCNN
    from sfd_ddpm.demo_report import feature_dim, reference_set, reference_summary, report_markdown
    from sfd_ddpm.folder_data import load_folder

    root = image_folder(tmp_path / "digits", {"0": 12, "1": 15, "2": 12})
    data = {"dataset": "folder", "root": str(root), "image_size": 8}
    ref, record = reference_set(0, 200, data)
    test = load_folder(root, 8, "test")
    read = sum(1 for t in test.targets if t != 0)
    assert record["n_images"] == len(ref) == read == 3 and record["per_class"] == {"1": 2, "2": 1}
    dim = feature_dim(SmallCNN(3, 3, 4), ref)
    summary = reference_summary(record, dim, generated_per_seed=2 * 17)
    assert summary["feature_dim"] == dim > 3 and "holds 3 real images, fewer than the" in summary["warning"]
    assert reference_summary({**record, "n_images": dim}, dim)["warning"] is None
    report = {"forget_class": 0, "override_class": 1, "classifier_test_accuracy": None, "classifier_warning": None,
              "classifier_hflip": True, "skipped": {}, "stage_seconds": {}, "seconds": 1.0, "rows": [],
              "dataset": {"name": "folder", "root": str(root), "class_names": ["0", "1", "2"], "random_flip": False},
              "protocol": {"sampling_seeds": [0], "images_per_class_per_seed": 17, "guidance": 2.0,
                           "reference_images_per_class": 200, "reference": summary}}
    md = report_markdown(report)
    assert "against 3 real images of the remaining classes from the held-out split of the class folder (1-2 per " \
           f"class), in the classifier's {dim}-dimensional feature space" in md and "200 real" not in md
    assert f"**WARNING: {summary['warning']}.**" in md
    assert "Random left-right flips: teacher training off (data.random_flip), evaluation classifier on." in md


def minimal_report(names, forget, override, choice, root="imgs"):
    """The report fields report_markdown reads, no rows (the class lines come before any table)."""
    return {"forget_class": forget, "override_class": override, "class_choice": choice,
            "classifier_test_accuracy": 0.97, "classifier_warning": None, "classifier_hflip": False, "skipped": {},
            "stage_seconds": {}, "seconds": 1.0, "rows": [],
            "dataset": {"name": "folder", "root": root, "class_names": names, "random_flip": False},
            "protocol": {"sampling_seeds": [0], "images_per_class_per_seed": 17, "guidance": 2.0,
                         "reference_images_per_class": 200, "reference": None}}


def test_demo_forgets_and_overrides_by_folder_name(tmp_path, monkeypatch):
    """--forget four --override eight on a folder: the SFD runs get those classes (by index, as train.py reads
    them back), the report is told they were the user's choice, and its first lines name them and say how to
    change them; with no --forget/--override the first two sorted folder names, said to be the defaults."""
    from sfd_ddpm import demo_report
    from sfd_ddpm.demo_report import report_markdown

    root = image_folder(tmp_path / "digits", {"eight": 15, "five": 15, "four": 15})
    seen = {}
    monkeypatch.setattr(demo, "run", lambda cmd: seen.setdefault("stages", []).append([str(c) for c in cmd]))
    from sfd_ddpm import teacher_budget

    def sized_teacher(parent, cmd, n_train, batch, minutes, clf, forget, run, rule):
        seen["teacher"] = {"cmd": [str(c) for c in cmd], "n_train": n_train, "batch": batch, "minutes": minutes,
                           "forget": forget, "rule": rule}
        return {"checkpoint": str(tmp_path / "teacher_run" / "network-0000042.safetensors"), "checks": [
            {"epoch": 1, "accuracy": 0.5, "forget_acc": 0.5, "remaining_acc": 0.5}], "epochs": 1, "iterations": 42,
            "batch_size": batch, "n_train": n_train, "seconds": 1.0, "stop_reason": "time", "budget_minutes": minutes,
            "rule": rule}
    monkeypatch.setattr(teacher_budget, "train_sized_teacher", sized_teacher)

    def run_parallel(jobs, logs):
        seen["jobs"] = {k: [str(c) for c in v] for k, v in jobs.items()}
        for name in jobs:
            (logs / name / "run").mkdir(parents=True)
        return {name: {} for name in jobs}
    monkeypatch.setattr(demo, "run_parallel", run_parallel)
    monkeypatch.setattr(demo_report, "evaluate_and_report",
                        lambda *a, **kw: seen.update(forget=a[4], override=a[5], choice=kw["class_choice"]))
    args = ["--quick", "--data-root", str(root), "--image-size", "8", "--outdir", str(tmp_path / "out"),
            "--retrain-teacher"]
    result = CliRunner().invoke(demo.main, [*args, "--forget", "four", "--override", "eight", "--teacher-minutes", "2.5"])
    assert result.exit_code == 0, result.output
    # the teacher is sized to the folder: its 39 training images (15 a class, 2 held out), the budget given, the
    # quick rule; its command trains on the folder at 8 px, without the fixed iteration count, and no flips
    t = seen["teacher"]
    assert (t["n_train"], t["batch"], t["minutes"], t["forget"], t["rule"]) == (39, 8, 2.5, 2, teacher_budget.QUICK_RULE)
    assert "data.image_size=8" in t["cmd"] and f"data.root={root}" in t["cmd"]
    assert not any(c.startswith("training.n_iters=") for c in t["cmd"])
    from sfd_ddpm.config import load_config
    from sfd_ddpm.data import with_flip_resolved
    cfg = load_config(demo.TREE / t["cmd"][t["cmd"].index("--config") + 1], t["cmd"][t["cmd"].index("--outdir") + 2:])
    assert with_flip_resolved(cfg)["data"]["random_flip"] is False
    assert all(c.split("=")[0] in [k.split("=")[0] for k in t["cmd"]] for c in teacher_budget.GRID)
    assert "Teacher sized to the folder: 1 epochs (42 iterations" in result.output
    assert all(f"sfd.init={tmp_path / 'teacher_run' / 'network-0000042.safetensors'}" in cmd
               for cmd in seen["jobs"].values())
    assert (seen["forget"], seen["override"]) == (2, 0) and seen["choice"] == {"forget": "four", "override": "eight"}
    for cmd in seen["jobs"].values():
        assert "sfd.forget=[index:2]" in cmd and "sfd.override=index:0" in cmd
    assert "forget class 2 (four) into class 0 (eight)" in result.output
    first = report_markdown(minimal_report(["eight", "five", "four"], 2, 0, seen["choice"])).splitlines()[:3]
    assert first[2] == ("**Forget class 2 (four) into override 0 (eight)**, as given (--forget four --override "
                        "eight). To choose others: `python demo.py --data-root imgs --forget NAME --override NAME` "
                        "(a class name or index; classes: 0=eight, 1=five, 2=four).")
    result = CliRunner().invoke(demo.main, args)
    assert result.exit_code == 0, result.output
    assert (seen["forget"], seen["override"]) == (0, 1) and seen["choice"] == {"forget": None, "override": None}
    assert seen["teacher"]["minutes"] == 6.0   # the default budget
    # no --image-size: the images' own size (12 px here; the built-in dataset's 16 before)
    wide = image_folder(tmp_path / "wide", {"a": 15, "b": 15}, size=12)
    result = CliRunner().invoke(demo.main, ["--quick", "--data-root", str(wide), "--outdir", str(tmp_path / "out2")])
    assert result.exit_code == 0, result.output
    assert "data.image_size=12" in seen["teacher"]["cmd"]
    assert all("sfd.forget=[index:0]" in cmd for cmd in seen["jobs"].values())
    first = report_markdown(minimal_report(["eight", "five", "four"], 0, 1, seen["choice"])).splitlines()[2]
    assert first.startswith("**Forget class 0 (eight) into override 1 (five)**, the defaults: the first two folder "
                            "names in sorted order. To choose others: `python demo.py --data-root imgs --forget NAME")
    help_text = " ".join(CliRunner().invoke(demo.main, ["--help"]).output.split())
    assert "Default: class 0, the first name in sorted order (with --data-root, the first folder name)" in help_text
    assert "the report's first lines name the classes chosen" in help_text
    assert "(with --data-root, the second folder name)" in help_text


def demo_rows(teacher_forget, teacher_remaining, guided_forget=0.98, guided_remaining=0.97):
    """Teacher rows (unguided, guided) with the given per-seed accuracies and an SFD row distilled from the
    unguided one, shaped as evaluate_and_report builds them."""
    from sfd_ddpm.protocol import mean_interval

    def row(key, model, label, forget_acc, remaining, target=None):
        metrics = {"ua": mean_interval([1 - a for a in forget_acc]), "remaining_acc": mean_interval(remaining),
                   **{k: mean_interval([0.5, 0.5]) for k in ("override_rate", "classifier_fid", "images_per_s")}}
        return {"key": key, "model": model, "title": model, "label": label, "metrics": metrics, "nfe": 1,
                "variant": {"header": label}, "distillation_target": target}
    return [row("teacher_unguided", "teacher", "teacher (w=0)", teacher_forget, teacher_remaining),
            row("teacher_guided", "teacher", "teacher (w=2)", [guided_forget] * 2, [guided_remaining] * 2),
            {**row("sfd", "sfd", "SFD (w=0)", [0.05, 0.15], [0.5, 0.6], "teacher_unguided"), "speedup_vs_target": 50.0}]


def test_report_warns_in_its_first_lines_when_the_teacher_cannot_judge():
    """An undertrained teacher (unguided: class 0 drawn as itself 0.69 of the time, the remaining classes
    right 0.38): the warning and both accuracies in the report's first lines, and the teacher's accuracy
    beside every UA (a generator's: its distillation target's); a good teacher: no warning. The thresholds
    hold at the boundary (0.79 warns, 0.81 does not)."""
    from sfd_ddpm.demo_report import TEACHER_MIN_FORGET, TEACHER_MIN_REMAINING, attach_teacher_accuracy, report_markdown

    assert TEACHER_MIN_FORGET == TEACHER_MIN_REMAINING == 0.80
    rows = demo_rows([0.65, 0.73], [0.36, 0.40])
    check = attach_teacher_accuracy(rows, 0, "eight")
    report = {**minimal_report(["eight", "five", "four"], 0, 1, {}), "rows": rows, "teacher_check": check}
    md = report_markdown(report)
    first = "\n".join(md.splitlines()[:5])
    assert ("**WARNING: the teacher is too weak to judge forgetting: teacher (w=0) draws class 0 (eight) as itself "
            "0.69 of the time and the remaining classes correctly 0.38 (this report asks for at least 0.80 and 0.80)"
            in first), first
    assert "teacher (w=2)" not in first and "the table below is not a result" in first
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if line.startswith("| ")}
    names = list(cells)
    assert names[1] == "unlearning accuracy (class 0), higher = forgotten"
    assert names[2] == "the teacher's own accuracy at this w: class 0 / remaining"
    assert cells[names[2]][0] == cells[names[2]][2] == "0.690 ± 0.508 / 0.380 ± 0.254"   # SFD: its target's
    assert cells[names[2]][1] == "0.980 ± 0.000 / 0.970 ± 0.000"
    assert rows[2]["teacher_accuracy"]["of"] == "teacher_unguided"
    # good teachers: no warning anywhere
    for good in (demo_rows([0.9, 0.95], [0.9, 0.92]), demo_rows([0.81, 0.81], [0.81, 0.81])):
        check = attach_teacher_accuracy(good, 0, "eight")
        assert check["warning"] is None and not any(v["weak"] for v in check["variants"])
        assert "WARNING" not in report_markdown({**report, "rows": good, "teacher_check": check})
    # either accuracy below its threshold warns, the guided variant too
    for weak in (demo_rows([0.79, 0.79], [0.9, 0.9]), demo_rows([0.9, 0.9], [0.79, 0.79]),
                 demo_rows([0.9, 0.9], [0.9, 0.9], guided_remaining=0.7)):
        assert attach_teacher_accuracy(weak, 0, "eight")["warning"] is not None
