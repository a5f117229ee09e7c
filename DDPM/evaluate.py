#!/usr/bin/env python
"""Evaluate generated images: unlearning accuracy, FID/IS/KID/precision/recall, percentage of unlearning.

Every subcommand writes a JSON with its numbers and every setting that produced them: image counts,
the images folder's settings.json (sampler, steps, guidance, checkpoint hash, written by sample.py),
classifier path and hash, feature space, library versions. docs/method.md section 7 is the protocol.

Examples (from inside DDPM/):
  python evaluate.py ua --images samples/sfd --classifier classifiers/builtin_small_cnn.safetensors --forget 0 --out eval/ua_sfd.json
  python evaluate.py fid --images samples/sfd --ref refs/builtin_train --exclude 0 --features classifier \\
      --classifier classifiers/builtin_small_cnn.safetensors --out eval/fid_sfd.json
  python evaluate.py fid --images samples/cifar_sfd --ref refs/cifar10_without_0 --exclude 0 --out eval/fid.json
  python evaluate.py attack --ckpt runs/sfd --classifier classifiers/builtin_small_cnn.safetensors --forget 0 --out eval/attack_sfd.json
  python evaluate.py pul --original samples/vdu_before --unlearned samples/vdu_after --classifier C --forget 0 --out eval/pul.json
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parent))

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "sfd_ddpm", "fid-reference")


def _device(name: str):
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise click.ClickException("--device cuda but CUDA is not available")
    return name


def _classes(text: str | None, meta: dict | None, option: str) -> list[int]:
    """Classes by index or by name (the classifier's class names: folder names for folder data)."""
    from sfd_ddpm.classifiers import classifier_class_names
    from sfd_ddpm.data import resolve_classes

    if not text:
        return []
    names = classifier_class_names(meta) if meta else None
    if names is None:  # indices only (no classifier, or one without names)
        names = [str(i) for i in range(meta["n_classes"] if meta else 1000)]
    try:
        return resolve_classes(text, names, "class")
    except ValueError as err:
        raise click.BadParameter(str(err), param_hint=option) from None


def _judge(meta: dict, forget: list[int]) -> dict:
    """What every classifier-judged result carries next to its numbers: the classifier's test accuracy,
    a warning when it is too weak to judge, and the class names."""
    from sfd_ddpm.classifiers import classifier_class_names, classifier_quality_note

    names = classifier_class_names(meta)
    note = classifier_quality_note(meta)
    if note:
        click.echo(f"WARNING: {note}", err=True)
    return {"classifier_test_accuracy": meta.get("test_accuracy"), "classifier_note": note, "class_names": names,
            "forget_class_names": [names[c] for c in forget] if names else None}


def _accuracy_text(meta: dict) -> str:
    acc = meta.get("test_accuracy")
    return f"classifier test accuracy {'unknown' if acc is None else f'{acc:.3f}'}"


def _load_classifier(path, device):
    from sfd_ddpm.classifiers import load_classifier
    from sfd_ddpm.checkpoints import CheckpointError
    from sfd_ddpm.metrics.record import classifier_record

    try:
        model, meta = load_classifier(path, device)
    except CheckpointError as err:
        raise click.ClickException(str(err)) from None
    return model, meta, classifier_record(path, meta)


def _errors():
    """The exceptions our modules raise for bad input; reported as a one-line error, exit 1."""
    from sfd_ddpm.checkpoints import CheckpointError

    return ValueError, FileNotFoundError, RuntimeError, CheckpointError


def _check_complete(folder, allow: bool, option: str) -> None:
    """Refuse a sample.py folder whose settings.json says complete: false (an interrupted or running sample.py:
    fewer images than planned, perhaps not every class) unless ``allow``; then warn."""
    from sfd_ddpm.metrics.record import images_settings

    settings = images_settings(folder) or {}
    if settings.get("complete") is not False:
        return
    counts = settings.get("images_per_class")
    what = (f"{option} {folder}: its settings.json says complete: false (sample.py was interrupted or is still "
            f"running; images per class: {counts})")
    if not allow:
        raise click.ClickException(f"{what}; rerun the same sample.py command to finish it, or pass "
                                   f"--allow-incomplete to evaluate it as it is")
    click.echo(f"WARNING: {what}; evaluated as it is (--allow-incomplete)", err=True)


allow_incomplete_option = click.option(
    "--allow-incomplete", is_flag=True,
    help="Evaluate image folders whose settings.json says complete: false (recorded). [default: refuse them]")
out_option = click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="FILE.json",
                          help="Where to write the results and their settings.")
