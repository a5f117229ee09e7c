#!/usr/bin/env python
"""The whole SFD pipeline on the built-in dataset (or your class folder), end to end, with no network (`make demo`).

classifier -> pretrained teacher (reused when already there) -> two SFD runs forgetting class 0 into 1,
side by side (one thread each): builtin_sfd.yaml distils the unguided teacher (the authors' DDPM
setting), builtin_sfd_guided.yaml the classifier-free-guided one -> samples under the one protocol of
sfd_ddpm/protocol.py (the teacher unguided and guided, each generator one step as distilled) at a few
sampling seeds -> UA, remaining-class accuracy and classifier-feature FID, each a mean with a 95%
interval over the seeds -> report.json, report.md, a picture of every model's samples and the curves
of both SFD runs (from their snapshots). Every stage is timed.

--data-root DIR runs the same pipeline on your own images (one sub-folder per class, see README "Your own
images"): the classifier with the folder recipe, a teacher sized to the folder (epochs within
--teacher-minutes, stopped early by the classifier's accuracy on its samples: sfd_ddpm/teacher_budget.py)
at the images' own resolution (at most 32 px), both SFD runs with the folder's data overrides, FID
against the folder's held-out split, class names from the folder names. The report's first lines name
the forget and override classes (default: the first two folder names) and warn when the teacher is
too weak for its UA to mean anything.

The training stages run the real entry scripts (train_classifier.py, train.py), so the commands it
prints are the ones a user would type.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

TREE = Path(__file__).resolve().parent
sys.path.insert(0, str(TREE))

# A few minutes on 2 CPU cores. --quick shrinks everything to seconds (used by the tests). per_class is
# per sampling seed: 3 seeds x 17 = 51 images per class and variant (the old single-seed demo drew 50),
# so each seed's FID still rests on more images (153) than the classifier has features (128).
FULL = {"teacher": [], "sfd": [], "per_class": 17, "sampling_seeds": 3, "ref_per_class": 200, "curve_per_class": 30,
        "ddim_steps": 50, "edm_steps": 18}
QUICK_MODEL = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]",
               "data.builtin_per_class=40", "grid.per_class=2", "grid.steps=2"]
QUICK = {"teacher": [*QUICK_MODEL, "training.n_iters=6", "training.snapshot_every=6", "training.batch_size=8"],
         "sfd": ["training.n_iters=4", "training.snapshot_every=2", "training.batch_size=8", "grid.per_class=2"],
         "per_class": 3, "sampling_seeds": 2, "ref_per_class": 8, "curve_per_class": 2, "ddim_steps": 3, "edm_steps": 2}
# --backbone: (teacher config, unguided SFD config, guided SFD config or None)
BACKBONES = {"ddpm": ("configs/builtin_train.yaml", "configs/builtin_sfd.yaml", "configs/builtin_sfd_guided.yaml"),
             "edm": ("configs/builtin_edm_train.yaml", "configs/builtin_edm_sfd.yaml", None)}


def run(cmd: list[str]) -> None:
    click.echo("$ python " + " ".join(str(c) for c in cmd), err=True)
    subprocess.run([sys.executable, *map(str, cmd)], cwd=TREE, check=True)


def run_parallel(jobs: dict[str, list], logs: Path) -> dict[str, dict]:
    """Run the commands side by side, one thread each (the machine has 2 cores); each one's output
    goes to logs/<name>.log. Returns {name: {'train_seconds', 'train_cpu_seconds'}}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {}
    for name, cmd in jobs.items():
        click.echo("$ OMP_NUM_THREADS=1 python " + " ".join(str(c) for c in cmd) + f"  > {logs / name}.log", err=True)
        procs[name] = (subprocess.Popen([sys.executable, *map(str, cmd)], cwd=TREE, env=env, stderr=subprocess.STDOUT,
                                        stdout=open(logs / f"{name}.log", "w")), time.perf_counter())
    timing = {}
    for name, (proc, t0) in procs.items():
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            for other, _ in procs.values():
                other.kill()
            tail = (logs / f"{name}.log").read_text()[-3000:]
            raise click.ClickException(f"{name} failed ({proc.returncode}); {logs / name}.log ends:\n{tail}")
        timing[name] = {"train_seconds": time.perf_counter() - t0, "train_cpu_seconds": usage.ru_utime + usage.ru_stime}
    return timing


