"""The evaluation half of the demo: sample the teacher and the SFD generator, measure, draw, report."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoints import file_hash
from .classifiers import load_classifier
from .data import BUILTIN_CLASSES, load_dataset
from .images import save_images
from .loading import denoiser_for, load_network
from .metrics.fid import classifier_fid
from .metrics.record import library_versions
from .metrics.ua import evaluate_ua
from .samplers import image_seed, nfe, sample

TEACHER_SAMPLER = {"sampler": "ddim", "eta": 0.0, "guidance": 2.0, "clip_x0": True}
EDM_TEACHER_SAMPLER = {"sampler": "edm", "guidance": 2.0}  # EDM's Heun sampler (2 * steps - 1 NFE)


def generate(ckpt, per_class: int, sampler: str, steps: int = 50, eta: float = 0.0, guidance: float = 0.0,
             clip_x0: bool = False, network: str | None = None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(images, labels, images/s, NFE per image) for ``per_class`` images of each class."""
    net, cfg, meta = load_network(ckpt, name=network)
    den = denoiser_for(net, cfg)
    d = cfg["data"]
    shape = (d["channels"], d["image_size"], d["image_size"])
    labels = torch.arange(d["n_classes"]).repeat_interleave(per_class)
    seeds = [image_seed(seed, int(c), i % per_class) for i, c in enumerate(labels)]
    kw = dict(steps=steps, eta=eta, guidance=guidance, clip_x0=clip_x0, t_init=den.schedule.generator_level(cfg["sfd"]))
    sample(den, sampler, labels[:2], seeds[:2], shape, **kw)  # warm-up, not timed
    start = time.perf_counter()
    x = torch.cat([sample(den, sampler, labels[k:k + 500], seeds[k:k + 500], shape, **kw)
                   for k in range(0, len(labels), 500)])
    rate = len(labels) / (time.perf_counter() - start)
    return x, labels, rate, nfe(sampler, steps, guidance, cfg["diffusion"]["num_timesteps"])


def reference_images(forget: int, per_class: int) -> torch.Tensor:
    """Real built-in test images of the remaining classes (the FID reference)."""
    ds = load_dataset("builtin", split="test", image_size=16)
    keep = [i for c in range(10) if c != forget for i in [j for j, t in enumerate(ds.targets) if t == c][:per_class]]
    return ds.images[keep]


def measure(clf, x, labels, forget: int, override: int, ref) -> dict:
    ua = evaluate_ua(clf, x, labels, [forget])
    remain = labels != forget
    pred_forget = ua["per_forget_class"][str(forget)]["predicted_counts"]
    return {"ua": ua["ua"], "mean_p_forget": ua["mean_p_forget"], "mean_entropy": ua["mean_entropy"],
            "override_rate": pred_forget[override] / ua["n_forget_images"],
            "remaining_acc": ua["remaining_accuracy"], "per_class_accuracy": ua["per_class_accuracy"],
            "classifier_fid": classifier_fid(clf, x[remain], ref)}


def learning_curve(sfd_run: Path, teacher_ckpt: Path, clf, forget, override, ref, per_class: int) -> list[dict]:
    """UA / remaining accuracy / classifier FID of the one-step generator EMA at each SFD snapshot
    (iteration 0 = the teacher's weights used as a one-step generator, SFD's starting point)."""
    points = []
    snaps = [(0, teacher_ckpt, "ema")] + [(int(p.stem.split("-")[1]), p, "generator_ema")
                                          for p in sorted(sfd_run.glob("network-*.safetensors"))]
    for step, path, name in snaps:
        x, y, _, _ = generate(path, per_class, "one_step", network=name, seed=1)
        m = measure(clf, x, y, forget, override, ref)
        points.append({"step": step, **{k: m[k] for k in ("ua", "remaining_acc", "classifier_fid", "override_rate")}})
    return points