device_option = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
                             help="auto = CUDA when available.")
classes_help = ("by name or index, e.g. cat,dog or 0 or 0,3 or 1-9 (names: the classifier's classes); name:X / "
                "index:N force one reading, and a value that names one class and indexes another (folders named "
                "1, 2, 3) is refused")


@click.group(context_settings=CONTEXT)
def main():
    """Evaluate unlearning (ua, pul, attack) and generation quality (fid) of generated images."""


@main.command(context_settings=CONTEXT)
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Generated images named CCC_IIIII.png (class = what they were generated for).")
@click.option("--classifier", required=True, type=click.Path(dir_okay=False), metavar="FILE.safetensors",
              help="Dataset classifier from train_classifier.py.")
@click.option("--forget", required=True, metavar="CLASSES", help=f"Forgotten class(es), {classes_help}.")
@out_option
@click.option("--batch", type=click.IntRange(min=1), default=256, help="Images per classifier pass.")
@device_option
@allow_incomplete_option
def ua(images, classifier, forget, out, batch, device, allow_incomplete):
    """Unlearning accuracy over the forget-class images only, mean entropy, mean p(forget), and the
    classifier accuracy on every remaining class found in the folder."""
    from sfd_ddpm.metrics.record import images_settings, write_result
    from sfd_ddpm.metrics.ua import evaluate_ua_folder

    _check_complete(images, allow_incomplete, "--images")

    device = _device(device)
    model, meta, clf = _load_classifier(classifier, device)
    forget = _classes(forget, meta, "--forget")
    try:
        results = evaluate_ua_folder(model, images, forget, batch, device)
    except _errors() as err:
        raise click.ClickException(str(err)) from None
    results.update(_judge(meta, forget))
    settings = {"images": str(images), "images_settings": images_settings(images), "classifier": clf,
                "forget": forget, "quantised_inputs": "8-bit PNGs as saved", "batch": batch, "device": device,
                "ua_definition": "fraction of forget-class images NOT labelled as their class; "
                                 "denominator = forget-class images only"}
    settings["allow_incomplete"] = allow_incomplete
    write_result(out, "ua", results, settings)
    rem = results["remaining_accuracy"]
    click.echo(f"UA {results['ua']:.4f} over {results['n_forget_images']} forget-class images; mean entropy "
               f"{results['mean_entropy']:.4f}; mean p(forget) {results['mean_p_forget']:.4f}; remaining-class "
               f"accuracy {'n/a' if rem is None else f'{rem:.4f}'} ({results['n_remaining_images']} images); "
               f"{_accuracy_text(meta)} -> {out}")


@main.command(context_settings=CONTEXT)
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Generated images (PNG; CCC_IIIII.png names when filtering by class).")
@click.option("--ref", required=True, type=click.Path(exists=True), metavar="DIR|FILE",
              help="Reference images (real training images, e.g. written by save_dataset.py) or a cached "
                   "reference-features file from an earlier run.")
@click.option("--exclude", default=None, metavar="CLASSES",
              help=f"Leave these classes out of both folders, by file name ({classes_help}).")
@click.option("--features", type=click.Choice(["inception", "classifier"]), default="inception",
              help="inception = Inception-v3 pool3 with the TF FID weights (reported as fid, is_mean ...); "
                   "classifier = penultimate features of --classifier (reported as classifier_fid ...).")
@click.option("--classifier", type=click.Path(dir_okay=False), default=None, metavar="FILE.safetensors",
              help="Classifier for --features classifier.")
@click.option("--inception-weights", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Local copy of the FID Inception weights (weights-inception-2015-12-05-6726825d.pth) for "
                   "offline use. [default: torch-fidelity downloads it into the torch hub cache]")
