"""The user's own image folders (data.dataset=folder): loading, the held-out split, class names, the
entry scripts end to end on a small class-folder tree, and a clear error for every bad folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_script

CLASSES = ["disc", "square", "stripes"]  # sorted, so index = position
# Tiny model and run (as demo.py's QUICK_MODEL): a ~20k-parameter UNet, a few iterations.
QUICK = ["model.base_channels=8", "model.channel_mult=[1,2]", "model.layers_per_block=1", "model.attn_resolutions=[8]",
         "model.dropout=0.0", "data.num_workers=0", "training.batch_size=8", "training.log_every=1",
         "training.snapshot_every=3", "training.state_every=3", "training.n_iters=3", "grid.steps=2", "grid.per_class=2"]


def draw(cls: str, size: tuple[int, int], rng) -> np.ndarray:
    """An RGB uint8 image: a coloured shape of the class on a dark noisy background."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    u, v = (xx - w / 2) / (0.35 * min(w, h)), (yy - h / 2) / (0.35 * min(w, h))
    mask = {"disc": u ** 2 + v ** 2 <= 1, "square": np.maximum(abs(u), abs(v)) <= 1,
            "stripes": (np.floor(yy / max(2, h // 8)) % 2 == 0)}[cls]
    colour = {"disc": (230, 40, 40), "square": (40, 60, 250), "stripes": (40, 220, 60)}[cls]
    img = rng.integers(0, 50, (h, w, 3))
    img[mask] = np.array(colour) + rng.integers(-20, 20, 3)
    return img.clip(0, 255).astype(np.uint8)


def make_tree(root, per_class: int = 12, classes=CLASSES, seed: int = 0):
    """per_class images per class, cycling through RGB PNG, JPEG, grey 'L' PNG and RGBA PNG, of different sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(20, 20), (40, 30), (24, 48), (64, 64)]
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = Image.fromarray(draw(cls, sizes[i % 4], rng))
            kind = i % 4
            if kind == 0:
                img.save(root / cls / f"img{i:02d}.png")
            elif kind == 1:
                img.save(root / cls / f"img{i:02d}.jpg", quality=95)
            elif kind == 2:
                img.convert("L").save(root / cls / f"img{i:02d}.png")
            else:
                rgba = img.convert("RGBA")
                rgba.putalpha(200)
                rgba.save(root / cls / f"img{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("folder") / "shapes")


def test_folder_images_are_rgb_square_and_labelled_by_sorted_folder(tree):
    from sfd_ddpm.data import class_names, load_dataset

    train = load_dataset("folder", str(tree), 16, "train")
    test = load_dataset("folder", str(tree), 16, "test")
    assert class_names(train) == CLASSES == class_names({"dataset": "folder", "root": str(tree)})
    assert train.images.shape[1:] == (3, 16, 16) and len(train) + len(test) == 36
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert sorted(set(train.targets)) == [0, 1, 2] and sorted(set(test.targets)) == [0, 1, 2]
    # a grey file is read as RGB with equal channels; every RGB file has unequal ones (coloured shapes)
    from sfd_ddpm.folder_data import _decode
    grey, _ = _decode(str(tree / "disc" / "img02.png"), 16)
    rgba, _ = _decode(str(tree / "disc" / "img03.png"), 16)
    assert grey.shape == rgba.shape == (16, 16, 3)
    assert (grey[..., 0] == grey[..., 1]).all() and not (rgba[..., 0] == rgba[..., 2]).all()
    # the classes are what their folders say: disc red, square blue, stripes green (centre pixel of RGB files)
    means = [train.images[[i for i, t in enumerate(train.targets) if t == c]].mean((0, 2, 3)) for c in range(3)]
    assert means[0].argmax() == 0 and means[1].argmax() == 2 and means[2].argmax() == 1
    # the demo's helpers: held-out references of the remaining classes, teacher overrides
    from sfd_ddpm.folder_data import config_overrides, reference_images
    ref = reference_images(tree, 16, [2], per_class=5)
    assert torch.equal(ref, test.images[[i for i, t in enumerate(test.targets) if t != 2]])
    assert config_overrides(tree, 16)[2:4] == ["data.n_classes=3", "data.image_size=16"]


def test_split_is_deterministic_disjoint_and_independent_of_listing_order(tree, tmp_path):
    from sfd_ddpm.folder_data import scan

    first, again = scan(tree), scan(tree)
    assert first == again
    train = {p for p, _ in first["files"]["train"]}
    test = {p for p, _ in first["files"]["test"]}
    assert not train & test and len(train | test) == 36
    assert sorted(t for _, t in first["files"]["test"]) == [0, 1, 2]  # max(1, round(0.1 * 12)) per class
    # the same files written in another order (another creation time and directory order) split the same
    other = make_tree(tmp_path / "shapes", classes=list(reversed(CLASSES)))
    rel = lambda files, root: sorted(str(p).replace(str(root), "") for p, _ in files)  # noqa: E731
    assert rel(scan(other)["files"]["test"], other) == rel(first["files"]["test"], tree)


def test_unreadable_images_are_skipped_with_a_count_then_refused_above_ten_percent(tmp_path, capsys):
    from sfd_ddpm.folder_data import FolderError, load_folder

    root = make_tree(tmp_path / "some_bad", per_class=12)
    (root / "disc" / "broken.png").write_bytes(b"not an image")
    ds = load_folder(root, 16, "train")
    assert ds.unreadable == 1 and "skipped 1 unreadable image file(s) of 37" in capsys.readouterr().err
    for i in range(4):
        (root / "square" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(FolderError, match="5 of 41 image files .* are unreadable"):
        load_folder(root, 17, "train")


def test_classes_by_name_or_index(tree):
    from sfd_ddpm.data import resolve_classes

    assert resolve_classes("stripes,0", CLASSES) == [2, 0] and resolve_classes(["square"], CLASSES) == [1]
    assert resolve_classes("all", CLASSES) == [0, 1, 2] and resolve_classes("0-1", CLASSES) == [0, 1]
    with pytest.raises(ValueError, match="'squares' is neither a class name nor an index .*did you mean 'square'"):
        resolve_classes("squares", CLASSES)
    with pytest.raises(ValueError, match="out of range"):
        resolve_classes([3], CLASSES)


def test_classifier_step_budget_augmentation_and_cosine_decay_are_used():
    from torch.utils.data import DataLoader, TensorDataset

    from sfd_ddpm.classifiers import SmallCNN, epochs_for_steps, fit, random_crop

    assert epochs_for_steps(1618, 128, 1500, 10) == 116 and epochs_for_steps(50_000, 128, 3000, 10) == 10
    assert epochs_for_steps(33, 16, 60, 10) == 20 and epochs_for_steps(33, 16, 6, 10) == 10
    x = torch.randn(4, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    shifted = random_crop(x, 2, g)
    assert shifted.shape == x.shape and not torch.equal(shifted, x) and torch.equal(random_crop(x, 0, g), x)
    data = TensorDataset(torch.randn(16, 3, 8, 8), torch.arange(16) % 3)

    def weights(**kw):
        torch.manual_seed(0)
        model = SmallCNN(3, 3, 4)
        fit(model, DataLoader(data, batch_size=8), epochs=1, lr=1e-2, progress=False, log=lambda *_: None, **kw)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    plain = weights()
    assert torch.equal(plain, weights())
    assert not torch.allclose(plain, weights(crop_pad=2)) and not torch.allclose(plain, weights(cosine=True))


def test_sfd_override_accepts_modes_names_and_mappings():
    """The schema let only numbers through for sfd.override (its default is 1), refusing 'random',
    'classifier', a mapping and a class name that its help promises."""
    from sfd_ddpm.config import load_config

    for value, parsed in (("random", "random"), ("classifier", "classifier"), ("{0: 2}", {0: 2}), ("disc", "disc"),
                          ("3", 3)):
        assert load_config(None, [f"sfd.override={value}"])["sfd"]["override"] == parsed


@pytest.mark.slow
@pytest.mark.subprocess
def test_pretrain_sfd_classifier_and_evaluation_through_a_folder(tree, tmp_path):
    """The entry scripts on a folder, as a user runs them: classifier, pretraining, SFD forgetting a class
    by folder name, sampling, held-out references, UA and classifier FID with the folder's class names."""
    data = ["data.dataset=folder", f"data.root={tree}", "data.n_classes=3", "data.image_size=16"]
    clf = tmp_path / "clf.safetensors"
    out = run_script("train_classifier.py", "--dataset", "folder", "--root", tree, "--image-size", "16", "--out", clf,
                     "--target-steps", "60", "--batch", "16", "--no-progress")
    assert "test accuracy" in out.stdout and "epoch 20/20" in out.stdout  # 33 images / 16 = 3 batches per epoch
    from sfd_ddpm.classifiers import classifier_quality_note, read_classifier_metadata
    meta = read_classifier_metadata(clf)
    assert meta["class_names"] == CLASSES and meta["n_classes"] == 3 and meta["image_size"] == 16
    assert meta["training"]["n_train"] == 33 and meta["training"]["n_test"] == 3 and meta["training"]["crop_pad"] == 2
    assert (classifier_quality_note(meta) is None) == (meta["test_accuracy"] >= 0.95)
    assert ("WARNING" in out.stderr) == (meta["test_accuracy"] < 0.95)

    teacher_dir = tmp_path / "teacher"
    run_script("train.py", "--config", "configs/builtin_train.yaml", "--outdir", teacher_dir, *data, *QUICK)
    (teacher_run,) = teacher_dir.iterdir()
    cfg = json.loads((teacher_run / "config.json").read_text())
    assert cfg["data"]["class_names"] == CLASSES and cfg["data"]["dataset"] == "folder"
    teacher = teacher_run / "network-0000003.safetensors"

    sfd_dir = tmp_path / "sfd"  # the folder and its names come from the teacher; forget/override by name
    run_script("train.py", "--config", "configs/builtin_sfd.yaml", "--outdir", sfd_dir, f"sfd.init={teacher}",
               "sfd.forget=[stripes]", "sfd.override=disc", *QUICK[-8:])
    (sfd_run,) = sfd_dir.iterdir()
    sfd_cfg = json.loads((sfd_run / "config.json").read_text())
    assert sfd_cfg["sfd"]["forget"] == [2] and sfd_cfg["sfd"]["override"] == 0
    assert sfd_cfg["data"]["class_names"] == CLASSES and sfd_cfg["data"]["n_classes"] == 3

    samples, refs = tmp_path / "samples", tmp_path / "refs"
    run_script("sample.py", "--ckpt", sfd_run, "--out", samples, "--classes", "disc,stripes", "--per-class", "3")
    assert sorted(p.name[:3] for p in samples.glob("*.png")) == ["000"] * 3 + ["002"] * 3
    assert json.loads((samples / "settings.json").read_text())["class_names"] == CLASSES
    run_script("save_dataset.py", "--dataset", "folder", "--root", tree, "--image-size", "16", "--split", "test",
               "--exclude-class", "stripes", "--out", refs)
    assert sorted(p.name for p in refs.glob("*.png")) == ["000_00000.png", "001_00000.png"]

    ua_json = tmp_path / "ua.json"
    proc = run_script("evaluate.py", "ua", "--images", samples, "--classifier", clf, "--forget", "stripes",
                      "--out", ua_json)
    ua = json.loads(ua_json.read_text())["results"]
    assert ua["forget_classes"] == [2] and ua["class_names"] == CLASSES and ua["forget_class_names"] == ["stripes"]
    assert ua["classifier_test_accuracy"] == meta["test_accuracy"]
    assert f"classifier test accuracy {meta['test_accuracy']:.3f}" in proc.stdout
    fid_json = tmp_path / "fid.json"
    run_script("evaluate.py", "fid", "--images", samples, "--ref", refs, "--exclude", "stripes", "--features",
               "classifier", "--classifier", clf, "--metrics", "fid", "--no-cache", "--out", fid_json)
    fid = json.loads(fid_json.read_text())
    assert fid["results"]["classifier_fid"] >= 0 and fid["settings"]["excluded_class_names"] == ["stripes"]


def bad_tree(kind: str, tmp_path):
    root = tmp_path / kind
    if kind == "missing":
        return root
    if kind == "empty":
        root.mkdir()
    elif kind == "one_class":
        make_tree(root, per_class=4, classes=["disc"])
    elif kind == "unreadable":
        make_tree(root, per_class=4, classes=["disc", "square"])
        for i in range(2):
            (root / "disc" / f"junk{i}.png").write_bytes(b"junk")
    else:
        make_tree(root, per_class=4, classes=["disc", "square"])
    return root


@pytest.mark.subprocess
@pytest.mark.parametrize("kind,extra,message", [
    ("missing", [], "not found"),
    ("empty", [], "holds no class sub-folders"),
    ("one_class", ["data.n_classes=1"], "holds one class ('disc')"),
    ("unreadable", [], "2 of 10 image files"),
    ("ok", ["data.n_classes=3"], "data.n_classes=3 but"),
])
def test_bad_folders_fail_with_a_message_and_write_nothing(tmp_path, kind, extra, message):
    root = bad_tree(kind, tmp_path)
    outdir = tmp_path / "runs"
    proc = run_script("train.py", "--config", "configs/builtin_train.yaml", "--outdir", outdir, "data.dataset=folder",
                      f"data.root={root}", "data.n_classes=2", "data.image_size=16", *QUICK, *extra, check=False)
    assert proc.returncode != 0 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not outdir.exists() or not any(outdir.iterdir())


@pytest.mark.subprocess
def test_bad_folder_and_unknown_forget_name_in_the_other_scripts(tmp_path):
    proc = run_script("train_classifier.py", "--dataset", "folder", "--root", tmp_path / "nowhere", "--out",
                      tmp_path / "c.safetensors", check=False)
    assert proc.returncode != 0 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "c.safetensors").exists()
    root = bad_tree("ok", tmp_path)
    proc = run_script("train.py", "--config", "configs/builtin_sfd.yaml", "--outdir", tmp_path / "r", "data.dataset=folder",
                      f"data.root={root}", "data.n_classes=2", "sfd.forget=[cow]", "sfd.init=nowhere.safetensors",
                      check=False)
    assert proc.returncode != 0 and "'cow' is neither a class name nor an index" in proc.stderr, proc.stderr
    assert "0=disc, 1=square" in proc.stderr


@pytest.mark.slow  # ~1-2 min: demo.py --quick and compare.py --quick (SFD only, one seed) on a class folder
@pytest.mark.subprocess
def test_demo_and_compare_run_on_a_class_folder_with_its_names(tree, tmp_path):
    out = tmp_path / "demo"
    run_script("demo.py", "--quick", "--data-root", tree, "--forget", "stripes", "--override", "disc", "--outdir", out)
    report = json.loads((out / "report.json").read_text())
    assert report["dataset"]["class_names"] == CLASSES and report["dataset"]["name"] == "folder"
    assert report["forget_class"] == 2 and report["override_class"] == 0
    assert report["classifier_test_accuracy"] is not None
    assert (report["classifier_warning"] is None) == (report["classifier_test_accuracy"] >= 0.95)
    md = (out / "report.md").read_text()
    assert "Forget class 2 (stripes) into override 0 (disc)" in md and "test accuracy" in md
    # the FID reference is the folder's held-out split: 1 image per remaining class of 12
    from sfd_ddpm.demo_report import reference_images
    data = json.loads((next((out / "teacher").iterdir()) / "config.json").read_text())["data"]
    assert reference_images(2, 5, data).shape == (2, 3, 16, 16)
    assert (out / "comparison.png").exists()
    # the teacher was sized to the folder (quick rule: 2 one-epoch chunks), its checks on disk and in the report,
    # trained without flips
    rec = report["teacher_training"]
    assert rec["finished"] and [c["epoch"] for c in rec["checks"]] == [1, 2] or rec["stop_reason"] == "accuracy"
    assert rec == json.loads((Path(rec["checkpoint"]).parent / "teacher_checks.json").read_text())
    assert "Teacher sized to the folder" in md and report["dataset"]["random_flip"] is False
    # a demo folder of one dataset is never silently reused for another
    proc = run_script("demo.py", "--quick", "--outdir", out, check=False)
    assert proc.returncode != 0 and "was trained on folder" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_script("demo.py", "--quick", "--data-root", tree, "--forget", "cow", "--outdir", tmp_path / "x",
                      check=False)
    assert proc.returncode != 0 and "'cow' is neither a class name nor an index" in proc.stderr
    assert not (tmp_path / "x").exists()

    cmp = tmp_path / "cmp"
    run_script("compare.py", "--quick", "--data-root", tree, "--methods", "sfd", "--seeds", "1", "--demo", out,
               "--outdir", cmp)
    r = json.loads((cmp / "compare.json").read_text())
    assert r["dataset"]["class_names"] == CLASSES and r["classifier_test_accuracy"] is not None
    sfd = json.loads((cmp / "sfd" / "seed0" / "spec.json").read_text())["train"]
    assert f"data.root={tree.resolve()}" in sfd and "data.n_classes=3" in sfd
    assert "(forget class 0, disc, into 1, square)" in (cmp / "compare.md").read_text()
    assert {row["method"] for row in r["rows"]} == {"teacher", "sfd"}
    assert r["teacher_training"]["finished"] and "teacher_check" in r   # --quick trains its own sized teacher
