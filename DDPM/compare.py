#!/usr/bin/env python
"""Every unlearning method on the built-in dataset at an equal budget, one table (`make compare`).

Forget class 0 (--forget) of the built-in teacher with SFD (unguided and, when builtin_sfd_guided.yaml exists,
guided distillation), Selective Amnesia, SalUn, ESD and VDU, each fine-tuned for the same --iters
iterations at the same global --batch, plus Retrain (pretraining without that class, its own
builtin_retrain.yaml budget: it starts from scratch by definition).

Seeds: each (method, seed k) is one pipeline in its own process, --jobs at a time: train with seed k
(SA: its Fisher too) -> sample every variant of the sampling protocol (sfd_ddpm/protocol.py: a
multi-step model unguided and guided with DDIM, eta 0, x0 clipped; an SFD generator one step, as
distilled) with sampling seed k -> UA, remaining-class accuracy, classifier-feature FID
(demo_report.measure) -> evaluate.py attack with seed k (the noise and label-embedding searches at
--attack-budget gradient steps; --no-attacks skips them). The teacher's pipelines only sample, measure
and attack. Every number in the table is a mean with a two-sided 95% Student-t interval over the
seeds, so it covers the spread of the unlearning run and of sampling together; a difference is
marked only where intervals separate (protocol.RULE). Writes OUTDIR/compare.json and compare.md.

--data-root DIR compares on your own class folder instead (see README "Your own images"): the
classifier, the teacher and every method train on the folder (its data overrides), FID uses its
held-out split; by default class 0 (the first folder name in sorted order) is forgotten into class 1.
A folder too small for the held-out references (or for VDU's D_f) is refused before any training.

The teacher and classifier of `make demo` (the repository's runs/demo) are reused when present and
trained on the same data. The table reports each run's wall time and its CPU time (the latter does
not depend on what else ran beside it).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

TREE = Path(__file__).resolve().parent
sys.path.insert(0, str(TREE))

# name -> (config, checkpoint key or None). Add a line to plug in a method. Listed longest first, so
# that --jobs pipelines end close together.
METHODS = {
    "retrain": ("builtin_retrain.yaml", None),
    "sfd": ("builtin_sfd.yaml", "sfd.init"),
    "sfd_guided": ("builtin_sfd_guided.yaml", "sfd.init"),
    "sa": ("builtin_sa.yaml", "baseline.init"),
    "esd": ("builtin_esd.yaml", "baseline.init"),
    "vdu": ("builtin_vdu.yaml", "vdu.init"),
    "salun": ("builtin_salun.yaml", "baseline.init"),
}
# The attack columns: every attack at one budget; DDPM-kind models are attacked through a DDIM of
# ATTACK["steps"] steps (guidance 2, x0 clipped), SFD through its one-step map. Seed k's attack uses seed k.
ATTACK = {"budget": 20, "n": 16, "n_eval": 32, "steps": 5, "lr": 0.05, "prior_weight": 1.0, "seed": 0}
QUICK_MODEL = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]",
               "data.builtin_per_class=40", "grid.per_class=2", "grid.steps=2"]
# Table columns: (key in a row's metrics, header, higher is better). Marked per protocol.column_marks.
COLUMNS = (("ua", "UA (higher = forgotten)", True), ("remaining_acc", "remaining-class acc", True),
           ("classifier_fid", "classifier FID (lower = better)", False))
ATTACK_COLUMNS = (("noise_attack", "noise attack", False), ("embedding_attack", "embedding attack", False))


def available(name: str) -> bool:
    """A method takes part when train.py knows it and its built-in config exists (VDU and guided SFD
    are optional)."""
    from sfd_ddpm.methods import get_method
    try:
        get_method("sfd" if name == "sfd_guided" else name)
    except (ValueError, ImportError):
        return False
    return (TREE / "configs" / METHODS[name][0]).exists()


def finished_run(parent: Path) -> Path | None:
    runs = sorted(p for p in parent.glob("*") if list(p.glob("network-*.safetensors"))) if parent.exists() else []
    return runs[-1] if runs else None


def start(cmd: list, log: Path) -> subprocess.Popen:
    click.echo("$ python " + " ".join(map(str, cmd)), err=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, *map(str, cmd)], cwd=TREE, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def wait(proc: subprocess.Popen, what: str, log: Path) -> float:
    """Wait for ``proc``; returns its CPU seconds (user + sys, its children included). A failure stops
    the comparison."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise click.ClickException(f"{what} failed ({proc.returncode}); its output is in {log}:\n"
                                   + log.read_text()[-2000:])
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list, log: Path, what: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one subprocess."""
    t0 = time.perf_counter()
    cpu = wait(start(cmd, log), what, log)
    return time.perf_counter() - t0, cpu


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--outdir", type=click.Path(file_okay=False), default=None,
              help="Where everything goes (relative to the current directory). Default: runs/compare at the "
                   "repository root (where `make compare` writes), whatever the current directory.")
@click.option("--demo", type=click.Path(file_okay=False), default=None,
              help="A `make demo` folder whose teacher and classifier are reused when present. Default: runs/demo "
                   "at the repository root (where `make demo` writes), whatever the current directory.")
@click.option("--forget", default=None,
              help="Class every method forgets: a class name (a folder name with --data-root) or an index (0 = the "
                   "first name in sorted order). A value that names one class and indexes another (folders named "
                   "1, 2, 3) is refused: write name:1 or index:1. Default: class 0, the first name in sorted order "
                   "(with --data-root, the first folder name); the report's first lines name the classes chosen.")
@click.option("--override", default=None,
              help="Override class of SFD (name or index, as --forget). Default: class 1, the second name in sorted "
                   "order (with --data-root, the second folder name).")
@click.option("--methods", default=",".join(METHODS),
              help="Comma-separated subset (a method whose config is missing, VDU or guided SFD, is skipped).")
@click.option("--seeds", type=click.IntRange(min=1), default=2,
              help="Seeds per method: seed k trains (and attacks) with seed k and samples with sampling seed k; "
                   "every number is a mean with a 95% t interval over them (1: no interval). The default keeps "
                   "`make compare` within ~25 min on 2 cores after `make demo`.")
@click.option("--iters", type=click.IntRange(min=1), default=200, help="Iterations of every fine-tuning method.")
@click.option("--batch", type=click.IntRange(min=1), default=32, help="Global batch of every fine-tuning method.")
@click.option("--per-class", type=click.IntRange(min=2), default=30, help="Generated images per class, per seed "
              "and sampling variant.")
@click.option("--ddim-steps", type=click.IntRange(min=1), default=25, help="DDIM steps of the DDPM-kind models.")
@click.option("--guidance", type=click.FloatRange(min=0, min_open=True), default=2.0,
              help="w of the multi-step models' guided rows (each is also sampled unguided, w = 0).")
@click.option("--jobs", type=click.IntRange(min=1), default=2,
              help="(method, seed) pipelines at a time, one thread each.")
@click.option("--attack-budget", type=click.IntRange(min=1), default=ATTACK["budget"],
              help="Gradient steps of each white-box attack (the attack columns).")
@click.option("--no-attacks", is_flag=True, help="Skip the white-box attacks (and their columns).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Your own images instead of the built-in dataset: one sub-folder per class (class index = "
                   "position in the sorted folder names). Use a fresh --outdir per dataset.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="With --data-root: images are resized and centre-cropped to this many pixels. Default: from the "
                   "images (their median shorter side, at most 32, a multiple of 4; --quick: at most 16), as demo.py.")
@click.option("--teacher-minutes", type=click.FloatRange(min=0, min_open=True), default=6.0,
              help="With --data-root, when no demo teacher is reused: the teacher's time budget, sized to the folder "
                   "as demo.py's (README \"A teacher sized to your folder\").")
@click.option("--quick", is_flag=True, help="Tiny budget (numbers meaningless): checks the pipeline runs.")
@click.option("--pipeline", "pipeline_spec", type=click.Path(dir_okay=False), hidden=True,
              help="Internal: run the one (method, seed) pipeline described by this JSON file.")
def main(outdir, demo, forget, override, methods, seeds, iters, batch, per_class, ddim_steps, guidance, jobs, attack_budget, no_attacks,
         data_root, image_size, teacher_minutes, quick, pipeline_spec):
    """Train, sample, measure and attack every method at every seed; write compare.json and compare.md."""
    if pipeline_spec:
        return pipeline(json.loads(Path(pipeline_spec).read_text()))
    from sfd_ddpm.data import resolve_class
    from sfd_ddpm.demo_report import (classifier_command, dataset_class_names, dataset_overrides, default_dir,
                                      folder_shortfall, reuse_mismatch)
    data_root = str(Path(data_root).resolve()) if data_root else None   # the stages run inside DDPM/
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}",
                                 param_hint="--methods")
    skipped = [m for m in names if not available(m)]
    names = [m for m in names if m not in skipped]
    from sfd_ddpm import teacher_budget as tb
    try:
        if image_size is None:   # the built-in dataset: 16 px; a folder: from its images (as demo.py)
            image_size = 16 if data_root is None else tb.native_image_size(
                data_root, tb.QUICK_MAX_IMAGE_SIZE if quick else tb.MAX_IMAGE_SIZE)
        data_args = dataset_overrides(data_root, image_size)
        class_names = dataset_class_names(data_root, image_size)
        choice = {"forget": forget, "override": override}   # as given (None: the default)
        forget = resolve_class("index:0" if forget is None else forget, class_names, "--forget")
        override = resolve_class("index:1" if override is None else override, class_names, "--override")
        too_small = folder_shortfall(data_root, forget, vdu_forget_images() if "vdu" in names else 0)
    except ValueError as e:   # FolderError: empty folder, one class, unknown or ambiguous class, ...
        raise click.UsageError(str(e))
    if forget == override:
        raise click.BadParameter("the override class must differ from the forget class", param_hint="--override")
    if too_small:   # before any training, not after it
        raise click.UsageError(too_small)
    click.echo(f"forget class {forget} ({class_names[forget]}) into class {override} ({class_names[override]})",
               err=True)
    out = Path(outdir).resolve() if outdir else default_dir("compare")
    demo = Path(demo).resolve() if demo else default_dir("demo")
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model_args = (QUICK_MODEL if quick else []) + data_args
    if quick:
        iters, per_class, ddim_steps = 2, 2, 2
    ref_per_class = 8 if quick else 100
    attack_cfg = None if no_attacks else {**ATTACK, "budget": attack_budget,
                                          **({"budget": 2, "n": 4, "n_eval": 4, "steps": 2} if quick else {})}

    # classifier and teacher: reuse the demo's, else train them here ----------------------------
    clf_path = demo / "classifier.safetensors"
    if quick or not clf_path.exists() or reuse_mismatch("classifier", clf_path, data_root, image_size):
        clf_path = out / "classifier.safetensors"
        if not clf_path.exists():
            log = out / "classifier.log"
            wait(start(classifier_command(clf_path, data_root, image_size, quick), log), "classifier", log)
        elif why := reuse_mismatch("classifier", clf_path, data_root, image_size):
            raise click.UsageError(f"{why}; give another --outdir (or delete it)")
    if data_root:   # a folder: the demo's sized teacher when it has one for this data, else one sized here
        teacher = None if quick else tb.finished_sized_teacher(demo / "teacher")
        if teacher is not None and reuse_mismatch("teacher", teacher.parent, data_root, image_size):
            teacher = None
        if teacher is None:
            teacher = tb.finished_sized_teacher(out / "teacher")
            if teacher is not None and (why := reuse_mismatch("teacher", teacher.parent, data_root, image_size)):
                raise click.UsageError(f"{why}; give another --outdir (or delete it)")
        if teacher is None:
            from sfd_ddpm.config import load_config
            from sfd_ddpm.folder_data import scan
            chunks = []

            def run_chunk(cmd):   # one log per train.py command of the sized teacher
                log = out / f"teacher-{len(chunks)}.log"
                chunks.append(log)
                wait(start(cmd, log), "teacher", log)
            quick_args = ["training.batch_size=8"] if quick else []
            batch = load_config(TREE / "configs/builtin_train.yaml", model_args + quick_args)["training"]["batch_size"]
            rec = tb.train_sized_teacher(
                out / "teacher", ["train.py", "--config", "configs/builtin_train.yaml", "--outdir", out / "teacher",
                                  *tb.GRID, *model_args, *quick_args], len(scan(data_root)["files"]["train"]),
                int(batch), teacher_minutes, clf_path, forget, run_chunk, tb.QUICK_RULE if quick else tb.RULE)
            click.echo(tb.stop_sentence(rec), err=True)
            teacher = Path(rec["checkpoint"])
    else:           # the built-in dataset: the demo's 800-iteration teacher, else one trained here
        teacher_run = None if quick else finished_run(demo / "teacher")
        if (teacher_run is None or not (teacher_run / "network-0000800.safetensors").exists()
                or reuse_mismatch("teacher", teacher_run, data_root, image_size)):
            teacher_run = finished_run(out / "teacher")
            if teacher_run is not None and (why := reuse_mismatch("teacher", teacher_run, data_root, image_size)):
                raise click.UsageError(f"{why}; give another --outdir (or delete it)")
            if teacher_run is None:
                log = out / "teacher.log"
                wait(start(["train.py", "--config", "configs/builtin_train.yaml", "--outdir", out / "teacher",
                            *model_args, *(["training.n_iters=4", "training.batch_size=8", "training.snapshot_every=4"]
                                           if quick else [])], log), "teacher", log)
                teacher_run = finished_run(out / "teacher")
        teacher = sorted(teacher_run.glob("network-*.safetensors"))[-1]
    click.echo(f"teacher: {teacher}\nclassifier: {clf_path}", err=True)
    reference, flips = fid_references(teacher, clf_path, forget, ref_per_class, per_class * (len(class_names) - 1))
    setup_seconds = time.perf_counter() - t_all

    # the (method, seed) pipelines, --jobs at a time ----------------------------------------------
    common = {"teacher": str(teacher), "classifier": str(clf_path), "per_class": per_class, "ddim_steps": ddim_steps,
              "guidance": guidance, "ref_per_class": ref_per_class, "attack": attack_cfg,
              "extra_w": generator_ws(names), "forget": forget, "override": override}
    specs = [{**common, "method": name, "seed": seed, "folder": str(out / name / f"seed{seed}"),
              **method_commands(name, seed, teacher, out / name / f"seed{seed}", iters, batch, model_args, quick,
                                 data_args, (forget, override))}
             for name in ["teacher", *names] for seed in range(seeds)]
    specs.sort(key=lambda s: ([*METHODS, "teacher"].index(s["method"]), s["seed"]))
    t0 = time.perf_counter()
    results = run_pipelines(specs, jobs)
    pipelines_seconds = time.perf_counter() - t0

    from sfd_ddpm.classifiers import classifier_quality_note, load_classifier
    clf_meta = load_classifier(clf_path)[1]
    report = {"forget_class": forget, "override_class": override, "forget_class_name": class_names[forget],
              "override_class_name": class_names[override], "class_choice": choice,
              "dataset": {"name": "folder" if data_root else "builtin",
                          "root": str(Path(data_root).resolve()) if data_root else None,
                          "image_size": image_size if data_root else 16, "class_names": class_names},
              "classifier_test_accuracy": clf_meta.get("test_accuracy"),
              "classifier_warning": classifier_quality_note(clf_meta), "seeds": list(range(seeds)), "iters": iters, "batch": batch,
              "images_per_class": per_class, "reference_images_per_class": ref_per_class, "reference": reference,
              **flips, "jobs": jobs, "quick": quick,
              "protocol": {"guidance": guidance, "ddim_steps": ddim_steps,
                           "interval": "mean and two-sided 95% Student-t interval over seeds (seed k: training, "
                                       "sampling and attack seed k)"},
              "skipped": skipped, "attack_settings": attack_cfg,
              "attack_seconds_summed": (sum(r["stage_seconds"].get("attack", 0.0) for r in results)
                                        if attack_cfg else None),
              "teacher": str(teacher), "classifier": str(clf_path), "methods": [], "rows": [],
              "stage_seconds": {"classifier_and_teacher": setup_seconds, "pipelines": pipelines_seconds},
              "pipelines": results}
    checks = Path(teacher).parent / tb.CHECKS_FILE
    report["teacher_training"] = json.loads(checks.read_text()) if checks.exists() else None
    report["methods"] = ["teacher", *names]
    report["rows"] = table_rows(results, report["methods"])
    from sfd_ddpm.demo_report import teacher_check
    report["teacher_check"] = teacher_check([(row["label"], row["metrics"]) for row in report["rows"]
                                             if row["method"] == "teacher"], forget, class_names[forget])
    if report["teacher_check"]["warning"]:
        click.echo(f"WARNING: {report['teacher_check']['warning']}", err=True)
    report["seconds"] = time.perf_counter() - t_all
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "compare.md").write_text(md)
    click.echo(md)


def fid_references(teacher, clf_path, forget: int, per_class: int, generated: int) -> tuple[dict, dict]:
    """What the FID of every pipeline is measured against (demo_report.reference_set on the teacher's data:
    the numbers actually read, the feature dimension and the small-set warning), and the flip settings
    of the teacher's data and of the classifier, for the report."""
    from sfd_ddpm.checkpoints import read_metadata
    from sfd_ddpm.classifiers import load_classifier
    from sfd_ddpm.demo_report import feature_dim, reference_set, reference_summary

    data = read_metadata(teacher)["config"]["data"]
    clf, meta = load_classifier(clf_path)
    ref, record = reference_set(forget, per_class, data)
    reference = reference_summary(record, feature_dim(clf, ref), generated)
    if reference["warning"]:
        click.echo(f"WARNING: {reference['warning']}", err=True)
    return reference, {"random_flip": data.get("random_flip"), "classifier_hflip": meta["training"].get("hflip")}