def finished_run(parent: Path, final: str) -> Path | None:
    """The newest run under ``parent`` whose final snapshot exists (so an interrupted run is not reused)."""
    runs = sorted(p for p in parent.glob("*") if (p / final).exists()) if parent.exists() else []
    return runs[-1] if runs else None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--outdir", type=click.Path(file_okay=False), default=None,
              help="Where everything goes (relative to the current directory). Default: runs/demo at the "
                   "repository root (where `make demo` writes), whatever the current directory.")
@click.option("--forget", default=None,
              help="Class to forget: a class name (a folder name with --data-root) or an index (0 = the first name "
                   "in sorted order). A value that names one class and indexes another (folders named 1, 2, 3) is "
                   "refused: write name:1 or index:1. Default: class 0, the first name in sorted order (with "
                   "--data-root, the first folder name); the report's first lines name the classes chosen.")
@click.option("--override", default=None,
              help="Override class the teacher is asked for instead (name or index, as --forget). Default: class 1, "
                   "the second name in sorted order (with --data-root, the second folder name).")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False), default=None,
              help="Your own images instead of the built-in dataset: a folder with one sub-folder per class "
                   "(class index = sorted folder names). Use a fresh --outdir per dataset.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="With --data-root: images are resized and centre-cropped to this many pixels. Default: from the "
                   "images (their median shorter side, at most 32, a multiple of 4; --quick: at most 16).")
@click.option("--teacher-minutes", type=click.FloatRange(min=0, min_open=True), default=6.0,
              help="With --data-root: the teacher's time budget. It trains in epochs, checked every few epochs by the "
                   "classifier's accuracy on its own unguided samples, and stops once that reaches 0.90, when the "
                   "next chunk would not fit this budget, or at 100 epochs (README \"A teacher sized to your "
                   "folder\"); the checks go to teacher_checks.json in its run folder.")
@click.option("--quick", is_flag=True, help="Tiny budget (seconds; numbers meaningless): checks the pipeline runs.")
@click.option("--retrain-teacher", is_flag=True, help="Pretrain a new teacher even if one is present.")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default="ddpm",
              help="ddpm = the DDPM UNet (DDIM teacher samples); edm = the EDM SongUNet (EDM Heun teacher samples, "
                   "SiD/SFD in sigma space).")
@click.option("--guidance", type=click.FloatRange(min=0, min_open=True), default=2.0,
              help="w of the teacher's guided variant (it is also sampled unguided, w = 0).")
@click.option("--sampling-seeds", type=click.IntRange(min=1), default=None,
              help="Sampling seeds per model: every number is a mean with a 95% t interval over them (1: no "
                   "interval). Default 3 (--quick: 2).")
@click.option("--guided-config", type=click.Path(dir_okay=False), default=None,
              help="Config of the second SFD run, the one that distils the guided teacher. Default: "
                   "configs/builtin_sfd_guided.yaml (ddpm backbone; none exists for edm, whose guided run is "
                   "skipped with the reason in the report).")
