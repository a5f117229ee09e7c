"""Evaluation metrics: UA counts (with the authors' denominator bug as a regression case), FID with a
stand-in feature space, reference-feature caching, the offline Inception weights path, PUL, and the
JSON records of evaluate.py."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from sfd_ddpm.classifiers import SmallCNN, save_classifier
from sfd_ddpm.images import save_images
from sfd_ddpm.metrics.fid import (FeatureSpace, InceptionFeatureSpace, evaluate_folders, evaluate_tensors,
                                  load_reference_file, reference_features)
from sfd_ddpm.metrics.pul import evaluate_pul, percentage_of_unlearning
from sfd_ddpm.metrics.ua import entropy, evaluate_ua, evaluate_ua_folder, unlearning_metrics


# ---------------------------------------------------------------------------------------------
# Stand-ins

def flat(k: int, n: int = 1, size: int = 8) -> torch.Tensor:
    """n flat images whose grey level encodes class k (exact after 8-bit quantisation)."""
    return torch.full((n, 3, size, size), -1 + 2 * k / 9)


class GreyLevelClassifier(nn.Module):
    """Predicts the class encoded by an image's mean grey level (see ``flat``); logits are known exactly."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the module a device

    def forward(self, x):
        level = (x.mean((1, 2, 3)) + 1) * 4.5
        return -4.0 * (torch.arange(10, dtype=x.dtype)[None] - level[:, None]) ** 2


class PoolSpace(FeatureSpace):
    """Stand-in feature extractor: 2x2 average-pooled pixels; counts its calls."""

    identity, prefix, batch_size = "stand-in:pool2", "standin_", 16

    def __init__(self):
        self.calls = 0

    def extract(self, x):
        self.calls += 1
        return nn.functional.avg_pool2d(x.float(), 2).flatten(1), None


def noisy_set(n: int, seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.3 * torch.randn(n, 3, 8, 8, generator=g) + shift).clamp(-1, 1)


# ---------------------------------------------------------------------------------------------
# Unlearning accuracy

def ua_fixture_images():
    """All ten classes, 10 images each. Class 0 (the forget class): 7 look like class 3, 3 still like 0.
    Class 5: 4 of 10 look like class 6. Every other class looks like itself."""
    images, labels = [], []
    for c in range(10):
        looks = [3] * 7 + [0] * 3 if c == 0 else [6] * 4 + [5] * 6 if c == 5 else [c] * 10
        images += [flat(k) for k in looks]
        labels += [c] * 10
    return torch.cat(images), torch.tensor(labels)


def expected_p_own(k_look: int, k_own: int) -> float:
    logits = -4.0 * (torch.arange(10, dtype=torch.float64) - k_look) ** 2
    return float(torch.softmax(logits, 0)[k_own])


def check_ua(result):
    # The denominator is the 10 forget-class images, not the 100 in the folder (the authors' 0.07).
    assert result["n_forget_images"] == 10 and result["n_images_total"] == 100
    assert result["ua"] == pytest.approx(0.7)
    assert result["mean_p_forget"] == pytest.approx((7 * expected_p_own(3, 0) + 3 * expected_p_own(0, 0)) / 10, rel=1e-5)
    assert result["per_forget_class"]["0"]["predicted_counts"] == [3, 0, 0, 7, 0, 0, 0, 0, 0, 0]
    assert result["per_class_accuracy"]["5"] == pytest.approx(0.6)
    assert all(result["per_class_accuracy"][str(c)] == 1.0 for c in (1, 2, 3, 4, 6, 7, 8, 9))
    assert "0" not in result["per_class_accuracy"]
    assert result["remaining_accuracy"] == pytest.approx((8 + 0.6) / 9)
    assert result["n_remaining_images"] == 90


def test_ua_counts_forget_class_images_only_on_a_folder(tmp_path):
    images, labels = ua_fixture_images()
    save_images(images, labels.tolist(), list(range(100)), tmp_path)
    check_ua(evaluate_ua_folder(GreyLevelClassifier(), tmp_path, forget=[0], batch_size=32))


def test_ua_on_tensors_matches_folder():
    images, labels = ua_fixture_images()
    check_ua(evaluate_ua(GreyLevelClassifier(), images, labels, forget=[0], batch_size=7))