def generator_ws(names: list[str]) -> list[float]:
    """The guidance scales the generator methods distil with (their configs' sfd.guidance): the teacher is
    also sampled at each, so every generator's distillation target is a row."""
    from sfd_ddpm.config import load_config
    from sfd_ddpm.protocol import distilled_guidance
    return sorted({distilled_guidance(load_config(TREE / "configs" / METHODS[n][0]))
                   for n in names if METHODS[n][1] == "sfd.init"})


def method_commands(name: str, seed: int, teacher, folder: Path, iters: int, batch: int, model_args, quick,
                    data_args=(), classes=(0, 1)) -> dict:
    """The training (and SA Fisher) command of one (method, seed); none for the teacher. ``model_args``
    (Retrain's from-scratch network and data) include ``data_args`` (the data overrides every method gets).
    ``classes``: (forget, override) indices, passed as index:N so that no folder name can be read instead."""
    from sfd_ddpm.demo_report import class_args
    if name == "teacher":
        return {"train": None, "fisher": None}
    config, init_key = METHODS[name]
    extra = [f"seed={seed}"] + ([f"{init_key}={teacher}"] if init_key else []) + class_args(name, *classes)
    if name == "retrain":
        extra += model_args + (["training.n_iters=2", "training.batch_size=8", "training.snapshot_every=2"]
                               if quick else [])
    else:
        extra += [*data_args, f"training.n_iters={iters}", f"training.batch_size={batch}",
                  f"training.snapshot_every={iters}", f"training.state_every={iters}"]
    fisher = None
    if name == "sa":
        path = folder / "fisher.safetensors"
        fisher = ["fisher.py", "--ckpt", str(teacher), "--out", str(path), "--seed", str(seed), "--device", "cpu",
                  *(["--samples", "3", "--timesteps-stride", "500", "--steps", "2"] if quick else
                    ["--samples", "40", "--timesteps-stride", "20", "--steps", "20", "--guidance", "2"])]
        extra.append(f"baseline.sa_fisher={path}")
    train = ["train.py", "--config", f"configs/{config}", "--outdir", str(folder / "train"), *map(str, extra)]
    return {"train": train, "fisher": fisher}


