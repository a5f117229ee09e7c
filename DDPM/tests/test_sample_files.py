"""sample.py's files: each PNG is renamed into place when complete; a PNG cut short by a kill is made again
on restart; evaluate.py refuses a folder whose settings.json says complete: false (unless
--allow-incomplete) and names an empty or cut-short PNG in one line."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from conftest import TINY
from sfd_ddpm import config as C
from sfd_ddpm.checkpoints import save_weights
from sfd_ddpm.networks import build_network


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A random tiny DDPM written in-process (no training: the files are under test, not the model)."""
    cfg = C.load_config("configs/builtin_train.yaml", TINY)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "network-0000000.safetensors"
    save_weights(path, {"ema": build_network(cfg).state_dict()}, cfg, 0, "ddpm")
    return path


def sample(ckpt, out):
    import sample as sample_script

    return CliRunner().invoke(sample_script.main, ["--ckpt", str(ckpt), "--out", str(out), "--classes", "0,1",
                                                   "--per-class", "3", "--sampler", "ddim", "--steps", "2",
                                                   "--device", "cpu"])


def pixels(path):
    with Image.open(path) as img:
        return np.asarray(img).astype(int)


def test_a_png_cut_short_by_a_kill_is_made_again_on_restart(tmp_path, tiny_ckpt):
    out = tmp_path / "samples"
    res = sample(tiny_ckpt, out)
    assert res.exit_code == 0, res.output
    before = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert len(before) == 6
    # what a kill during an in-place write leaves: the newest PNG cut short under its final name, the folder
    # marked incomplete (settings.json says complete: false from the start of every run)
    victim = out / "001_00002.png"
    victim.write_bytes(before[victim.name][: len(before[victim.name]) // 2])
    settings = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({**settings, "complete": False}))
    # ... and a temporary file of the atomic write, killed before its rename
    (out / ".001_00001.png.999.tmp").write_bytes(b"\x89PNG half")
    res = sample(tiny_ckpt, out)
    assert res.exit_code == 0, res.output
    assert "001_00002.png does not decode" in res.output and "made again" in res.output
    after = {p.name: p.read_bytes() for p in out.glob("*.png")}
    assert sorted(after) == sorted(before) and not list(out.glob(".*.tmp"))
    assert all(after[n] == before[n] for n in before if n != victim.name)  # finished images are kept as they are
    with Image.open(victim) as img:
        img.load()  # decodes fully now
    assert np.abs(pixels(victim) - np.asarray(Image.open(__import__("io").BytesIO(before[victim.name]))).astype(
        int)).max() <= 1  # the same image (within one 8-bit level: another batch shape)
    assert json.loads((out / "settings.json").read_text())["complete"] is True


def test_a_write_cut_short_leaves_no_png_under_its_final_name(tmp_path, monkeypatch):
    from sfd_ddpm.images import save_images

    real_save = Image.Image.save

    def killed(self, fp, *args, **kwargs):  # writes half a file, then the process "dies"
        real_save(self, fp, *args, **kwargs)
        data = open(fp, "rb").read()
        open(fp, "wb").write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_images(torch.zeros(1, 3, 8, 8), [0], [0], tmp_path)
    assert not (tmp_path / "000_00000.png").exists()


def write_folder(folder, complete=True, broken=None):
    from sfd_ddpm.data import make_builtin
    from sfd_ddpm.images import save_images

    x, y = make_builtin(2, seed=1)
    save_images(x, y.tolist(), list(range(len(y))), folder)
    (folder / "settings.json").write_text(json.dumps({"sampler": "ddim", "complete": complete,
                                                      "images_per_class": {str(c): 2 for c in range(10)}}))
    victim = sorted(folder.glob("003_*.png"))[0]
    if broken == "empty":
        victim.write_bytes(b"")
    elif broken == "truncated":
        victim.write_bytes(victim.read_bytes()[:200])
    return folder, victim


@pytest.fixture(scope="module")
def classifier_file(tmp_path_factory):
    from sfd_ddpm.classifiers import SmallCNN, save_classifier

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_classifier(path, SmallCNN(width=4), architecture="small_cnn", dataset="builtin", image_size=16,
                    test_accuracy=None, training={"note": "random stand-in"})
    return path


def evaluate(*args):
    import evaluate as evaluate_script

    return CliRunner().invoke(evaluate_script.main, [str(a) for a in args])


def test_evaluate_refuses_an_incomplete_folder_unless_allowed(tmp_path, classifier_file):
    images, _ = write_folder(tmp_path / "gen", complete=False)
    for cmd in (["ua", "--images", images, "--classifier", classifier_file, "--forget", "0"],
                ["fid", "--images", images, "--ref", images, "--features", "classifier", "--classifier",
                 classifier_file, "--no-cache", "--no-progress", "--metrics", "fid"]):
        res = evaluate(*cmd, "--out", tmp_path / "r.json")
        assert res.exit_code == 1 and len(res.output.strip().splitlines()) == 1, res.output
        assert "complete: false" in res.output and "--allow-incomplete" in res.output and str(images) in res.output
        assert not (tmp_path / "r.json").exists()
        res = evaluate(*cmd, "--out", tmp_path / "r.json", "--allow-incomplete")
        assert res.exit_code == 0 and "WARNING" in res.output, res.output
        rec = json.loads((tmp_path / "r.json").read_text())
        assert rec["settings"]["allow_incomplete"] is True
        (tmp_path / "r.json").unlink()


@pytest.mark.parametrize("broken", ["empty", "truncated"])
def test_evaluate_names_an_empty_or_cut_short_png_in_one_line(tmp_path, classifier_file, broken):
    images, victim = write_folder(tmp_path / "gen", broken=broken)
    ref, _ = write_folder(tmp_path / "ref")
    for cmd in (["ua", "--images", images, "--classifier", classifier_file, "--forget", "0"],
                ["fid", "--images", images, "--ref", ref, "--features", "classifier", "--classifier",
                 classifier_file, "--no-cache", "--no-progress", "--metrics", "fid"],
                ["fid", "--images", ref, "--ref", images, "--features", "classifier", "--classifier",
                 classifier_file, "--no-cache", "--no-progress", "--metrics", "fid"]):
        res = evaluate(*cmd, "--out", tmp_path / "r.json")
        assert res.exit_code == 1, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and str(victim) in lines[0], res.output
        assert ("is empty (0 bytes)" if broken == "empty" else "does not decode") in lines[0]
        assert not (tmp_path / "r.json").exists()
