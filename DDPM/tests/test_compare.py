"""make compare (compare.py): seeds with intervals, the protocol's rows, the separation marker, the attack
columns, and the whole pipeline at --quick with two seeds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import compare
from conftest import run_script
from sfd_ddpm.protocol import format_cell, mean_interval


def _result(method, seed, variants, attack=None, train=None):
    """A pipeline's result.json: {variant key: (w, ua, remaining, fid)}."""
    out = {}
    for key, (w, ua, rem, fid) in variants.items():
        sampler = "one_step" if key == "distilled" else "ddim"
        out[key] = {"ua": ua, "remaining_acc": rem, "classifier_fid": fid, "images_per_s": 10.0 + seed,
                    "variant": {"key": key, "sampler": sampler, "w": w, "nfe": 1 if sampler == "one_step" else 50,
                                "header": f"{sampler} w={w:g}"}}
    seconds = {"total": 1.0, **({"train": train} if train else {})}
    return {"method": method, "seed": seed, "variants": out, "stage_seconds": seconds,
            "stage_cpu_seconds": {"train": train} if train else {},
            "attack": None if attack is None else {"noise_success": attack[0], "embedding_success": attack[1]}}


def constructed_results():
    """Two seeds of teacher, sfd and esd with chosen numbers: sfd's FID (2.0, 2.2) is the best mean, esd's
    guided FID (2.1, 2.3) overlaps it, esd's unguided FID (5.0, 5.1) is far from it; the teacher's FID
    (0.1) is better than all but is a reference, not a competitor."""
    res = []
    for s in (0, 1):
        res.append(_result("teacher", s, {"unguided": (0.0, 0.0, 1.0, 0.1 + s / 100), "guided": (2.0, 0.0, 1.0, 0.1)},
                           attack=(0.9, 0.9)))
        res.append(_result("sfd", s, {"distilled": (0.0, 1.0, 0.95 + s / 100, 2.0 + s / 5)}, attack=(0.0, 0.1 * s),
                           train=100.0 + s))
        res.append(_result("esd", s, {"unguided": (0.0, 0.9, 0.9, 5.0 + s / 10), "guided": (2.0, 0.9, 0.9, 2.1 + s / 5)},
                           attack=(0.5 + s / 100, 0.5), train=50.0))
    return res


def test_table_rows_intervals_and_marks():
    rows = compare.table_rows(constructed_results(), ["teacher", "sfd", "esd"])
    by = {(r["method"], r["variant"]["key"]): r for r in rows}
    assert list(by) == [("teacher", "unguided"), ("teacher", "guided"), ("sfd", "distilled"), ("esd", "unguided"),
                        ("esd", "guided")]
    fid = by[("sfd", "distilled")]["metrics"]["classifier_fid"]
    assert fid["mean"] == pytest.approx(2.1) and fid["half"] == pytest.approx(12.706 * 0.2 / 2, rel=1e-9)
    assert fid == mean_interval([2.0, 2.2])
    marks = {k: r["marks"]["classifier_fid"] for k, r in by.items()}
    # rows compete only within one guidance scale. w = 0: sfd best (the teacher does not compete), esd
    # unguided's 5.05 +- 0.635 does not reach sfd's 2.1 +- 1.27: marked. w = 2: esd guided alone, so best,
    # although its 2.2 is worse than sfd's 2.1 (an unguided generator is not compared with a guided row)
    assert marks == {("teacher", "unguided"): "", ("teacher", "guided"): "", ("sfd", "distilled"): "best",
                     ("esd", "unguided"): "sep", ("esd", "guided"): "best"}
    # UA: sfd's 1.0 +- 0 and esd's 0.9 +- 0: zero-width intervals that do not touch separate
    assert by[("esd", "unguided")]["marks"]["ua"] == "sep" and by[("sfd", "distilled")]["marks"]["ua"] == "best"
    # attacks are per model (both esd rows carry them); lower is better: sfd's noise attack 0.0 is best
    assert by[("esd", "unguided")]["metrics"]["noise_attack"] == mean_interval([0.5, 0.51])
    assert by[("sfd", "distilled")]["marks"]["noise_attack"] == "best"
    assert by[("esd", "unguided")]["marks"]["noise_attack"] == "sep"
    # the embedding attack: sfd 0.05 +- 0.635 overlaps esd's 0.5: not marked
    assert by[("esd", "unguided")]["marks"]["embedding_attack"] == ""
    assert by[("sfd", "distilled")]["distillation_target"] == "teacher (ddim w=0)"
    assert by[("sfd", "distilled")]["metrics"]["train_seconds"] == mean_interval([100.0, 101.0])