def vdu_forget_images() -> int:
    """How many training images of the forget class VDU reads (its config's vdu.forget_subset)."""
    from sfd_ddpm.config import load_config
    return int(load_config(TREE / "configs" / METHODS["vdu"][0])["vdu"]["forget_subset"])


def run_pipelines(specs: list[dict], jobs: int) -> list[dict]:
    """Each spec in its own `compare.py --pipeline` process, ``jobs`` at a time; results in spec order."""
    queue, active, done = list(specs), [], {}
    while queue or active:
        while queue and len(active) < jobs:
            spec = queue.pop(0)
            folder = Path(spec["folder"])
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "spec.json").write_text(json.dumps(spec, indent=2))
            log = folder / "pipeline.log"
            active.append((spec, start(["compare.py", "--pipeline", folder / "spec.json"], log), log))
        # whichever finishes first frees its slot
        pid, status, usage = os.wait3(0)
        k = next(i for i, (_, p, _) in enumerate(active) if p.pid == pid)
        spec, proc, log = active.pop(k)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            for _, other, _ in active:
                other.kill()
            raise click.ClickException(f"{spec['method']} seed {spec['seed']} failed ({proc.returncode}); "
                                       f"its output is in {log}:\n" + log.read_text()[-2000:])
        done[(spec["method"], spec["seed"])] = json.loads((Path(spec["folder"]) / "result.json").read_text())
        r = done[(spec["method"], spec["seed"])]
        r["pipeline_cpu_seconds"] = usage.ru_utime + usage.ru_stime   # the pipeline and its waited-for children
        click.echo(f"{spec['method']} seed {spec['seed']}: " + "; ".join(
            f"{k}: UA {v['ua']:.3f}, remaining {v['remaining_acc']:.3f}, FID {v['classifier_fid']:.3f}"
            for k, v in r["variants"].items()) + f" ({r['stage_seconds']['total']:.0f} s)", err=True)
    return [done[(s["method"], s["seed"])] for s in specs]


