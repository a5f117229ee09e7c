"""The evaluation half of the demo: sample every model under the protocol (sfd_ddpm/protocol.py) at a few
sampling seeds, measure, draw, report. compare.py uses sample_and_measure too."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .checkpoints import file_hash
from .classifiers import load_classifier
from .data import class_names, load_dataset
from .images import save_images
from .loading import denoiser_for, load_network
from .metrics.fid import classifier_fid
from .metrics.record import library_versions
from .metrics.ua import evaluate_ua
from .protocol import Variant, mean_interval
from .samplers import image_seed, nfe, sample
from .teacher_budget import CHECKS_FILE, stop_sentence

# The numbers every report gives per row, each a mean with a 95% interval over seeds.
METRICS = ("ua", "override_rate", "remaining_acc", "classifier_fid", "mean_p_forget", "images_per_s")


# A UA means something only beside a teacher that draws the classes: below these accuracies (the
# teacher's own samples, judged by the same classifier, means over the sampling seeds) the reports warn
# in their first lines that the table cannot carry a conclusion (README, "When the report cannot judge").
TEACHER_MIN_FORGET = 0.80      # the teacher's forget-class samples the classifier labels as that class
TEACHER_MIN_REMAINING = 0.80   # its remaining-class samples labelled as the class asked for


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


def reference_set(forget: int, per_class: int, data: dict | None = None) -> tuple[torch.Tensor, dict]:
    """(images, record): real test images of the remaining classes, the first ``per_class`` of each (the
    FID reference), and what was actually read: {"requested_per_class", "per_class": {name: n},
    "n_images", "split"}. ``data``: the teacher config's data section (None = the built-in dataset at
    16 px); a class folder's test images are its fixed held-out split, often fewer than requested."""
    data = data or {"dataset": "builtin", "image_size": 16}
    ds = load_dataset(data["dataset"], root=data.get("root") or "./data", image_size=data["image_size"], split="test",
                      download=False)
    targets = [int(t) for t in ds.targets]
    by_class = {c: [j for j, t in enumerate(targets) if t == c][:per_class] for c in sorted(set(targets)) if c != forget}
    keep = [i for idx in by_class.values() for i in idx]
    names = class_names(ds)
    images = torch.stack([ds[i][0] for i in keep]) if not hasattr(ds, "images") else ds.images[keep]
    split = "held-out split of the class folder" if data["dataset"] == "folder" else "test split"
    return images, {"requested_per_class": per_class, "n_images": len(keep), "split": split,
                    "per_class": {names[c]: len(idx) for c, idx in by_class.items()}}


def reference_images(forget: int, per_class: int, data: dict | None = None) -> torch.Tensor:
    """The images of reference_set."""
    return reference_set(forget, per_class, data)[0]


def feature_dim(clf, image: torch.Tensor) -> int:
    """The dimension of the classifier-feature space the FID is measured in (one image through it)."""
    from .metrics.fid import ClassifierFeatureSpace
    return int(ClassifierFeatureSpace(clf).extract(image[:1])[0].shape[1])


def reference_summary(record: dict, dim: int, generated_per_seed: int | None = None) -> dict:
    """The FID set sizes as the reports state them: the reference record with the feature dimension and a
    warning when the reference set (or one seed's generated images) holds fewer images than that
    dimension: the covariance is then singular and FID moves with the draw of images, not the model."""
    small = []
    if record["n_images"] < dim:
        small.append(f"the FID reference holds {record['n_images']} real images, fewer than the {dim} dimensions of "
                     f"the classifier features")
    if generated_per_seed is not None and generated_per_seed < dim:
        small.append(f"each seed's FID uses {generated_per_seed} generated images, fewer than the {dim} feature "
                     f"dimensions")
    warning = None if not small else (
        "; ".join(small) + ": the FID is unstable (its covariance is singular); read it only beside numbers "
        "measured against the same references, or use more reference images (a class folder: more held-out "
        "images) and more generated images per class")
    return {**record, "feature_dim": dim, "generated_per_seed": generated_per_seed, "warning": warning}