def test_one_seed_marks_nothing_separated():
    rows = compare.table_rows([r for r in constructed_results() if r["seed"] == 0], ["teacher", "sfd", "esd"])
    assert all(m != "sep" for r in rows for m in r["marks"].values())
    assert all(r["metrics"]["ua"]["half"] is None for r in rows)


def _report(rows, attack=True):
    return {"seeds": [0, 1], "iters": 200, "batch": 32, "images_per_class": 30, "reference_images_per_class": 100,
            "jobs": 2, "seconds": 600.0, "skipped": [], "rows": rows, "protocol": {"guidance": 2.0, "ddim_steps": 25},
            "attack_settings": {**compare.ATTACK} if attack else None, "attack_seconds_summed": 3.0}


def markdown_cells(md: str) -> dict:
    """{(method, sampler header): cells after the sampler} of the table."""
    out = {}
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| method"):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            out[(cells[0], cells[1])] = cells[2:]
    return out


def test_markdown_cells_marks_and_attack_columns():
    rows = compare.table_rows(constructed_results(), ["teacher", "sfd", "esd"])
    md = compare.markdown(_report(rows))
    b = compare.ATTACK["budget"]
    assert f"| noise attack @{b} | embedding attack @{b} |" in md
    header, rule = [line for line in md.splitlines() if line.startswith("|")][:2]
    assert header.count("|") == rule.count("|")
    cells = markdown_cells(md)
    for r in rows:
        c = cells[(r["method"], r["variant"]["header"])]
        assert [c[0], *c[2:4]] == [format_cell(r["metrics"][k], r["marks"][k])
                                   for k in ("ua", "remaining_acc", "classifier_fid")]
        # beside every UA the teacher's own accuracy at the row's w (class 0 / remaining: UA 0, 1.0 here)
        assert c[1] == "1.000 ± 0.000 / 1.000 ± 0.000", c
        assert c[-2:] == [format_cell(r["metrics"][k], r["marks"][k]) for k in ("noise_attack", "embedding_attack")]
    assert cells[("sfd", "one_step w=0")][3] == "**2.100** ± 1.271"
    assert cells[("esd", "ddim w=0")][3] == "5.050 ± 0.635 †"
    assert cells[("esd", "ddim w=2")][3] == "**2.200** ± 1.271"   # best among the w = 2 rows
    assert "does not overlap the best row's" in md and "rows of different w are not compared" in md and "teacher rows are references" in md
    assert "sfd (one_step w=0): teacher (ddim w=0)" in md
    assert "WARNING" not in md   # a good teacher: nothing to warn about
    plain = compare.markdown(_report(rows, attack=False))
    assert "attack" not in plain
    assert len(markdown_cells(plain)[("sfd", "one_step w=0")]) == len(cells[("sfd", "one_step w=0")]) - 2