def pipeline(spec: dict) -> None:
    """One (method, seed): [Fisher] -> train -> sample every protocol variant -> measure -> attack.
    Writes FOLDER/result.json with the per-seed numbers and the wall/CPU seconds of each stage."""
    import torch

    from sfd_ddpm.classifiers import load_classifier
    from sfd_ddpm.demo_report import reference_images, sample_and_measure
    from sfd_ddpm.protocol import checkpoint_variants, multi_step_variants
    from sfd_ddpm.checkpoints import read_metadata

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    folder, seed = Path(spec["folder"]), spec["seed"]
    seconds, cpu = {}, {}
    for stage in ("fisher", "train"):
        if spec.get(stage):
            seconds[stage], cpu[stage] = timed(spec[stage], folder / f"{stage}.log", f"{spec['method']} {stage}")
    ckpt = Path(spec["teacher"]) if not spec.get("train") else \
        sorted(finished_run(folder / "train").glob("network-*.safetensors"))[-1]
    t0 = time.perf_counter()
    kw = {"guidance": spec["guidance"], "ddim_steps": spec["ddim_steps"]}
    meta = read_metadata(ckpt)
    variants = (multi_step_variants(meta["config"], extra_w=tuple(spec["extra_w"]), **kw)
                if spec["method"] == "teacher" else checkpoint_variants(ckpt, **kw))
    clf, _ = load_classifier(spec["classifier"])
    ref = reference_images(spec["forget"], spec["ref_per_class"], read_metadata(spec["teacher"])["config"]["data"])
    measured = {}
    for v in variants:
        res = sample_and_measure(ckpt, v, [seed], spec["per_class"], clf, spec["forget"], spec["override"], ref)
        measured[v.key] = {**res["per_seed"][0], "variant": v.as_dict()}
    seconds["sampling_and_measuring"] = time.perf_counter() - t0
    attack = None
    if spec["attack"]:
        path = folder / "attack.json"
        seconds["attack"], cpu["attack"] = timed(attack_command(ckpt, spec["classifier"], path,
                                                                {**spec["attack"], "seed": seed}, spec["forget"]),
                                                 folder / "attack.log", f"attack on {spec['method']}")
        attack = attack_summary(path)
    seconds["total"] = time.perf_counter() - t_all
    result = {"method": spec["method"], "seed": seed, "checkpoint": str(ckpt), "variants": measured, "attack": attack,
              "commands": {k: "python " + " ".join(spec[k]) for k in ("fisher", "train") if spec.get(k)},
              "stage_seconds": seconds, "stage_cpu_seconds": cpu}
    (folder / "result.json").write_text(json.dumps(result, indent=2))