@click.option("--allow-unknown-inception-weights", is_flag=True,
              help="Use Inception weights whose sha256 is not that of the FID weights file (numbers are then not "
                   "comparable with published FIDs; recorded in the JSON). [default: refuse them]")
@click.option("--metrics", default="fid,is,kid,pr", metavar="LIST", help="Any of fid, is, kid, pr, comma-separated.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=DEFAULT_CACHE, metavar="DIR",
              help="Where reference features are cached (keyed by the files' content hash and settings).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write cached reference features.")
@click.option("--kid-subset-size", type=click.IntRange(min=2), default=1000,
              help="KID subset size (capped at the smaller image count).")
@click.option("--kid-subsets", type=click.IntRange(min=1), default=100, help="Number of KID subsets.")
@click.option("--pr-k", type=click.IntRange(min=1), default=3, help="k of the k-NN precision/recall manifolds.")
@click.option("--seed", type=int, default=0, help="Seed of KID subsets and the IS shuffle.")
@out_option
@click.option("--batch", type=click.IntRange(min=1), default=None, help="Images per feature pass. [default: 64 "
              "inception, 256 classifier]")
@device_option
@click.option("--no-progress", is_flag=True, help="No progress bars.")
@allow_incomplete_option
def fid(images, ref, exclude, features, classifier, inception_weights, allow_unknown_inception_weights, metrics,
        cache_dir, no_cache, kid_subset_size, kid_subsets, pr_k, seed, out, batch, device, no_progress,
        allow_incomplete):
    """FID, IS, KID and precision/recall of generated images against reference images."""
    from sfd_ddpm.metrics.fid import METRICS, ClassifierFeatureSpace, InceptionFeatureSpace, evaluate_folders
    from sfd_ddpm.metrics.record import images_settings, write_result

    _check_complete(images, allow_incomplete, "--images")

    device = _device(device)
    metric_list = [m.strip() for m in metrics.split(",") if m.strip()]
    bad = [m for m in metric_list if m not in METRICS]
    if bad or not metric_list:
        raise click.BadParameter(f"{bad or metrics!r}: choose from {', '.join(METRICS)}", param_hint="--metrics")
    clf = meta = None
    if features == "classifier" and classifier:
        model, meta, clf = _load_classifier(classifier, device)
    exclude_list = _classes(exclude, meta, "--exclude")
    try:
        if features == "classifier":
            if not classifier:
                raise click.UsageError("--features classifier needs --classifier FILE")
            if inception_weights or allow_unknown_inception_weights:
                raise click.UsageError("--inception-weights and --allow-unknown-inception-weights are for "
                                       "--features inception")
            space = ClassifierFeatureSpace(model, f"sha256={clf['sha256']}", batch or 256)
        else:
            if classifier:
                raise click.UsageError("--classifier is for --features classifier")
            space = InceptionFeatureSpace(inception_weights, device, batch or 64, allow_unknown_inception_weights)
        results, settings = evaluate_folders(
            space, images, ref, exclude_list, metrics=metric_list, cache_dir=None if no_cache else cache_dir,
            progress=not no_progress, kid_subset_size=kid_subset_size, kid_subsets=kid_subsets, pr_k=pr_k, seed=seed)
    except _errors() as err:
        raise click.ClickException(str(err)) from None
    settings.update(images=str(images), images_settings=images_settings(images), reference_path=str(ref),
                    reference_images_settings=images_settings(ref) if Path(ref).is_dir() else None,
                    classifier=clf, inception_weights=inception_weights, batch=space.batch_size, device=device,
                    quantised_inputs="8-bit PNGs as saved", allow_incomplete=allow_incomplete)
    settings.update(getattr(space, "weights", {}))  # the Inception file's sha256, known or allowed by the user
    if meta is not None:
        judge = _judge(meta, exclude_list)
        settings.update(classifier_test_accuracy=judge["classifier_test_accuracy"],
                        classifier_note=judge["classifier_note"], class_names=judge["class_names"],
                        excluded_class_names=judge["forget_class_names"])
    write_result(out, "fid", results, settings)
    click.echo("  ".join(f"{k} {v:.4f}" for k, v in results.items())
               + f"  ({settings['n_generated']} generated vs {settings['n_reference']} reference images, "
                 f"reference cache: {settings['reference']['cache']}) -> {out}")