def test_ua_several_forget_classes_and_errors():
    images, labels = ua_fixture_images()
    logits = GreyLevelClassifier()(images)
    both = unlearning_metrics(logits, labels, [0, 5])
    assert both["n_forget_images"] == 20
    assert both["ua"] == pytest.approx((7 + 4) / 20)
    assert both["per_forget_class"]["5"]["ua"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no images of the forget class"):
        unlearning_metrics(logits[labels != 0], labels[labels != 0], [0])
    with pytest.raises(ValueError, match="out of range"):
        unlearning_metrics(logits, labels, [10])


def test_entropy_is_finite_for_confident_and_exact_for_uniform():
    logits = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0]])
    h = entropy(logits)
    assert torch.isfinite(h).all()
    assert float(h[0]) == pytest.approx(0.0, abs=1e-12)
    assert float(h[1]) == pytest.approx(math.log(3))


# ---------------------------------------------------------------------------------------------
# FID / KID / precision-recall

def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    space = PoolSpace()
    x = noisy_set(200, seed=0)
    same = evaluate_tensors(space, x, x, metrics=("fid", "pr"))
    assert abs(same["standin_fid"]) < 1e-6
    assert same["standin_precision"] == 1.0 and same["standin_recall"] == 1.0
    small = evaluate_tensors(space, x, noisy_set(200, seed=1, shift=0.1), metrics=("fid", "kid"))["standin_fid"]
    large = evaluate_tensors(space, x, noisy_set(200, seed=1, shift=0.4), metrics=("fid",))["standin_fid"]
    assert 0 < small < large
    # mean shift s in each of 48 features adds ~48 s^2 to FID
    assert large == pytest.approx(48 * 0.4 ** 2, rel=0.35)


def test_is_needs_logits():
    with pytest.raises(ValueError, match="IS needs logits"):
        evaluate_tensors(PoolSpace(), noisy_set(20, 0), noisy_set(20, 1), metrics=("is",))


def save_set(x, folder, classes=10):
    labels = [i % classes for i in range(len(x))]
    save_images(x, labels, list(range(len(x))), folder)


def test_reference_features_are_cached_by_content(tmp_path):
    ref, cache = tmp_path / "ref", tmp_path / "cache"
    save_set(noisy_set(40, 0), ref)
    space = PoolSpace()
    f1, info1 = reference_features(space, ref, exclude=[0], cache_dir=cache)
    calls = space.calls
    f2, info2 = reference_features(space, ref, exclude=[0], cache_dir=cache)
    assert (info1["cache"], info2["cache"]) == ("miss", "hit")
    assert space.calls == calls, "a cache hit must not extract features again"
    assert torch.equal(f1, f2) and len(f1) == 36
    # A different class filter is a different reference set.
    _, info3 = reference_features(space, ref, exclude=[1], cache_dir=cache)
    assert info3["cache"] == "miss"
    # Same file names, changed contents: the cache must miss and the features must change.
    save_images(noisy_set(1, 99), [1], [1], ref)
    f4, info4 = reference_features(space, ref, exclude=[0], cache_dir=cache)
    assert info4["cache"] == "miss" and info4["key"] != info1["key"] and not torch.equal(f4, f1)
    # The cache file is usable as a reference, but only in its own feature space.
    feats, _ = load_reference_file(info4["cache_file"], space)
    assert torch.equal(feats, f4)
    other = PoolSpace()
    other.identity = "stand-in:other"
    with pytest.raises(ValueError, match="holds features of"):
        load_reference_file(info4["cache_file"], other)


def test_class_exclusion_applies_to_both_folders(tmp_path):
    x = noisy_set(50, 0)
    x[::10] = 0.9  # class 0 (every 10th image) is an outlier block
    save_set(x, tmp_path / "gen")
    save_set(x, tmp_path / "ref")
    with_0, _ = evaluate_folders(PoolSpace(), tmp_path / "gen", tmp_path / "ref", metrics=("fid",))
    res, settings = evaluate_folders(PoolSpace(), tmp_path / "gen", tmp_path / "ref", exclude=[0], metrics=("fid",))
    assert abs(res["standin_fid"]) < 1e-6 and abs(with_0["standin_fid"]) < 1e-6
    assert settings["n_generated"] == settings["n_reference"] == 45
    assert 0 not in settings["generated_classes"]
    assert settings["exclude"] == [0]


# ---------------------------------------------------------------------------------------------
# Inception weights for offline use

def test_inception_weights_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="Inception weights file .* not found"):
        InceptionFeatureSpace(tmp_path / "missing.pth")