def main(outdir, forget, override, data_root, image_size, teacher_minutes, quick, retrain_teacher, backbone, guidance,
         sampling_seeds, guided_config):
    """Pretrain, forget, sample, evaluate and report on the built-in dataset (or --data-root)."""
    from sfd_ddpm.data import resolve_class
    # Paths the user gave are relative to the current directory; the stages run inside DDPM/, so make them absolute.
    data_root = str(Path(data_root).resolve()) if data_root else None
    guided_config = str(Path(guided_config).resolve()) if guided_config else None
    from sfd_ddpm.demo_report import (class_args, classifier_command, dataset_class_names, dataset_overrides,
                                      default_dir, folder_shortfall, reuse_mismatch)
    from sfd_ddpm import teacher_budget as tb
    try:
        if image_size is None:   # the built-in dataset: 16 px; a folder: from its images
            image_size = 16 if data_root is None else tb.native_image_size(
                data_root, tb.QUICK_MAX_IMAGE_SIZE if quick else tb.MAX_IMAGE_SIZE)
        names = dataset_class_names(data_root, image_size)
        data_args = dataset_overrides(data_root, image_size)
        choice = {"forget": forget, "override": override}   # as given (None: the default)
        forget = resolve_class("index:0" if forget is None else forget, names, "--forget")
        override = resolve_class("index:1" if override is None else override, names, "--override")
        too_small = folder_shortfall(data_root, forget)
    except ValueError as e:   # FolderError is one: empty folder, one class, unknown or ambiguous class
        raise click.UsageError(str(e))
    if forget == override:
        raise click.BadParameter("the override class must differ from the forget class", param_hint="--override")
    if too_small:   # before any training, not after it
        raise click.UsageError(too_small)
    click.echo(f"forget class {forget} ({names[forget]}) into class {override} ({names[override]})", err=True)
    budget = dict(QUICK if quick else FULL)
    if sampling_seeds:
        budget["sampling_seeds"] = sampling_seeds
    teacher_yaml, sfd_yaml, guided_yaml = BACKBONES[backbone]
    guided_yaml = guided_config or guided_yaml
    out = Path(outdir).resolve() if outdir else default_dir("demo")
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. classifier --------------------------------------------------------------------------
    t0 = time.perf_counter()
    clf_path = out / "classifier.safetensors"
    if not clf_path.exists():
        run(classifier_command(clf_path, data_root, image_size, quick))
    elif why := reuse_mismatch("classifier", clf_path, data_root, image_size):
        raise click.UsageError(f"{why}; give another --outdir (or delete it)")
    seconds["classifier"] = time.perf_counter() - t0

    # 2. teacher -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    from sfd_ddpm.config import load_config
    teacher_cfg = load_config(TREE / teacher_yaml, budget["teacher"] + data_args)
    if data_root is None:   # the built-in dataset: the config's fixed, known-good budget
        final = f"network-{teacher_cfg['training']['n_iters']:07d}.safetensors"
        teacher_run = None if retrain_teacher else finished_run(out / "teacher", final)
    else:                   # a folder: sized to it (sfd_ddpm/teacher_budget.py)
        found = None if retrain_teacher else tb.finished_sized_teacher(out / "teacher")
        teacher_run, final = (None, None) if found is None else (found.parent, found.name)
    if teacher_run is not None and (why := reuse_mismatch("teacher", teacher_run, data_root, image_size)):
        raise click.UsageError(f"{why}; give another --outdir or --retrain-teacher")
    if teacher_run is not None:
        click.echo(f"reusing the teacher in {teacher_run}", err=True)
    elif data_root is None:
        run(["train.py", "--config", teacher_yaml, "--outdir", out / "teacher", *budget["teacher"], *data_args])
        teacher_run = finished_run(out / "teacher", final)
    else:
        from sfd_ddpm.folder_data import scan
        sized = [o for o in budget["teacher"] if not o.startswith(("training.n_iters=", "training.snapshot_every="))]
        rec = tb.train_sized_teacher(
            out / "teacher", ["train.py", "--config", teacher_yaml, "--outdir", out / "teacher", *tb.GRID, *sized,
                              *data_args],
            len(scan(data_root)["files"]["train"]), int(teacher_cfg["training"]["batch_size"]), teacher_minutes,
            clf_path, forget, run, tb.QUICK_RULE if quick else tb.RULE)
        teacher_run, final = Path(rec["checkpoint"]).parent, Path(rec["checkpoint"]).name
        click.echo(tb.stop_sentence(rec), err=True)
    teacher_ckpt = teacher_run / final
    seconds["teacher"] = time.perf_counter() - t0

    # 3. SFD, unguided and guided side by side ---------------------------------------------------
    t0 = time.perf_counter()
    configs = {"sfd": sfd_yaml}
    skipped = {}
    if guided_yaml is None:
        skipped["sfd_guided"] = f"no guided SFD config for the {backbone} backbone"
    elif not (TREE / guided_yaml).exists():
        skipped["sfd_guided"] = f"{guided_yaml} does not exist"
    else:
        configs["sfd_guided"] = guided_yaml
    jobs = {}
    for name, yaml in configs.items():
        shutil.rmtree(out / name, ignore_errors=True)
        jobs[name] = ["train.py", "--config", yaml, "--outdir", out / name, f"sfd.init={teacher_ckpt}",
                      *class_args("sfd", forget, override), *budget["sfd"], *data_args]
    timing = run_parallel(jobs, out)
    titles = {"sfd": "SFD", "sfd_guided": "SFD guided"}
    sfd_runs = {name: {"run": next((out / name).iterdir()), "config": yaml, "title": titles[name], **timing[name]}
                for name, yaml in configs.items()}
    seconds["sfd"] = time.perf_counter() - t0

    # 4-6. samples, evaluation, pictures --------------------------------------------------------
    from sfd_ddpm.demo_report import evaluate_and_report
    evaluate_and_report(out, teacher_ckpt, sfd_runs, clf_path, forget, override, budget, seconds, t_all, guidance,
                        skipped, class_choice=choice)


if __name__ == "__main__":
    main()