@pytest.mark.slow
def test_quick_compare_two_seeds_end_to_end(tmp_path):
    """compare.py --quick --seeds 2 on two methods: seed k trains, samples and attacks with seed k; every
    row's cells are the intervals of its per-seed numbers; the guided rows use --guidance."""
    out = tmp_path / "cmp"
    proc = run_script("compare.py", "--quick", "--seeds", "2", "--methods", "sfd,esd", "--guidance", "1.5",
                      "--outdir", out, "--demo", tmp_path / "nodemo", timeout=900)
    report = json.loads((out / "compare.json").read_text())
    assert report["seeds"] == [0, 1] and report["protocol"]["guidance"] == 1.5
    assert {"classifier_and_teacher", "pipelines"} <= set(report["stage_seconds"]) and report["seconds"] > 0
    keys = [(r["method"], r["variant"]["key"]) for r in report["rows"]]
    assert keys == [("teacher", "unguided"), ("teacher", "guided"), ("sfd", "distilled"), ("esd", "unguided"),
                    ("esd", "guided")]
    guided = [r for r in report["rows"] if r["variant"]["key"] == "guided"]
    assert all(r["variant"]["guidance"] == 1.5 and r["nfe"] == 4 for r in guided)   # DDIM-2 guided: 2 x 2
    results = {(p["method"], p["seed"]): p for p in report["pipelines"]}
    assert sorted(results) == [(m, s) for m in ("esd", "sfd", "teacher") for s in (0, 1)]
    for (method, seed), p in results.items():
        assert {"sampling_and_measuring", "attack", "total"} <= set(p["stage_seconds"])
        folder = out / method / f"seed{seed}"
        assert json.loads((folder / "attack.json").read_text())["settings"]["seed"] == seed
        if method != "teacher":
            assert f"seed={seed}" in p["commands"]["train"]
            (run,) = (folder / "train").iterdir()
            assert json.loads((run / "config.json").read_text())["seed"] == seed
    # sampling seed k: the teacher's two seeds are different draws of the same model
    t = [results[("teacher", s)]["variants"]["unguided"]["classifier_fid"] for s in (0, 1)]
    assert t[0] != t[1]
    for r in report["rows"]:
        for name, interval in r["metrics"].items():
            assert interval == mean_interval([p[name] for p in r["per_seed"]]), (r["label"], name)
        assert r["metrics"]["ua"]["n"] == 2
    cells = markdown_cells((out / "compare.md").read_text())
    for r in report["rows"]:
        c = cells[(r["method"], r["variant"]["header"])]
        assert [c[0], *c[2:4]] == [format_cell(r["metrics"][k], r["marks"][k])
                                   for k in ("ua", "remaining_acc", "classifier_fid")]
        # beside every UA the teacher's own accuracy at the row's w: 1 - its UA, and its remaining accuracy
        t = r["teacher_accuracy"]
        (own,) = [x for x in report["rows"] if x["method"] == "teacher" and x["variant"]["w"] == r["variant"]["w"]]
        assert t["of"] == own["label"] and t["remaining"] == own["metrics"]["remaining_acc"]
        assert t["forget"] == mean_interval([1 - v for v in own["metrics"]["ua"]["values"]])
        assert c[1] == f"{format_cell(t['forget'])} / {format_cell(t['remaining'])}", c
        assert c[-2:] == [format_cell(r["metrics"][k], r["marks"][k]) for k in ("noise_attack", "embedding_attack")]
    assert "95% Student-t interval over 2 seeds" in proc.stdout


def test_method_commands_carry_the_seed(tmp_path):
    """Seed k trains with seed k (and SA's Fisher draws with seed k); the teacher trains nothing."""
    for seed in (0, 3):
        cmds = compare.method_commands("sa", seed, "T.safetensors", tmp_path, 200, 32, [], False)
        assert f"seed={seed}" in cmds["train"] and cmds["fisher"][cmds["fisher"].index("--seed") + 1] == str(seed)
        assert "baseline.init=T.safetensors" in cmds["train"] and "training.n_iters=200" in cmds["train"]
    assert compare.method_commands("teacher", 1, "T", tmp_path, 200, 32, [], False) == {"train": None, "fisher": None}
    retrain = compare.method_commands("retrain", 2, "T", tmp_path, 200, 32, [], False)["train"]
    assert "seed=2" in retrain and not any(a.startswith("training.n_iters") for a in retrain)


def test_compare_defaults_to_the_repository_runs_from_any_cwd(tmp_path, monkeypatch):
    """No --outdir / --demo: runs/compare and runs/demo at the repository root (where `make compare` and
    `make demo` write), from any current directory."""
    from click.testing import CliRunner

    from sfd_ddpm import demo_report
    from conftest import TREE
    expected = TREE.parent / "runs" / "compare"
    assert demo_report.default_dir("compare") == (TREE / "../runs/compare").resolve() == expected
    monkeypatch.setattr(demo_report, "REPO_RUNS", tmp_path / "repo_runs")   # the test writes nothing into the repo
    monkeypatch.chdir(tmp_path)
    started, looked = [], []

    def finished(parent):
        looked.append(Path(parent))
        if len(looked) > 1:
            raise RuntimeError("stopped before training")
    monkeypatch.setattr(compare, "start", lambda cmd, log: started.append([str(c) for c in cmd]))
    monkeypatch.setattr(compare, "wait", lambda proc, what, log: 0.0)
    monkeypatch.setattr(compare, "finished_run", finished)
    result = CliRunner().invoke(compare.main, ["--methods", "sfd"])
    assert isinstance(result.exception, RuntimeError), result.output
    runs = tmp_path / "repo_runs"
    assert started[0][started[0].index("--out") + 1] == str(runs / "compare" / "classifier.safetensors")
    assert looked == [runs / "demo" / "teacher", runs / "compare" / "teacher"]