def table_rows(results: list[dict], methods: list[str]) -> list[dict]:
    """One row per (method, sampling variant): every metric as a mean with a 95% t interval over the seeds,
    the per-seed values, and the marks of protocol.column_marks (teacher rows do not compete)."""
    from sfd_ddpm.protocol import column_marks, mean_interval
    rows = []
    for method in methods:
        seeds = [r for r in results if r["method"] == method]
        for key, first in seeds[0]["variants"].items():
            per_seed = []
            for r in seeds:
                v = r["variants"][key]
                rec = {"seed": r["seed"], **{k: v[k] for k in ("ua", "remaining_acc", "classifier_fid", "images_per_s")}}
                if r["attack"]:
                    rec.update(noise_attack=r["attack"]["noise_success"], embedding_attack=r["attack"]["embedding_success"])
                for stage in ("train", "fisher"):
                    if stage in r["stage_seconds"]:
                        rec[f"{stage}_seconds"] = r["stage_seconds"][stage]
                        rec[f"{stage}_cpu_seconds"] = r["stage_cpu_seconds"][stage]
                per_seed.append(rec)
            metrics = {k: mean_interval([p[k] for p in per_seed]) for k in per_seed[0] if k != "seed"}
            variant = first["variant"]
            rows.append({"method": method, "variant": variant, "label": f"{method} ({variant['header']})",
                         "nfe": variant["nfe"], "competes": method != "teacher", "metrics": metrics,
                         "per_seed": per_seed, "distillation_target": None})
    teacher = {r["variant"]["w"]: r for r in rows if r["method"] == "teacher"}
    from sfd_ddpm.demo_report import teacher_accuracy
    for r in rows:   # beside every UA, the teacher's own accuracy at the row's w
        own = teacher.get(r["variant"]["w"])
        r["teacher_accuracy"] = None if own is None else {"of": own["label"], **teacher_accuracy(own["metrics"])}
    for r in rows:
        if r["variant"]["sampler"] == "one_step" and r["variant"]["w"] in teacher:
            r["distillation_target"] = teacher[r["variant"]["w"]]["label"]
    # Like with like: a row competes only with the rows of its guidance scale (multi-step models sampled
    # at w, generators distilled at w), so an unguided row is never marked against a guided one.
    for r in rows:
        r["marks"] = {}
    for w in sorted({r["variant"]["w"] for r in rows}):
        group = [r for r in rows if r["variant"]["w"] == w]
        for key, _, higher in COLUMNS + ATTACK_COLUMNS:
            marks = column_marks([r["metrics"].get(key) if r["competes"] else None for r in group], higher)
            for r, mark in zip(group, marks):
                r["marks"][key] = mark
    return rows