def comparison_picture(x_t, x_s, per_class: int, path: Path, title_t: str, title_s: str, show: int = 8) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    def grid(x):
        rows = torch.cat([x[c * per_class:c * per_class + show] for c in range(10)])
        g = make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=show, padding=1, pad_value=1.0)
        return g.permute(1, 2, 0).numpy()

    fig, axes = plt.subplots(1, 2, figsize=(11, 7.4))
    for ax, x, title in ((axes[0], x_t, title_t), (axes[1], x_s, title_s)):
        ax.imshow(grid(x), interpolation="nearest")
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        size = x.shape[-1] + 1
        ax.set_yticks([size * c + size / 2 for c in range(10)])
        ax.set_yticklabels([f"{c}: {BUILTIN_CLASSES[c][0]}" for c in range(10)], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_picture(points: list[dict], path: Path, forget: int, override: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(steps, [p["ua"] for p in points], "o-", label=f"UA (class {forget} not recognised)")
    ax.plot(steps, [p["override_rate"] for p in points], "s--", label=f"class-{forget} samples seen as {override}")
    ax.plot(steps, [p["remaining_acc"] for p in points], "^-", label="remaining-class accuracy")
    ax.set_xlabel("SFD iteration")
    ax.set_ylim(-0.02, 1.02)
    ax2 = ax.twinx()
    ax2.plot(steps, [p["classifier_fid"] for p in points], "k:", label="classifier-feature FID (remaining)")
    ax2.set_ylabel("classifier-feature FID")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], fontsize=8, loc="center right")
    ax.set_title("One-step generator (EMA) during SFD")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_and_report(out: Path, teacher_ckpt: Path, sfd_run: Path, clf_path: Path, forget: int, override: int,
                        budget: dict, seconds: dict, t_all: float, teacher_sampler: dict = TEACHER_SAMPLER) -> dict:
    t0 = time.perf_counter()
    per_class = budget["per_class"]
    sfd_ckpt = sorted(sfd_run.glob("network-*.safetensors"))[-1]
    steps = budget["edm_steps" if teacher_sampler["sampler"] == "edm" else "ddim_steps"]
    x_t, y, rate_t, nfe_t = generate(teacher_ckpt, per_class, steps=steps, **teacher_sampler)
    x_s, _, rate_s, nfe_s = generate(sfd_ckpt, per_class, "one_step")
    for name, x in (("teacher", x_t), ("sfd", x_s)):
        save_images(x, y.tolist(), [i % per_class for i in range(len(y))], out / "samples" / name)
    seconds["sampling"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    clf, clf_meta = load_classifier(clf_path)
    ref = reference_images(forget, budget["ref_per_class"])
    m_t = measure(clf, x_t, y, forget, override, ref)
    m_s = measure(clf, x_s, y, forget, override, ref)
    points = learning_curve(sfd_run, teacher_ckpt, clf, forget, override, ref, budget["curve_per_class"])
    seconds["evaluation"] = time.perf_counter() - t0

    teacher_desc = f"teacher: {teacher_sampler['sampler'].upper()}-{steps}, guidance w={teacher_sampler['guidance']} ({nfe_t} NFE)"
    comparison_picture(x_t, x_s, per_class, out / "comparison.png", teacher_desc, "SFD one-step generator (1 NFE)")
    curve_picture(points, out / "curve.png", forget, override)
    seconds_total = time.perf_counter() - t_all
    report = {
        "forget_class": forget, "override_class": override,
        "ua_teacher": m_t["ua"], "ua_sfd": m_s["ua"],
        "remaining_acc_teacher": m_t["remaining_acc"], "remaining_acc_sfd": m_s["remaining_acc"],
        "fid_teacher": m_t["classifier_fid"], "fid_sfd": m_s["classifier_fid"],
        "fid_kind": "classifier_fid: FID in the penultimate-feature space of the built-in classifier, remaining "
                    "classes vs real built-in test images (not Inception FID)",
        "override_rate_teacher": m_t["override_rate"], "override_rate_sfd": m_s["override_rate"],
        "nfe_teacher": nfe_t, "nfe_sfd": nfe_s,
        "images_per_s_teacher": rate_t, "images_per_s_sfd": rate_s, "speedup": rate_s / rate_t,
        "seconds": seconds_total, "stage_seconds": seconds,
        "details": {"teacher": m_t, "sfd": m_s, "curve": points},
        "settings": {
            "images_per_class": per_class, "reference_images_per_class": budget["ref_per_class"],
            "teacher_sampler": {**teacher_sampler, "steps": steps}, "sfd_sampler": {"sampler": "one_step"},
            "teacher_checkpoint": str(teacher_ckpt), "teacher_sha256": file_hash(teacher_ckpt),
            "sfd_checkpoint": str(sfd_ckpt), "sfd_sha256": file_hash(sfd_ckpt),
            "sfd_config": json.loads((sfd_run / "config.json").read_text())["sfd"],
            "classifier": str(clf_path), "classifier_sha256": file_hash(clf_path),
            "classifier_test_accuracy": clf_meta.get("test_accuracy"),
            "threads": torch.get_num_threads(), "versions": library_versions(),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report)
    (out / "report.md").write_text(
        f"# SFD demo on the built-in dataset\n\nForget class {forget} ({BUILTIN_CLASSES[forget][0]}) into "
        f"override {override} ({BUILTIN_CLASSES[override][0]}).\n\n{table}\n\n"
        f"Stage times (s): {', '.join(f'{k} {v:.0f}' for k, v in seconds.items())}; total {seconds_total:.0f}.\n\n"
        "![teacher vs SFD](comparison.png)\n\n![SFD training curve](curve.png)\n")
    print("\n" + table)
    print(f"\nstage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()) + f"; total {seconds_total:.0f}")
    print(f"report: {out / 'report.json'}, {out / 'report.md'}, pictures: {out / 'comparison.png'}, {out / 'curve.png'}")
    return report


def markdown_table(r: dict) -> str:
    rows = [("", "teacher (multi-step)", "SFD (one step)"),
            ("unlearning accuracy (class %d), higher = forgotten" % r["forget_class"], r["ua_teacher"], r["ua_sfd"]),
            ("class-%d samples classified as %d" % (r["forget_class"], r["override_class"]),
             r["override_rate_teacher"], r["override_rate_sfd"]),
            ("remaining-class accuracy", r["remaining_acc_teacher"], r["remaining_acc_sfd"]),
            ("classifier-feature FID, remaining classes (lower = better)", r["fid_teacher"], r["fid_sfd"]),
            ("network evaluations per image", r["nfe_teacher"], r["nfe_sfd"]),
            ("images / s (this machine)", r["images_per_s_teacher"], r["images_per_s_sfd"])]
    fmt = lambda v: v if isinstance(v, str) else (f"{v:d}" if isinstance(v, int) else f"{v:.3f}" if v < 10 else f"{v:.1f}")
    lines = [f"| {' | '.join(fmt(v) for v in row)} |" for row in rows]
    return "\n".join([lines[0], "|---|---|---|", *lines[1:]])