def test_compare_refuses_a_folder_too_small_for_vdu_before_training(tmp_path, monkeypatch):
    """VDU reads 64 training images of the forget class (vdu.forget_subset): a class of 12 images is refused
    in one line that says how many it needs, before any stage starts; without VDU the folder is enough."""
    from click.testing import CliRunner

    from test_demo import image_folder
    root = image_folder(tmp_path / "small", {"a": 12, "b": 12, "c": 12})
    started = []
    monkeypatch.setattr(compare, "start", lambda cmd, log: started.append(cmd) or (_ for _ in ()).throw(RuntimeError()))
    args = ["--data-root", str(root), "--image-size", "8", "--quick", "--outdir", str(tmp_path / "out"), "--demo",
            str(tmp_path / "nodemo")]
    result = CliRunner().invoke(compare.main, [*args, "--methods", "sfd,vdu"])
    assert result.exit_code == 2 and not started and not (tmp_path / "out").exists(), result.output
    assert ("class folder 'a' of " in result.output and "holds 11 training images" in result.output
            and "VDU reads 64 (vdu.forget_subset): it needs at least 71 images" in result.output)
    assert isinstance(CliRunner().invoke(compare.main, [*args, "--methods", "sfd"]).exception, RuntimeError) and started


def test_markdown_states_references_read_flips_and_warning():
    rows = compare.table_rows(constructed_results(), ["teacher", "sfd", "esd"])
    ref = {"n_images": 35, "per_class": {"b": 17, "c": 18}, "split": "held-out split of the class folder",
           "requested_per_class": 100, "feature_dim": 128, "warning": "the FID reference holds 35 real images, fewer "
           "than the 128 dimensions of the classifier features: the FID is unstable"}
    md = compare.markdown({**_report(rows), "reference": ref, "random_flip": False, "classifier_hflip": False,
                           "forget_class": 2, "override_class": 0,
                           "dataset": {"name": "folder", "root": "x", "class_names": ["b", "c", "a"]}})
    assert ("against 35 real images of the remaining classes from the held-out split of the class folder (17-18 per "
            "class), in the classifier's 128-dimensional feature space") in md and "100 real" not in md
    assert f"**WARNING: {ref['warning']}.**" in md and "(forget class 2, a, into 0, b)" in md
    assert "Random left-right flips: teacher training off (data.random_flip), evaluation classifier off." in md
    assert "labels class 2 after" in md
    # the first lines name the classes, say they were the defaults, and how to choose others by name
    assert md.splitlines()[2] == ("**Forget class 2 (a) into override 0 (b)**, the defaults: the first two folder names "
                                  "in sorted order. To choose others: `python compare.py --data-root x --forget NAME "
                                  "--override NAME` (a class name or index; classes: 0=b, 1=c, 2=a).")
    md = compare.markdown({**_report(rows), "reference": ref, "forget_class": 2, "override_class": 0,
                           "class_choice": {"forget": "a", "override": None},
                           "dataset": {"name": "folder", "root": "x", "class_names": ["b", "c", "a"]}})
    assert "**, as given (--forget a); the override class is the default. To choose" in md.splitlines()[2]


def test_markdown_warns_first_when_the_teacher_cannot_judge():
    """A teacher whose unguided samples of the forget class are recognised 0.6 of the time and whose remaining
    classes 0.5 (guided: 0.95 / 0.9): the warning with both accuracies right after the class line, only the
    weak variant named, and each row's teacher accuracy the one at its own w."""
    res = []
    for s in (0, 1):
        res.append(_result("teacher", s, {"unguided": (0.0, 0.4, 0.5, 1.0), "guided": (2.0, 0.05, 0.9, 1.0)}))
        res.append(_result("sfd", s, {"distilled": (0.0, 1.0, 0.5, 2.0)}))
        res.append(_result("esd", s, {"unguided": (0.0, 0.9, 0.5, 5.0), "guided": (2.0, 0.9, 0.9, 2.1)}))
    rows = compare.table_rows(res, ["teacher", "sfd", "esd"])
    md = compare.markdown({**_report(rows), "forget_class": 0, "override_class": 1,
                           "dataset": {"name": "folder", "root": "x", "class_names": ["eight", "five", "four"]}})
    lines = md.splitlines()
    assert lines[4].startswith("**WARNING: the teacher is too weak to judge forgetting: teacher (ddim w=0) draws "
                               "class 0 (eight) as itself 0.60 of the time and the remaining classes correctly 0.50 "
                               "(this report asks for at least 0.80 and 0.80)"), lines[:6]
    assert "teacher (ddim w=2)" not in lines[4]
    cells = markdown_cells(md)
    assert cells[("sfd", "one_step w=0")][1] == cells[("esd", "ddim w=0")][1] == "0.600 ± 0.000 / 0.500 ± 0.000"
    assert cells[("esd", "ddim w=2")][1] == "0.950 ± 0.000 / 0.900 ± 0.000"