def attack_command(ckpt, clf_path, out, cfg: dict, forget: int = 0) -> list:
    """evaluate.py attack on one model with the comparison's settings (the forget class by index)."""
    return ["evaluate.py", "attack", "--ckpt", ckpt, "--classifier", clf_path, "--forget", f"index:{forget}", "--budgets",
            f"0,{cfg['budget']}", "--n", cfg["n"], "--n-eval", cfg["n_eval"], "--steps", cfg["steps"], "--lr", cfg["lr"],
            "--prior-weight", cfg["prior_weight"], "--seed", cfg["seed"], "--device", "cpu", "--out", out]


def attack_summary(path) -> dict:
    """The attack columns of one model from its evaluate.py attack JSON: success at the budget (and at 0,
    the model asked normally, on the same noise)."""
    rec = json.loads(Path(path).read_text())
    res = rec["results"]
    at = res["at_budget"]
    return {"noise_success": at["noise"]["success_rate"], "noise_success_at_0": res["attacks"]["noise"][0]["success_rate"],
            "embedding_success": res["embedding_best"]["success_rate"],
            "embedding_forget_success": at["embedding_forget"]["success_rate"],
            "embedding_mean_success": at["embedding_mean"]["success_rate"],
            "mean_p_forget": {k: v["mean_p_forget"] for k, v in at.items()},
            "sampling": rec["settings"]["sampling"], "seconds": rec["settings"]["seconds"], "json": str(path)}


