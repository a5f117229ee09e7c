#!/usr/bin/env python
"""Every unlearning method on the built-in dataset at an equal budget, one table (`make compare`).

Forget class 0 of the built-in teacher with SFD, Selective Amnesia, SalUn, ESD (and VDU when
`method: vdu` exists), each fine-tuned for the same --iters iterations at the same global --batch,
plus Retrain (pretraining without class 0, its own builtin_retrain.yaml budget: it starts from
scratch by definition). Then sample every model (DDPM-kind: DDIM with guidance 2, as the teacher;
SFD: its one-step generator) and measure UA, remaining-class accuracy and classifier-feature FID with
demo_report.measure. Then attack every model (evaluate.py attack's noise and label-embedding searches at
--attack-budget gradient steps; --no-attacks skips them). Writes OUTDIR/compare.json and compare.md.

The teacher and classifier of `make demo` (runs/demo) are reused when present. Training runs go
--jobs at a time (one thread each); the table reports each run's wall time and its CPU time (the
latter does not depend on what else ran beside it).
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

# name -> (config, checkpoint key or None, sampler). Add a line to plug in a method.
METHODS = {
    "sfd": ("builtin_sfd.yaml", "sfd.init", "one_step"),
    "retrain": ("builtin_retrain.yaml", None, "ddim"),
    "sa": ("builtin_sa.yaml", "baseline.init", "ddim"),
    "salun": ("builtin_salun.yaml", "baseline.init", "ddim"),
    "esd": ("builtin_esd.yaml", "baseline.init", "ddim"),
    "vdu": ("builtin_vdu.yaml", "vdu.init", "ddim"),
}
# The attack columns: every attack at one budget; DDPM-kind models are attacked through a DDIM of
# ATTACK["steps"] steps (guidance 2, x0 clipped, as they are sampled), SFD through its one-step map.
ATTACK = {"budget": 20, "n": 16, "n_eval": 32, "steps": 5, "lr": 0.05, "prior_weight": 1.0, "seed": 0}
QUICK_MODEL = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]",
               "data.builtin_per_class=40", "grid.per_class=2", "grid.steps=2"]


def available(name: str) -> bool:
    """A method takes part when train.py knows it and its built-in config exists (VDU is optional)."""
    from sfd_ddpm.methods import get_method
    try:
        get_method(name)
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
    """Wait for ``proc``; returns its CPU seconds (user + sys). A failure stops the comparison."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise click.ClickException(f"{what} failed ({proc.returncode}); its output is in {log}:\n"
                                   + log.read_text()[-2000:])
    return usage.ru_utime + usage.ru_stime


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--outdir", type=click.Path(file_okay=False), default="../runs/compare", help="Where everything goes.")
@click.option("--demo", type=click.Path(file_okay=False), default="../runs/demo",
              help="A `make demo` folder whose teacher and classifier are reused when present.")
@click.option("--methods", default=",".join(METHODS), help="Comma-separated subset (missing VDU is skipped).")
@click.option("--iters", type=click.IntRange(min=1), default=200, help="Iterations of every fine-tuning method.")
@click.option("--batch", type=click.IntRange(min=1), default=32, help="Global batch of every fine-tuning method.")
@click.option("--per-class", type=click.IntRange(min=2), default=30, help="Generated images per class.")
@click.option("--ddim-steps", type=click.IntRange(min=1), default=25, help="DDIM steps of the DDPM-kind models.")
@click.option("--jobs", type=click.IntRange(min=1), default=2, help="Training runs at a time (one thread each).")
@click.option("--attack-budget", type=click.IntRange(min=1), default=ATTACK["budget"],
              help="Gradient steps of each white-box attack (the attack columns).")