@pytest.fixture(scope="module")
def standin_inception_weights(tmp_path_factory):
    """A state dict with the FID Inception's keys and shapes but random values (the real file needs a download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class Skeleton(FeatureExtractorInceptionV3):  # builds the architecture without loading weights
        def load_state_dict(self, state_dict, strict=True, assign=False):
            return None

    folder = tmp_path_factory.mktemp("inception")
    empty = folder / "empty.pth"
    torch.save({}, empty)
    torch.manual_seed(0)
    path = folder / "standin-inception.pth"
    torch.save(Skeleton("skeleton", ["2048"], feature_extractor_weights_path=str(empty)).state_dict(), path)
    return path


def test_inception_weights_from_a_local_file(standin_inception_weights, tmp_path):
    space = InceptionFeatureSpace(standin_inception_weights, batch_size=4, allow_unknown_weights=True)
    assert space.identity.startswith("inception-v3-tf-2015-12-05:sha256=")
    feats, logits = space.extract(noisy_set(3, 0))
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008)
    grey = space.extract(noisy_set(2, 0)[:, :1])[0]
    assert grey.shape == (2, 2048)
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, bad)
    with pytest.raises(ValueError, match="does not hold the FID Inception"):
        InceptionFeatureSpace(bad, allow_unknown_weights=True)


def _inception_fid_cli(tmp_path, *extra):
    import evaluate

    from sfd_ddpm.data import make_builtin

    if not (tmp_path / "gen").exists():
        x, y = make_builtin(1, seed=3)
        save_images(x[:2], y[:2].tolist(), [0, 1], tmp_path / "gen")
        save_images(x[2:4], y[2:4].tolist(), [0, 1], tmp_path / "ref")
    return CliRunner().invoke(evaluate.main, ["fid", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "ref"),
                                              "--metrics", "is", "--no-cache", "--no-progress",
                                              "--out", str(tmp_path / "fid.json"), *map(str, extra)])


def test_random_inception_weights_are_refused_unless_allowed(standin_inception_weights, tmp_path):
    """Random weights under the FID Inception's keys give FID ~0 and IS ~1 without complaint: their sha256 is
    not the FID file's, so they are refused; the override runs and is recorded."""
    import hashlib

    from sfd_ddpm.metrics.fid import INCEPTION_SHA256

    res = _inception_fid_cli(tmp_path, "--inception-weights", standin_inception_weights)
    assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
    assert str(standin_inception_weights) in res.output and "not that of the FID Inception weights" in res.output
    assert "--allow-unknown-inception-weights" in res.output and not (tmp_path / "fid.json").exists()
    res = _inception_fid_cli(tmp_path, "--inception-weights", standin_inception_weights,
                             "--allow-unknown-inception-weights")
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "fid.json").read_text())["settings"]
    assert s["inception_weights_sha256"] == hashlib.sha256(standin_inception_weights.read_bytes()).hexdigest()
    assert s["inception_weights_sha256"] != INCEPTION_SHA256
    assert s["inception_weights_known"] is False and s["allow_unknown_inception_weights"] is True
    assert s["inception_weights"] == str(standin_inception_weights)
    assert "is_mean" in json.loads((tmp_path / "fid.json").read_text())["results"]  # IS: no 2048-d sqrtm, cheap


def test_a_wrong_cached_inception_download_is_refused(standin_inception_weights, tmp_path):
    """Without --inception-weights torch-fidelity reads the torch hub cache without checking its hash."""
    hub = tmp_path / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    (hub / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth").write_bytes(
        standin_inception_weights.read_bytes())
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))
    try:
        with pytest.raises(ValueError, match="the cached download .* not that of the FID Inception weights"):
            InceptionFeatureSpace()
        assert InceptionFeatureSpace(allow_unknown_weights=True).weights["inception_weights_known"] is False
    finally:
        torch.hub.set_dir(old)


# ---------------------------------------------------------------------------------------------
# PUL

def test_pul_counts_forget_class_samples():
    assert percentage_of_unlearning(50, 5) == pytest.approx(90.0)
    assert percentage_of_unlearning(50, 60) == pytest.approx(-20.0)
    with pytest.raises(ValueError, match="undefined"):
        percentage_of_unlearning(0, 0)
    original = torch.cat([flat(0, 8), flat(4, 12)])     # 8 of 20 look like class 0
    unlearned = torch.cat([flat(0, 2), flat(4, 18)])    # 2 of 20
    out = evaluate_pul(GreyLevelClassifier(), original, unlearned, forget=[0])
    assert (out["n_forget_original"], out["n_forget_unlearned"]) == (8, 2)
    assert out["pul"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="equal-size"):
        evaluate_pul(GreyLevelClassifier(), original, unlearned[:10], forget=[0])


# ---------------------------------------------------------------------------------------------
# evaluate.py: numbers and the settings that produced them