def markdown(r: dict) -> str:
    from sfd_ddpm.demo_report import class_choice_sentence, flip_sentence, reference_sentence, teacher_check
    from sfd_ddpm.teacher_budget import stop_sentence
    from sfd_ddpm.protocol import RULE, format_cell
    n = len(r["seeds"])
    p = r["protocol"]
    atk = r.get("attack_settings")
    seeded = "sampling and attack" if atk else "sampling"
    d = r.get("dataset") or {"name": "builtin", "class_names": None}
    where = "the built-in dataset" if d["name"] == "builtin" else f"the class folder {d['root']}"
    names = d["class_names"]
    acc = r.get("classifier_test_accuracy")
    f, o = r.get("forget_class", 0), r.get("override_class", 1)
    ref = r.get("reference")
    refs = (f"{r['reference_images_per_class']} real test images per class" if ref is None
            else reference_sentence(ref) + f", in the classifier's {ref['feature_dim']}-dimensional feature space")
    lines = [f"# Unlearning methods on {where} (forget class {f}"
             + (f", {names[f]}, into {o}, {names[o]}" if names else "") + ")\n",
             class_choice_sentence({**r, "dataset": d}, "compare.py"), "",
             f"Fine-tuning methods: {r['iters']} iterations at global batch {r['batch']} each, from the same teacher; "
             f"Retrain: builtin_retrain.yaml from scratch. Every cell is the mean ± the half-width of a two-sided 95% "
             f"Student-t interval over {n} seed{'s' * (n > 1)} (seed k: training, {seeded} seed k; the "
             f"teacher's seeds are {seeded} seeds). {r['images_per_class']} images per class, seed and "
             f"variant. Sampling protocol: every multi-step model unguided (w = 0) and guided (w = {p['guidance']:g}), "
             f"DDIM-{p['ddim_steps']}, eta 0, x0 clipped; every SFD generator one step, as distilled; the sampler column "
             f"names steps, w and NFE. FID = classifier-feature FID of the remaining classes against "
             f"{refs} (not Inception FID). {r['jobs']} pipelines "
             f"ran at a time, so wall times include contention; CPU seconds do not. Total {r['seconds']:.0f} s."
             + (f" Skipped (not available): {', '.join(r['skipped'])}." if r["skipped"] else "")
             + ("" if acc is None else f" The judging classifier's test accuracy on real test images: {acc:.3f}.")
             + ("" if not r.get("teacher_training") else " " + stop_sentence(r["teacher_training"]))
             + ("" if "random_flip" not in r else " " + flip_sentence(r["random_flip"], r.get("classifier_hflip"))),
             ""]
    for warning in (r.get("classifier_warning"), ref and ref["warning"]):
        if warning:
            lines += [f"**WARNING: {warning}.**", ""]
    weak = teacher_check([(row["label"], row["metrics"]) for row in r["rows"] if row["method"] == "teacher"], f,
                         names[f] if names else str(f))["warning"]
    if weak:   # in the first lines, right after the classes
        lines[3:3] = [f"**WARNING: {weak}.**", ""]
    if atk:
        lines += [f"Attack columns: share of attacked images the classifier labels class {f} after {atk['budget']} "
                  f"gradient steps of a white-box search ({atk['n']} noises; embedding: the better of the forget-"
                  f"row and mean-row starts, judged on {atk['n_eval']} held-out noises; DDPM-kind models through "
                  f"DDIM-{atk['steps']} with guidance 2). They belong to the model, so both rows of a multi-step model "
                  f"show the same values. Unattacked, the noise column would read 1 - UA on those noises. The attacks "
                  f"took {r.get('attack_seconds_summed') or 0:.0f} s summed over the pipelines. See README, \"Attacks\".",
                  ""]
    cols = COLUMNS + (tuple((k, f"{h} @{atk['budget']}", hb) for k, h, hb in ATTACK_COLUMNS) if atk else ())
    teacher_head = f"teacher's own acc at this w: class {f} / remaining"
    head = ("| method | sampler | " + " | ".join([COLUMNS[0][1], teacher_head, *(h for _, h, _ in COLUMNS[1:])])
            + " | NFE / image | images / s | "
            "train wall s | train CPU s |" + "".join(f" {h} |" for _, h, _ in cols[len(COLUMNS):]))
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for row in r["rows"]:
        m = row["metrics"]
        cell = lambda k: format_cell(m.get(k), row["marks"].get(k, ""))  # noqa: E731
        plain = lambda k, d=0: format_cell(m.get(k), digits=d)  # noqa: E731
        t = row.get("teacher_accuracy")
        own = "-" if not t else f"{format_cell(t['forget'])} / {format_cell(t['remaining'])}"
        lines.append(f"| {row['method']} | {row['variant']['header']} | "
                     + " | ".join([cell(COLUMNS[0][0]), own, *(cell(k) for k, _, _ in COLUMNS[1:])])
                     + f" | {row['nfe']} | {plain('images_per_s', 1)} | {plain('train_seconds')} | "
                       f"{plain('train_cpu_seconds')} |" + "".join(f" {cell(k)} |" for k, _, _ in cols[len(COLUMNS):]))
    lines += ["", RULE + " The teacher rows are references and take no part in the marking."]
    targets = [f"{row['method']} ({row['variant']['header']}): {row['distillation_target']}"
               for row in r["rows"] if row["distillation_target"]]
    if targets:
        lines += ["", "Distillation targets (the teacher row each generator was distilled towards): "
                  + "; ".join(targets) + "."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