@main.command(context_settings=CONTEXT)
@click.option("--original", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Samples (PNG) of the original model.")
@click.option("--unlearned", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="Samples (PNG) of the unlearned model, as many as --original.")
@click.option("--classifier", required=True, type=click.Path(dir_okay=False), metavar="FILE.safetensors",
              help="Dataset classifier from train_classifier.py.")
@click.option("--forget", required=True, metavar="CLASSES", help=f"Forgotten class(es), {classes_help}.")
@click.option("--n", "n_images", type=click.IntRange(min=1), default=None,
              help="Use the first N images (by name) of each folder. [default: all; the counts must match]")
@out_option
@click.option("--batch", type=click.IntRange(min=1), default=256, help="Images per classifier pass.")
@device_option
@allow_incomplete_option
def pul(original, unlearned, classifier, forget, n_images, out, batch, device, allow_incomplete):
    """Percentage of unlearning: 100 (n_forget(original) - n_forget(unlearned)) / n_forget(original),
    counted by the classifier on equal-size sample sets (VDU, docs/method.md section 6)."""
    from sfd_ddpm.metrics.pul import evaluate_pul_folders
    from sfd_ddpm.metrics.record import images_settings, write_result

    _check_complete(original, allow_incomplete, "--original")
    _check_complete(unlearned, allow_incomplete, "--unlearned")

    device = _device(device)
    model, meta, clf = _load_classifier(classifier, device)
    forget = _classes(forget, meta, "--forget")
    try:
        results = evaluate_pul_folders(model, original, unlearned, forget, n_images, batch, device)
    except _errors() as err:
        raise click.ClickException(str(err)) from None
    results.update(_judge(meta, forget))
    settings = {"original": str(original), "unlearned": str(unlearned), "original_settings": images_settings(original),
                "unlearned_settings": images_settings(unlearned), "classifier": clf, "forget": forget,
                "n": n_images, "batch": batch, "device": device, "allow_incomplete": allow_incomplete}
    write_result(out, "pul", results, settings)
    click.echo(f"PUL {results['pul']:.2f}% (forget-class images: {results['n_forget_original']} original -> "
               f"{results['n_forget_unlearned']} unlearned, of {results['n_images_each']} each); {_accuracy_text(meta)} "
               f"-> {out}")


@main.command(context_settings=CONTEXT)
@click.option("--ckpt", required=True, type=click.Path(exists=True), metavar="FILE|RUN",
              help="Weights file (or run folder: its newest) of the model to attack: an SFD/SiD generator or a "
                   "DDPM-kind model (pretrained, Retrain, SA, SalUn, ESD, VDU).")
@click.option("--network", default=None, help="Network of the weights file. [default: its EMA network]")
@click.option("--classifier", required=True, type=click.Path(dir_okay=False), metavar="FILE.safetensors",
              help="Classifier whose p(forget) the attacks raise (white box: its gradient is used).")
@click.option("--judge", type=click.Path(dir_okay=False), default=None, metavar="FILE.safetensors",
              help="A second classifier that scores the attacked images instead (one the attack never saw), "
                   "to tell recovered class knowledge from images that only fool --classifier. [default: --classifier]")
@click.option("--forget", required=True, metavar="CLASS",
              help="The forgotten class (one), by name or index (name:X / index:N force one reading).")
@click.option("--attacks", default="noise,embedding_forget,embedding_mean", metavar="LIST",
              help="Any of noise, embedding_forget, embedding_mean, comma-separated.")
@click.option("--budgets", default="0,10,50", metavar="LIST",
              help="Gradient steps at which to score each attack (0 = the model asked normally).")
@click.option("--n", "n_noise", type=click.IntRange(min=1), default=32,
              help="Noises optimised by the noise search; noises per gradient step of the embedding search.")
@click.option("--n-eval", type=click.IntRange(min=1), default=None,
              help="Held-out noises the embedding search is scored on. [default: --n]")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.05, help="Adam step size of every attack.")