@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    """A SmallCNN file that labels every image class 0 (zero fc weights, bias favouring 0): known outputs."""
    torch.manual_seed(0)
    model = SmallCNN(width=4)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.copy_(torch.tensor([5.0] + [0.0] * 9))
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_classifier(path, model, architecture="small_cnn", dataset="builtin", image_size=16,
                    test_accuracy=None, training={"note": "stand-in that always says class 0"})
    return path


def test_evaluate_writes_results_with_settings(tmp_path, classifier_file):
    import evaluate

    from sfd_ddpm.data import make_builtin

    x, y = make_builtin(6, seed=3)
    gen = tmp_path / "gen"
    save_images(x, y.tolist(), list(range(len(y))), gen)
    sample_settings = {"sampler": "ddim", "steps": 50, "guidance": 2.0, "checkpoint_sha256": "abc123"}
    (gen / "settings.json").write_text(json.dumps(sample_settings))
    ref = tmp_path / "ref"
    xr, yr = make_builtin(8, seed=4)
    save_images(xr, yr.tolist(), list(range(len(yr))), ref)
    runner = CliRunner()

    res = runner.invoke(evaluate.main, ["ua", "--images", str(gen), "--classifier", str(classifier_file),
                                        "--forget", "0", "--out", str(tmp_path / "ua.json")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "ua.json").read_text())
    r = rec["results"]
    assert r["n_forget_images"] == 6 and r["n_images_total"] == 60 and r["ua"] == 0.0
    assert r["mean_p_forget"] == pytest.approx(math.exp(5) / (math.exp(5) + 9), rel=1e-5)
    assert r["remaining_accuracy"] == 0.0 and len(r["per_class_accuracy"]) == 9
    assert rec["settings"]["images_settings"] == sample_settings
    assert rec["settings"]["classifier"]["architecture"] == "small_cnn"
    assert len(rec["settings"]["classifier"]["sha256"]) == 16
    assert rec["settings"]["forget"] == [0]
    assert rec["versions"]["torch"].split("+")[0] == torch.__version__.split("+")[0]

    args = ["fid", "--images", str(gen), "--ref", str(ref), "--exclude", "0", "--features", "classifier",
            "--classifier", str(classifier_file), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
            "--kid-subsets", "5", "--out", str(tmp_path / "fid.json")]
    res = runner.invoke(evaluate.main, args)
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "fid.json").read_text())
    assert set(rec["results"]) == {"classifier_fid", "classifier_is_mean", "classifier_is_std", "classifier_kid_mean",
                                   "classifier_kid_std", "classifier_precision", "classifier_recall"}
    s = rec["settings"]
    assert (s["n_generated"], s["n_reference"], s["exclude"]) == (54, 72, [0])
    assert s["feature_space"].startswith("classifier:sha256=") and s["reference"]["cache"] == "miss"
    assert s["images_settings"] == sample_settings and s["kid_subsets"] == 5 and s["pr_k"] == 3
    assert rec["versions"]["torch-fidelity"]
    res = runner.invoke(evaluate.main, args)
    assert json.loads((tmp_path / "fid.json").read_text())["settings"]["reference"]["cache"] == "hit"

    res = runner.invoke(evaluate.main, ["pul", "--original", str(ref), "--unlearned", str(gen), "--n", "60",
                                        "--classifier", str(classifier_file), "--forget", "0",
                                        "--out", str(tmp_path / "pul.json")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "pul.json").read_text())
    assert rec["results"]["pul"] == 0.0 and rec["results"]["n_forget_original"] == 60
    assert rec["settings"]["n"] == 60 and rec["settings"]["unlearned_settings"] == sample_settings


def test_evaluate_fails_loudly(tmp_path, classifier_file):
    import evaluate

    runner = CliRunner()
    (tmp_path / "gen").mkdir()
    res = runner.invoke(evaluate.main, ["ua", "--images", str(tmp_path / "gen"), "--classifier",
                                        str(tmp_path / "nope.safetensors"), "--forget", "0", "--out", str(tmp_path / "a.json")])
    assert res.exit_code != 0 and "not found" in res.output
    res = runner.invoke(evaluate.main, ["ua", "--images", str(tmp_path / "gen"), "--classifier", str(classifier_file),
                                        "--forget", "0", "--out", str(tmp_path / "a.json")])
    assert res.exit_code != 0 and "no CCC_IIIII.png images" in res.output
    res = runner.invoke(evaluate.main, ["fid", "--images", str(tmp_path / "gen"), "--ref", str(tmp_path / "gen"),
                                        "--inception-weights", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "f.json")])
    assert res.exit_code != 0 and "Inception weights file" in res.output and "not found" in res.output
    assert not (tmp_path / "a.json").exists() and not (tmp_path / "f.json").exists()
