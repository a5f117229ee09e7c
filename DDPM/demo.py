#!/usr/bin/env python
"""The whole SFD pipeline on the built-in dataset, end to end, with no network (`make demo`).

classifier -> pretrained teacher (reused when already there) -> SFD forgetting class 0 into 1 ->
samples from the teacher (DDIM) and from the one-step generator -> unlearning accuracy, remaining-class
accuracy and classifier-feature FID -> report.json, report.md, a teacher-vs-SFD picture and a plot of
UA / remaining-class quality over SFD training (from its snapshots). Every stage is timed.

The training stages run the real entry scripts (train_classifier.py, train.py), so the commands it
prints are the ones a user would type.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

TREE = Path(__file__).resolve().parent
sys.path.insert(0, str(TREE))

# A few minutes on 2 CPU cores. --quick shrinks everything to seconds (used by the tests).
FULL = {"teacher": [], "sfd": [], "per_class": 50, "ref_per_class": 200, "curve_per_class": 30, "ddim_steps": 50,
        "edm_steps": 18}
QUICK_MODEL = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]",
               "data.builtin_per_class=40", "grid.per_class=2", "grid.steps=2"]
QUICK = {"teacher": [*QUICK_MODEL, "training.n_iters=6", "training.snapshot_every=6", "training.batch_size=8"],
         "sfd": ["training.n_iters=4", "training.snapshot_every=2", "training.batch_size=8", "grid.per_class=2"],
         "per_class": 4, "ref_per_class": 8, "curve_per_class": 2, "ddim_steps": 3, "edm_steps": 2}
# --backbone: (teacher config, SFD config)
BACKBONES = {"ddpm": ("configs/builtin_train.yaml", "configs/builtin_sfd.yaml"),
             "edm": ("configs/builtin_edm_train.yaml", "configs/builtin_edm_sfd.yaml")}


def run(cmd: list[str]) -> None:
    click.echo("$ " + " ".join(str(c) for c in cmd), err=True)
    subprocess.run([sys.executable, *map(str, cmd)], cwd=TREE, check=True)


def finished_run(parent: Path, final: str) -> Path | None:
    """The newest run under ``parent`` whose final snapshot exists (so an interrupted run is not reused)."""
    runs = sorted(p for p in parent.glob("*") if (p / final).exists()) if parent.exists() else []
    return runs[-1] if runs else None


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--outdir", type=click.Path(file_okay=False), default="../runs/demo", help="Where everything goes.")
@click.option("--forget", type=click.IntRange(0, 9), default=0, help="Class to forget.")
@click.option("--override", type=click.IntRange(0, 9), default=1, help="Override class the teacher is asked for.")
@click.option("--quick", is_flag=True, help="Tiny budget (seconds; numbers meaningless): checks the pipeline runs.")
@click.option("--retrain-teacher", is_flag=True, help="Pretrain a new teacher even if one is present.")
@click.option("--backbone", type=click.Choice(list(BACKBONES)), default="ddpm",
              help="ddpm = the DDPM UNet (DDIM teacher samples); edm = the EDM SongUNet (EDM Heun teacher samples, "
                   "SiD/SFD in sigma space).")
def main(outdir, forget, override, quick, retrain_teacher, backbone):
    """Pretrain, forget, sample, evaluate and report on the built-in dataset."""
    if forget == override:
        raise click.BadParameter("the override class must differ from the forget class", param_hint="--override")
    budget = QUICK if quick else FULL
    teacher_yaml, sfd_yaml = BACKBONES[backbone]
    out = Path(outdir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    t_all = time.perf_counter()

    # 1. classifier --------------------------------------------------------------------------
    t0 = time.perf_counter()
    clf_path = out / "classifier.safetensors"
    if not clf_path.exists():
        run(["train_classifier.py", "--dataset", "builtin", "--out", clf_path,
             *(["--epochs", "1", "--builtin-per-class", "60"] if quick else [])])
    seconds["classifier"] = time.perf_counter() - t0

    # 2. teacher -----------------------------------------------------------------------------
    t0 = time.perf_counter()
    from sfd_ddpm.config import load_config
    teacher_cfg = load_config(TREE / teacher_yaml, budget["teacher"])
    final = f"network-{teacher_cfg['training']['n_iters']:07d}.safetensors"
    teacher_run = None if retrain_teacher else finished_run(out / "teacher", final)
    if teacher_run is None:
        run(["train.py", "--config", teacher_yaml, "--outdir", out / "teacher", *budget["teacher"]])
        teacher_run = finished_run(out / "teacher", final)
    else:
        click.echo(f"reusing the teacher in {teacher_run}", err=True)
    teacher_ckpt = teacher_run / final
    seconds["teacher"] = time.perf_counter() - t0

    # 3. SFD ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    shutil.rmtree(out / "sfd", ignore_errors=True)
    run(["train.py", "--config", sfd_yaml, "--outdir", out / "sfd", f"sfd.init={teacher_ckpt}",
         f"sfd.forget=[{forget}]", f"sfd.override={override}", *budget["sfd"]])
    sfd_run = next((out / "sfd").iterdir())
    seconds["sfd"] = time.perf_counter() - t0

    # 4-6. samples, evaluation, pictures --------------------------------------------------------
    from sfd_ddpm.demo_report import EDM_TEACHER_SAMPLER, TEACHER_SAMPLER, evaluate_and_report
    evaluate_and_report(out, teacher_ckpt, sfd_run, clf_path, forget, override, budget, seconds, t_all,
                        EDM_TEACHER_SAMPLER if backbone == "edm" else TEACHER_SAMPLER)


if __name__ == "__main__":
    main()