@click.option("--prior-weight", type=click.FloatRange(min=0), default=1.0,
              help="Weight of the Gaussian-prior (chi norm) penalty per noise dimension in the noise search.")
@click.option("--sampler", type=click.Choice(["auto", "one_step", "ddim"]), default="auto",
              help="How the attacked model draws images: auto = one-step for SFD/SiD generators, DDIM with "
                   "guidance 2 and x0 clipping for DDPM-kind models (as make compare samples them).")
@click.option("--steps", type=click.IntRange(min=1), default=10, help="DDIM steps the attack differentiates through.")
@click.option("--guidance", type=float, default=None, help="Classifier-free guidance w. [default: from --sampler]")
@click.option("--clip-x0/--no-clip-x0", default=None, help="Clip DDIM's denoised estimate. [default: from --sampler]")
@click.option("--seed", type=int, default=0, help="Seed of the starting and held-out noises.")
@out_option
@device_option
def attack(ckpt, network, classifier, judge, forget, attacks, budgets, n_noise, n_eval, lr, prior_weight, sampler, steps,
           guidance, clip_x0, seed, out, device):
    """White-box attacks on an unlearned generator: how often does the forgotten class come back when
    someone holding the weights searches the noise or the label embedding? Reports, per attack and
    budget, the success rate (attacked images classified as the forget class) and mean p(forget)."""
    import time

    from sfd_ddpm.attacks import ATTACKS
    from sfd_ddpm.attacks.search import attack_checkpoint
    from sfd_ddpm.metrics.record import write_result

    device = _device(device)
    attack_list = [a.strip() for a in attacks.split(",") if a.strip()]
    bad = [a for a in attack_list if a not in ATTACKS]
    if bad or not attack_list:
        raise click.BadParameter(f"{bad or attacks!r}: choose from {', '.join(ATTACKS)}", param_hint="--attacks")
    try:
        budget_list = sorted({int(b) for b in budgets.split(",") if b.strip()})
    except ValueError:
        raise click.BadParameter(f"{budgets!r}: gradient-step counts, e.g. 0,10,50", param_hint="--budgets") from None
    if not budget_list or budget_list[0] < 0:
        raise click.BadParameter(f"{budgets!r}: gradient-step counts >= 0", param_hint="--budgets")
    model, meta, clf = _load_classifier(classifier, device)
    forget = _classes(forget, meta, "--forget")
    if len(forget) != 1:
        raise click.BadParameter("attack one forgotten class at a time", param_hint="--forget")
    judge_model, judge_rec = (_load_classifier(judge, device)[::2] if judge else (None, None))
    start = time.perf_counter()
    try:
        results = attack_checkpoint(ckpt, model, forget[0], network=network, sampler=sampler, steps=steps,
                                    guidance=guidance, clip_x0=clip_x0, device=device, attacks=attack_list,
                                    budgets=budget_list, n=n_noise, n_eval=n_eval, lr=lr, prior_weight=prior_weight,
                                    seed=seed, judge_classifier=judge_model)
    except _errors() as err:
        raise click.ClickException(str(err)) from None
    seconds = time.perf_counter() - start
    results.update(_judge(meta, forget))
    settings = {"checkpoint": results.pop("checkpoint"), "sampling": results.pop("sampling"), "classifier": clf,
                "judge": judge_rec or "the attacked classifier", "forget": forget[0], "attacks": attack_list,
                "budgets": budget_list, "n": n_noise, "n_eval": n_eval or n_noise, "lr": lr,
                "prior_weight": prior_weight, "seed": seed, "device": device, "seconds": seconds,
                "success_definition": "fraction of attacked images (8-bit) the judge labels as the forget class; "
                                      "embedding attacks are judged on held-out noise"}
    write_result(out, "attack", results, settings)
    for name, row in results["at_budget"].items():
        click.echo(f"{name}: success {row['success_rate']:.3f}, mean p(forget) {row['mean_p_forget']:.3f} "
                   f"after {row['budget']} steps")
    click.echo(f"({seconds:.0f} s) -> {out}")


if __name__ == "__main__":
    main()