def reference_sentence(ref: dict) -> str:
    """'1800 real test images (200 per class)' or, where classes differ, their range."""
    counts = list(ref["per_class"].values())
    per = f"{counts[0]} per class" if len(set(counts)) == 1 else f"{min(counts)}-{max(counts)} per class"
    return f"{ref['n_images']} real images of the remaining classes from the {ref['split']} ({per})"


def flip_sentence(teacher_flip, classifier_hflip) -> str:
    """The left-right flip settings: the teacher's data.random_flip and the evaluation classifier's hflip."""
    said = lambda v: "unknown" if v is None else "on" if v else "off"  # noqa: E731
    return (f"Random left-right flips: teacher training {said(teacher_flip)} (data.random_flip), evaluation "
            f"classifier {said(classifier_hflip)}.")


def folder_shortfall(data_root, forget: int, forget_train_images: int = 0) -> str | None:
    """Why the class folder is too small for the demo / comparison (None: it is not), from the file names
    alone, before any training. The FID needs at least 2 held-out images of the remaining classes; VDU's
    D_f (``forget_train_images`` = vdu.forget_subset) that many training images of the forget class."""
    if data_root is None:
        return None
    from .folder_data import held_out_files, scan
    info = scan(data_root)
    names = info["classes"]
    count = lambda split, c: sum(1 for _, y in info["files"][split] if y == c)  # noqa: E731
    held_out = sum(count("test", c) for c in range(len(names)) if c != forget)
    if held_out < 2:
        need = _images_for(lambda n: len(held_out_files("x", [str(i) for i in range(n)])) >= 2)
        return (f"{data_root} holds {held_out} held-out image(s) of the remaining classes; the FID needs at least 2: "
                f"give a remaining class at least {need} images (10% are held out)")
    have = count("train", forget)
    if have < forget_train_images:
        need = _images_for(lambda n: n - len(held_out_files("x", [str(i) for i in range(n)])) >= forget_train_images)
        return (f"class folder {names[forget]!r} of {data_root} holds {have} training images (after the 10% held "
                f"out) but VDU reads {forget_train_images} (vdu.forget_subset): it needs at least {need} images, "
                f"or leave vdu out (--methods)")
    return None


def _images_for(enough) -> int:
    """The smallest number of images of one class for which ``enough(n)`` holds."""
    n = 2
    while not enough(n):
        n += 1
    return n


# --- the demo's and compare's data: the built-in dataset, or the user's class folder (--data-root) ---------

# Where the demo and the comparison write by default: the repository's runs/ folder (the one `make demo`
# and `make compare` use), whatever the current directory. An explicit --outdir / --demo is a path
# relative to the current directory, as for every other script.
REPO_RUNS = Path(__file__).resolve().parents[2] / "runs"


def default_dir(name: str) -> Path:
    """REPO_RUNS / name: runs/demo, runs/compare."""
    return REPO_RUNS / name


def dataset_overrides(data_root, image_size: int) -> list[str]:
    """The train.py overrides for the data: none for the built-in dataset (the configs' own), the class
    folder's (dataset, root, n_classes, image size) otherwise."""
    if data_root is None:
        return []
    from .folder_data import config_overrides
    return config_overrides(data_root, image_size)


def dataset_class_names(data_root, image_size: int) -> list[str]:
    if data_root is None:
        return class_names("builtin")
    from .folder_data import find_classes
    return find_classes(data_root)


def class_args(method: str, forget: int, override: int) -> list[str]:
    """The train.py overrides that set a method's forget class (and SFD's override) by index. Written
    index:N so that a folder named by a number can never be read instead (data.resolve_class)."""
    if method in ("sfd", "sfd_guided"):
        return [f"sfd.forget=[index:{forget}]", f"sfd.override=index:{override}"]
    return [f"{'vdu' if method == 'vdu' else 'baseline'}.forget=[index:{forget}]"]


def classifier_command(path, data_root, image_size: int, quick: bool) -> list:
    """train_classifier.py for the data (a folder: its recipe, sized by --target-steps)."""
    if data_root is None:
        return ["train_classifier.py", "--dataset", "builtin", "--out", path,
                *(["--epochs", "1", "--builtin-per-class", "60"] if quick else [])]
    return ["train_classifier.py", "--dataset", "folder", "--root", data_root, "--image-size", image_size, "--out", path,
            *(["--epochs", "1"] if quick else [])]