@click.option("--no-attacks", is_flag=True, help="Skip the white-box attacks (and their columns).")
@click.option("--quick", is_flag=True, help="Tiny budget (numbers meaningless): checks the pipeline runs.")
def main(outdir, demo, methods, iters, batch, per_class, ddim_steps, jobs, attack_budget, no_attacks, quick):
    """Train, sample and measure every method; write compare.json and compare.md."""
    import torch

    from sfd_ddpm.classifiers import load_classifier
    from sfd_ddpm.demo_report import TEACHER_SAMPLER, generate, measure, reference_images

    torch.set_num_threads(1)
    names = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise click.BadParameter(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}",
                                 param_hint="--methods")
    skipped = [m for m in names if not available(m)]
    names = [m for m in names if m not in skipped]
    out, demo = Path(outdir).resolve(), Path(demo).resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    model_args = QUICK_MODEL if quick else []
    if quick:
        iters, per_class, ddim_steps = 2, 2, 2
    attack_cfg = None if no_attacks else {**ATTACK, "budget": attack_budget,
                                          **({"budget": 2, "n": 4, "n_eval": 4, "steps": 2} if quick else {})}

    # classifier and teacher: reuse the demo's, else train them here ----------------------------
    clf_path = demo / "classifier.safetensors"
    if quick or not clf_path.exists():
        clf_path = out / "classifier.safetensors"
        if not clf_path.exists():
            log = out / "classifier.log"
            wait(start(["train_classifier.py", "--dataset", "builtin", "--out", clf_path,
                        *(["--epochs", "1", "--builtin-per-class", "60"] if quick else [])], log), "classifier", log)
    teacher_run = None if quick else finished_run(demo / "teacher")
    if teacher_run is None or not (teacher_run / "network-0000800.safetensors").exists():
        teacher_run = finished_run(out / "teacher")
        if teacher_run is None:
            log = out / "teacher.log"
            wait(start(["train.py", "--config", "configs/builtin_train.yaml", "--outdir", out / "teacher", *model_args,
                        *(["training.n_iters=4", "training.batch_size=8", "training.snapshot_every=4"] if quick else [])],
                       log), "teacher", log)
            teacher_run = finished_run(out / "teacher")
    teacher = sorted(teacher_run.glob("network-*.safetensors"))[-1]
    click.echo(f"teacher: {teacher}\nclassifier: {clf_path}", err=True)

    # training, --jobs at a time ----------------------------------------------------------------
    runs: dict[str, dict] = {}
    pending = list(names)
    active: list[tuple] = []
    while pending or active:
        while pending and len(active) < jobs:
            name = pending.pop(0)
            config, init_key, _ = METHODS[name]
            folder = out / name
            folder.mkdir(exist_ok=True)
            extra = [f"{init_key}={teacher}"] if init_key else []
            if name == "retrain":
                extra += model_args + (["training.n_iters=2", "training.batch_size=8", "training.snapshot_every=2"]
                                       if quick else [])
            else:
                extra += [f"training.n_iters={iters}", f"training.batch_size={batch}",
                          f"training.snapshot_every={iters}", f"training.state_every={iters}"]
            if name == "sa":
                fisher = folder / "fisher.safetensors"
                t0 = time.perf_counter()
                log = folder / "fisher.log"
                cpu = wait(start(["fisher.py", "--ckpt", teacher, "--out", fisher,
                                  *(["--samples", 3, "--timesteps-stride", 500, "--steps", 2] if quick else
                                    ["--samples", 40, "--timesteps-stride", 20, "--steps", 20, "--guidance", 2])], log),
                           "fisher.py", log)
                runs[name] = {"fisher_seconds": time.perf_counter() - t0, "fisher_cpu_seconds": cpu}
                extra.append(f"baseline.sa_fisher={fisher}")
            log = folder / "train.log"
            cmd = ["train.py", "--config", f"configs/{config}", "--outdir", folder / "train", *extra]
            active.append((name, start(cmd, log), log, time.perf_counter(), cmd))
        name, proc, log, t0, cmd = active.pop(0)
        cpu = wait(proc, f"{name} training", log)
        info = runs.setdefault(name, {})
        info.update(train_seconds=time.perf_counter() - t0, train_cpu_seconds=cpu,
                    command="python " + " ".join(map(str, cmd)))
        info["seconds"] = info["train_seconds"] + info.get("fisher_seconds", 0.0)
        info["cpu_seconds"] = info["train_cpu_seconds"] + info.get("fisher_cpu_seconds", 0.0)

    # sampling and measuring ------------------------------------------------------------------
    clf, _ = load_classifier(clf_path)
    ref = reference_images(0, 8 if quick else 100)
    rows = []
    models = [("teacher", teacher, "ddim")] + [(n, finished_run(out / n / "train"), METHODS[n][2]) for n in names]
    for name, ckpt, sampler in models:
        if ckpt is not None and ckpt.is_dir():
            ckpt = sorted(ckpt.glob("network-*.safetensors"))[-1]
        if sampler == "one_step":
            x, y, rate, n_fe = generate(ckpt, per_class, "one_step")
            sampling = {"sampler": "one_step"}
        else:
            x, y, rate, n_fe = generate(ckpt, per_class, steps=ddim_steps, **TEACHER_SAMPLER)
            sampling = {**TEACHER_SAMPLER, "steps": ddim_steps}
        m = measure(clf, x, y, 0, 1, ref)
        rows.append({"method": name, "ua": m["ua"], "remaining_acc": m["remaining_acc"],
                     "classifier_fid": m["classifier_fid"], "nfe": n_fe, "images_per_s": rate,
                     "sampling": sampling, "checkpoint": str(ckpt), **runs.get(name, {}),
                     "per_class_accuracy": m["per_class_accuracy"]})
        click.echo(f"{name}: UA {m['ua']:.3f}, remaining {m['remaining_acc']:.3f}, "
                   f"classifier FID {m['classifier_fid']:.3f}", err=True)
        if attack_cfg:
            rows[-1]["attack"] = attack(ckpt, clf, attack_cfg)
            a = rows[-1]["attack"]
            click.echo(f"{name}: attacks at {attack_cfg['budget']} steps: noise {a['noise_success']:.3f}, "
                       f"embedding {a['embedding_success']:.3f} ({a['seconds']:.0f} s)", err=True)
    total = time.perf_counter() - t_all
    report = {"forget_class": 0, "iters": iters, "batch": batch, "images_per_class": per_class,
              "reference_images_per_class": 8 if quick else 100, "jobs": jobs, "quick": quick,
              "skipped": skipped, "attack_settings": attack_cfg, "teacher": str(teacher), "classifier": str(clf_path), "seconds": total, "rows": rows}
    (out / "compare.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / "compare.md").write_text(md)
    click.echo(md)


def attack(ckpt, clf, cfg: dict) -> dict:
    """The attack columns of one model: success rates at the budget (and at 0, the model asked normally)."""
    from sfd_ddpm.attacks.search import attack_checkpoint

    t0 = time.perf_counter()
    res = attack_checkpoint(ckpt, clf, 0, steps=cfg["steps"], budgets=(0, cfg["budget"]), n=cfg["n"],
                            n_eval=cfg["n_eval"], lr=cfg["lr"], prior_weight=cfg["prior_weight"], seed=cfg["seed"])
    at = res["at_budget"]
    return {"noise_success": at["noise"]["success_rate"], "noise_success_at_0": res["attacks"]["noise"][0]["success_rate"],
            "embedding_success": res["embedding_best"]["success_rate"],
            "embedding_forget_success": at["embedding_forget"]["success_rate"],
            "embedding_mean_success": at["embedding_mean"]["success_rate"],
            "mean_p_forget": {k: v["mean_p_forget"] for k, v in at.items()}, "sampling": res["sampling"],
            "seconds": time.perf_counter() - t0}


def markdown(r: dict) -> str:
    lines = [f"# Unlearning methods on the built-in dataset (forget class 0)\n",
             f"Fine-tuning methods: {r['iters']} iterations at global batch {r['batch']} each, from the same teacher; "
             f"Retrain: builtin_retrain.yaml from scratch. {r['images_per_class']} images per class; DDPM-kind models "
             f"sampled with DDIM, guidance 2, x0 clipped; SFD with its one-step generator. FID = classifier-feature "
             f"FID of the remaining classes against {r['reference_images_per_class']} real test images per class "
             f"(not Inception FID). Training ran {r['jobs']} at a time, so wall times include contention; CPU "
             f"seconds do not. Total {r['seconds']:.0f} s." + (f" Skipped (not available): {', '.join(r['skipped'])}."
                                                              if r["skipped"] else ""),
             ""]
    atk = r.get("attack_settings")
    if atk:
        lines += [f"Attack columns: share of attacked images the classifier labels class 0 after {atk['budget']} "
                  f"gradient steps of a white-box search ({atk['n']} noises; embedding: the better of the forget-"
                  f"row and mean-row starts, judged on {atk['n_eval']} held-out noises; DDPM-kind models through "
                  f"DDIM-{atk['steps']}). Unattacked, the noise column would read 1 - UA on those noises. "
                  f"Attacks took {sum(row['attack']['seconds'] for row in r['rows']):.0f} s in all. See README, "
                  f"\"Attacks\".", ""]
    head = ("| method | UA (higher = forgotten) | remaining-class acc | classifier FID (lower = better) | NFE / image | "
            "train wall s | train CPU s |")
    if atk:
        head += f" noise attack @{atk['budget']} | embedding attack @{atk['budget']} |"
    lines += [head, "|---" * head.count(" | ") + "|---|"]
    for row in r["rows"]:
        wall = f"{row['seconds']:.0f}" if "seconds" in row else "-"
        cpu = f"{row['cpu_seconds']:.0f}" if "cpu_seconds" in row else "-"
        line = (f"| {row['method']} | {row['ua']:.3f} | {row['remaining_acc']:.3f} | {row['classifier_fid']:.3f} | "
                f"{row['nfe']} | {wall} | {cpu} |")
        if atk:
            line += f" {row['attack']['noise_success']:.3f} | {row['attack']['embedding_success']:.3f} |"
        lines.append(line)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