def reuse_mismatch(what: str, path: Path, data_root, image_size: int) -> str | None:
    """Why the classifier file or teacher run at ``path`` was not trained on this data (None: it was), so that a
    demo folder of one dataset is never silently reused for another."""
    want = ("folder" if data_root else "builtin", dataset_class_names(data_root, image_size),
            image_size if data_root else 16)
    if what == "classifier":
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        names = json.loads(meta.get("class_names") or "null") or class_names(meta["dataset"])
        have = (meta["dataset"], names, int(meta["image_size"]))
    else:
        d = json.loads((path / "config.json").read_text())["data"]
        have = (d["dataset"], class_names(d), int(d["image_size"]))
        if data_root and d.get("root") and Path(d["root"]).resolve() != Path(data_root).resolve():
            return f"the {what} in {path} was trained on {d['root']}, not {data_root}"
    if have != want:
        return (f"the {what} in {path} was trained on {have[0]} ({len(have[1])} classes, {have[2]} px), not on "
                f"{want[0]} ({len(want[1])} classes, {want[2]} px)")
    return None


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


def comparison_picture(panels: list[tuple[torch.Tensor, str]], per_class: int, path: Path, names: list[str],
                       show: int = 8) -> None:
    """One panel per (images, title), one row per class (the first ``show`` images of each), labelled by
    ``names``."""
    show = min(show, per_class)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    def grid(x):
        rows = torch.cat([x[c * per_class:c * per_class + show] for c in range(len(names))])
        g = make_grid((rows.clamp(-1, 1) + 1) / 2, nrow=show, padding=1, pad_value=1.0)
        return g.permute(1, 2, 0).numpy()

    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 1.6 + 0.58 * len(names)), squeeze=False)
    for ax, (x, title) in zip(axes[0], panels):
        ax.imshow(grid(x), interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        size = x.shape[-1] + 1
        ax.set_yticks([size * c + size / 2 for c in range(len(names))])
        ax.set_yticklabels([f"{c}: {name}" for c, name in enumerate(names)], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def curve_picture(curves: dict[str, list[dict]], path: Path, forget: int, override: int) -> None:
    """One panel per SFD run ({title: points}): UA, override rate, remaining accuracy and classifier FID."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 3.8), squeeze=False)
    for ax, (title, points) in zip(axes[0], curves.items()):
        steps = [p["step"] for p in points]
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
        ax.set_title(f"{title}: one-step generator (EMA) during SFD", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_and_measure(ckpt, variant: Variant, seeds: list[int], per_class: int, clf, forget: int, override: int,
                       ref, save_dir: Path | None = None) -> dict:
    """Sample ``per_class`` images per class under ``variant`` at each sampling seed, measure each seed's
    images on its own, and summarise every metric as a mean with a 95% t interval over the seeds.
    Returns {'per_seed': [...], 'metrics': {name: interval}, 'images': first seed's images, 'labels'}."""
    per_seed, first = [], None
    for seed in seeds:
        x, y, rate, n_fe = generate(ckpt, per_class, seed=seed, **variant.sample_kwargs())
        if n_fe != variant.nfe:   # the header states NFE: it must be the sampler's
            raise RuntimeError(f"{variant.header}: the sampler used {n_fe} NFE")
        if save_dir is not None:
            save_images(x, y.tolist(), [i % per_class for i in range(len(y))], Path(save_dir) / f"seed{seed}")
        m = measure(clf, x, y, forget, override, ref)
        per_seed.append({"seed": seed, **{k: m[k] for k in METRICS if k in m}, "images_per_s": rate,
                         "per_class_accuracy": m["per_class_accuracy"]})
        first = (x, y) if first is None else first
    return {"per_seed": per_seed, "metrics": summarise(per_seed), "images": first[0], "labels": first[1]}


def summarise(per_seed: list[dict]) -> dict:
    """{metric: mean_interval over the seeds} for every metric in METRICS the records hold."""
    return {k: mean_interval([r[k] for r in per_seed]) for k in METRICS if all(k in r for r in per_seed)}


def evaluate_and_report(out: Path, teacher_ckpt: Path, sfd_runs: dict[str, dict], clf_path: Path, forget: int,
                        override: int, budget: dict, seconds: dict, t_all: float, guidance: float,
                        skipped: dict | None = None, class_choice: dict | None = None) -> dict:
    """Sample, measure and report. ``sfd_runs``: {name: {'run': run dir, 'title': ..., 'config': yaml}};
    ``class_choice``: {'forget', 'override'} as the user gave them (None: the default)."""
    import shutil

    from .protocol import checkpoint_variants, distillation_target, multi_step_variants
    from .checkpoints import read_metadata

    t0 = time.perf_counter()
    seeds = list(range(budget["sampling_seeds"]))
    per_class = budget["per_class"]
    from .classifiers import classifier_quality_note
    clf, clf_meta = load_classifier(clf_path)
    teacher_cfg = read_metadata(teacher_ckpt)["config"]
    names = class_names(teacher_cfg)
    ref, ref_record = reference_set(forget, budget["ref_per_class"], teacher_cfg["data"])
    reference = reference_summary(ref_record, feature_dim(clf, ref), per_class * (len(names) - 1))
    if reference["warning"]:
        click_echo(f"WARNING: {reference['warning']}")
    steps = {"ddim_steps": budget["ddim_steps"], "edm_steps": budget["edm_steps"]}
    generators = {}
    for name, info in sfd_runs.items():
        ckpt = sorted(Path(info["run"]).glob("network-*.safetensors"))[-1]
        (variant,) = checkpoint_variants(ckpt)
        generators[name] = (ckpt, variant)
    teacher_variants = multi_step_variants(read_metadata(teacher_ckpt)["config"], guidance,
                                           extra_w=tuple(v.w for _, v in generators.values()), **steps)
    models = [("teacher", "teacher", teacher_ckpt, v) for v in teacher_variants]
    models += [(name, sfd_runs[name]["title"], ckpt, v) for name, (ckpt, v) in generators.items()]
    shutil.rmtree(out / "samples", ignore_errors=True)
    rows, panels = [], []
    for model, title, ckpt, variant in models:
        key = model if variant.key == "distilled" else f"{model}_{variant.key}"
        res = sample_and_measure(ckpt, variant, seeds, per_class, clf, forget, override, ref, out / "samples" / key)
        target = distillation_target(variant, teacher_variants) if variant.sampler == "one_step" else None
        rows.append({"key": key, "model": model, "title": title, "label": variant.label(title),
                     "variant": variant.as_dict(), "nfe": variant.nfe,
                     "distillation_target": None if target is None else f"teacher_{target.key}",
                     "checkpoint": str(ckpt), "sha256": file_hash(ckpt), "samples": str(out / "samples" / key),
                     "metrics": res["metrics"], "per_seed": res["per_seed"]})
        panels.append((res["images"], f"{title}\n{variant.header}"))
        click_echo(f"{variant.label(title)}: " + ", ".join(
            f"{k} {v['mean']:.3f}" for k, v in res["metrics"].items() if k != "images_per_s"))
    by_key = {r["key"]: r for r in rows}
    check = attach_teacher_accuracy(rows, forget, names[forget])
    if check["warning"]:
        click_echo(f"WARNING: {check['warning']}")
    for r in rows:
        if r["distillation_target"]:
            r["speedup_vs_target"] = (r["metrics"]["images_per_s"]["mean"]
                                      / by_key[r["distillation_target"]]["metrics"]["images_per_s"]["mean"])
    seconds["sampling_and_measuring"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    curves = {name: learning_curve(Path(info["run"]), teacher_ckpt, clf, forget, override, ref,
                                   budget["curve_per_class"]) for name, info in sfd_runs.items()}
    seconds["curves"] = time.perf_counter() - t0
    comparison_picture(panels, per_class, out / "comparison.png", names)
    curve_picture({sfd_runs[n]["title"]: p for n, p in curves.items()}, out / "curve.png", forget, override)
    seconds_total = time.perf_counter() - t_all
    report = {
        "forget_class": forget, "override_class": override,
        "forget_class_name": names[forget], "override_class_name": names[override],
        "class_choice": {"forget": None, "override": None, **(class_choice or {})},
        "dataset": {"name": teacher_cfg["data"]["dataset"], "root": teacher_cfg["data"].get("root"),
                    "image_size": teacher_cfg["data"]["image_size"], "class_names": names,
                    "random_flip": teacher_cfg["data"].get("random_flip")},
        "classifier_hflip": clf_meta.get("training", {}).get("hflip"),
        "classifier_test_accuracy": clf_meta.get("test_accuracy"),
        "classifier_warning": classifier_quality_note(clf_meta),
        "teacher_check": check,
        "teacher_training": (json.loads((Path(teacher_ckpt).parent / CHECKS_FILE).read_text())
                             if (Path(teacher_ckpt).parent / CHECKS_FILE).exists() else None),
        "protocol": {"guidance": guidance, **steps, "sampling_seeds": seeds, "images_per_class_per_seed": per_class,
                     "reference_images_per_class": budget["ref_per_class"], "reference": reference,
                     "interval": "mean and two-sided 95% Student-t interval over the sampling seeds (each seed's "
                                 "images measured on their own)"},
        "fid_kind": "classifier_fid: FID in the penultimate-feature space of the evaluation classifier, remaining "
                    "classes vs real test images (not Inception FID)",
        "rows": rows, "skipped": skipped or {},
        "curves": {name: {"points": pts, "images_per_class": budget["curve_per_class"], "sampling_seed": 1}
                   for name, pts in curves.items()},
        "seconds": seconds_total, "stage_seconds": seconds,
        "settings": {
            "teacher_checkpoint": str(teacher_ckpt), "teacher_sha256": file_hash(teacher_ckpt),
            "sfd": {name: {"config_file": info["config"], "run": str(info["run"]),
                           "sfd_config": json.loads((Path(info["run"]) / "config.json").read_text())["sfd"],
                           **{k: info[k] for k in ("train_seconds", "train_cpu_seconds") if k in info}}
                    for name, info in sfd_runs.items()},
            "classifier": str(clf_path), "classifier_sha256": file_hash(clf_path),
            "classifier_test_accuracy": clf_meta.get("test_accuracy"),
            "threads": torch.get_num_threads(), "versions": library_versions(),
        },
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    md = report_markdown(report)
    (out / "report.md").write_text(md)
    print("\n" + md)
    print(f"report: {out / 'report.json'}, {out / 'report.md'}, pictures: {out / 'comparison.png'}, {out / 'curve.png'}")
    return report


def teacher_accuracy(metrics: dict) -> dict:
    """The teacher's own accuracy from its row's metrics: on the forget class (1 - UA: the share of its
    forget-class samples the classifier labels as that class) and on the remaining classes, each a
    mean with its interval over the same seeds."""
    return {"forget": mean_interval([1 - v for v in metrics["ua"]["values"]]), "remaining": metrics["remaining_acc"]}


def attach_teacher_accuracy(rows: list[dict], forget: int, name: str) -> dict:
    """Beside every UA, the teacher's own accuracy at the same w: each demo row gets ``teacher_accuracy``
    (a teacher row its own, a generator its distillation target's, {'of': key, 'forget', 'remaining'});
    returns teacher_check of the teacher rows."""
    by_key = {r["key"]: r for r in rows}
    for r in rows:
        own = r if r["model"] == "teacher" else by_key.get(r["distillation_target"] or "")
        r["teacher_accuracy"] = None if own is None else {"of": own["key"], **teacher_accuracy(own["metrics"])}
    return teacher_check([(r["label"], r["metrics"]) for r in rows if r["model"] == "teacher"], forget, name)


def teacher_check(teacher_rows: list[tuple[str, dict]], forget: int, name: str) -> dict:
    """Whether the teacher is good enough for a UA to mean anything. ``teacher_rows``: [(label, metrics)]
    of every sampling variant of the teacher. A variant is weak when its mean forget-class accuracy is
    below TEACHER_MIN_FORGET or its remaining-class accuracy below TEACHER_MIN_REMAINING. Returns
    {'thresholds', 'variants': [{'label', 'forget_acc', 'remaining_acc', 'weak'}], 'warning' (None: none weak)}."""
    variants = []
    for label, metrics in teacher_rows:
        acc = teacher_accuracy(metrics)
        fa, ra = acc["forget"]["mean"], acc["remaining"]["mean"]
        variants.append({"label": label, "forget_acc": fa, "remaining_acc": ra,
                         "weak": fa < TEACHER_MIN_FORGET or ra < TEACHER_MIN_REMAINING})
    weak = [v for v in variants if v["weak"]]
    warning = None if not weak else (
        "the teacher is too weak to judge forgetting: " + "; ".join(
            f"{v['label']} draws class {forget} ({name}) as itself {v['forget_acc']:.2f} of the time and the "
            f"remaining classes correctly {v['remaining_acc']:.2f}" for v in weak)
        + f" (this report asks for at least {TEACHER_MIN_FORGET:.2f} and {TEACHER_MIN_REMAINING:.2f}). A UA can only "
        f"be read against the teacher's own miss rate on the class (1 - its forget-class accuracy), and remaining-class "
        f"accuracy against the teacher's: the table below is not a result. Train the teacher longer or at a higher "
        f"resolution (README, \"When the report cannot judge\")")
    return {"thresholds": {"forget_acc": TEACHER_MIN_FORGET, "remaining_acc": TEACHER_MIN_REMAINING},
            "variants": variants, "warning": warning}


def click_echo(text: str) -> None:
    import sys
    print(text, file=sys.stderr, flush=True)


def fmt(c: dict | int | str | None) -> str:
    """A report cell: 'mean ± half' for an interval dict."""
    if c is None:
        return "-"
    if isinstance(c, (int, str)):
        return str(c)
    digits = 3 if abs(c["mean"]) < 10 else 1
    return f"{c['mean']:.{digits}f}" + ("" if c["half"] is None else f" ± {c['half']:.{digits}f}")


def markdown_table(r: dict) -> str:
    """Metrics as rows, one column per (model, sampling variant); headers name sampler, steps, w and NFE."""
    f, o = r["forget_class"], r["override_class"]
    cols = r["rows"]
    lines = [("",) + tuple(f"{c['title']}<br>{c['variant']['header']}" for c in cols)]
    for label, key in ((f"unlearning accuracy (class {f}), higher = forgotten", "ua"),
                       (f"class-{f} samples classified as {o}", "override_rate"),
                       ("remaining-class accuracy", "remaining_acc"),
                       ("classifier-feature FID, remaining classes (lower = better)", "classifier_fid"),
                       ("images / s (this machine)", "images_per_s")):
        lines.append((label,) + tuple(fmt(c["metrics"][key]) for c in cols))
    lines.insert(2, (f"the teacher's own accuracy at this w: class {f} / remaining",) + tuple(
        "-" if not c.get("teacher_accuracy") else
        f"{fmt(c['teacher_accuracy']['forget'])} / {fmt(c['teacher_accuracy']['remaining'])}" for c in cols))
    lines.append(("network evaluations per image",) + tuple(fmt(c["nfe"]) for c in cols))
    lines.append(("distillation target",) + tuple(
        "-" if not c["distillation_target"] else next(t["label"] for t in cols if t["key"] == c["distillation_target"])
        for c in cols))
    out = [f"| {' | '.join(row)} |" for row in lines]
    return "\n".join([out[0], "|---" * len(lines[0]) + "|", *out[1:]])


def target_sentences(r: dict) -> list[str]:
    """For each generator: its classifier FID and UA beside its distillation target's, and whether the
    95% intervals separate."""
    from .protocol import separated
    by_key = {c["key"]: c for c in r["rows"]}
    out = []
    for c in r["rows"]:
        t = by_key.get(c["distillation_target"] or "")
        if t is None:
            continue
        parts = []
        for key, name in (("classifier_fid", "classifier FID"), ("remaining_acc", "remaining-class accuracy")):
            a, b = c["metrics"][key], t["metrics"][key]
            parts.append(f"{name} {fmt(a)} vs {fmt(b)} ("
                         + ("intervals separate" if separated(a, b) else "intervals overlap: no difference shown") + ")")
        out.append(f"- {c['title']} vs its distillation target {t['label']}: " + "; ".join(parts)
                   + f"; {c['speedup_vs_target']:.0f}x the images per second.")
    return out


def class_choice_sentence(r: dict, script: str) -> str:
    """The report's first line: which classes were forgotten and overridden, whether that was the
    default or the user's choice, and how to choose others (by name)."""
    f, o = r.get("forget_class", 0), r.get("override_class", 1)
    d = r.get("dataset") or {}
    names = d.get("class_names") or [str(c) for c in range(max(f, o) + 1)]
    given = r.get("class_choice") or {}
    given = {k: v for k, v in given.items() if v is not None}
    folder = d.get("name") == "folder"
    first = "folder names" if folder else "class names"
    if not given:
        how = f"the defaults: the first two {first} in sorted order"
    else:
        how = "as given (" + " ".join(f"--{k} {v}" for k, v in given.items()) + ")" + (
            "" if len(given) == 2 else f"; the {'override' if 'forget' in given else 'forget'} class is the default")
    root = f" --data-root {d['root']}" if folder and d.get("root") else ""
    shown = ", ".join(f"{i}={n}" for i, n in enumerate(names[:12])) + (
        f", ... ({len(names)} in all)" if len(names) > 12 else "")
    return (f"**Forget class {f} ({names[f]}) into override {o} ({names[o]})**, {how}. To choose others: "
            f"`python {script}{root} --forget NAME --override NAME` (a class name or index; classes: {shown}).")


def report_markdown(r: dict) -> str:
    p = r["protocol"]
    f, o = r["forget_class"], r["override_class"]
    skipped = "".join(f"\n\nNot run: {name} ({why})." for name, why in r["skipped"].items())
    stages = ", ".join(f"{k} {v:.0f}" for k, v in r["stage_seconds"].items())
    d = r["dataset"]
    names = d["class_names"]
    where = "the built-in dataset" if d["name"] == "builtin" else f"{d['name']} data ({d['root'] or ''})"
    acc = r["classifier_test_accuracy"]
    ref = p.get("reference")
    refs = (f"{p['reference_images_per_class']} real test images per class" if ref is None
            else reference_sentence(ref) + f", in the classifier's {ref['feature_dim']}-dimensional feature space")
    warn = f"\n\n**WARNING: {ref['warning']}.**" if ref and ref["warning"] else ""
    flips = "" if "random_flip" not in d else " " + flip_sentence(d["random_flip"], r.get("classifier_hflip"))
    trained = "" if not r.get("teacher_training") else " " + stop_sentence(r["teacher_training"])
    judge = "The evaluation classifier's test accuracy on real held-out images: " + (
        "unknown" if acc is None else f"{acc:.3f}") + "." + trained + (
        f"\n\n**WARNING: {r['classifier_warning']}.**" if r["classifier_warning"] else "")
    weak = (r.get("teacher_check") or {}).get("warning")
    weak = f"**WARNING: {weak}.**\n\n" if weak else ""
    return (f"# SFD demo on {where}\n\n{class_choice_sentence(r, 'demo.py')}\n\n{weak}{judge}{flips}\n\nEvery number is the mean ± the half-width of a two-sided 95% Student-t "
            f"interval over {len(p['sampling_seeds'])} sampling seeds, each seed {p['images_per_class_per_seed']} "
            f"images per class measured on its own (so the FID of one seed uses fewer images than a pooled FID "
            f"would, and reads higher). Multi-step models are sampled unguided and guided (w = {p['guidance']:g}); "
            f"each SFD generator one step, as distilled (w = the guidance it was distilled with). FID: "
            f"classifier-feature FID of the remaining classes against {refs} (not Inception FID).{warn}"
            f"\n\n{markdown_table(r)}\n\n" + "\n".join(target_sentences(r))
            + f"{skipped}\n\nStage times (s): {stages}; total {r['seconds']:.0f}.\n\n"
            "![teacher and SFD samples](comparison.png)\n\n![SFD training curves](curve.png)\n")
