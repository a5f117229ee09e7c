"""Faults a user meets, one test each: the message, the exit code, and that nothing was lost or
mislabelled (non-finite weights and images, sample folders from another checkpoint, bad --out)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from sfd_ddpm import checkpoints
from sfd_ddpm.images import NonFiniteImages, save_images


def variant(src, dst, change):
    """A copy of weights file ``src`` with ``change(name, tensor) -> tensor`` applied to every tensor."""
    nets, meta = checkpoints.load_weights(src)
    nets = {n: {k: change(f"{n}.{k}", v.clone()) for k, v in sd.items()} for n, sd in nets.items()}
    checkpoints.save_weights(dst, nets, meta["config"], meta["step"], meta["kind"])
    return dst


def nan_in(key):
    def change(name, v):
        if name == key:
            v.view(-1)[0] = float("nan")
        return v
    return change


def first_weight(path):
    return next(k for k in load_file(str(path)) if k.startswith("ema.") and k.endswith("weight"))


def sample(ckpt, out, *extra, check=False):
    return run_script("sample.py", "--ckpt", ckpt, "--out", out, "--classes", "0,1", "--per-class", "2",
                      "--sampler", "ddim", "--steps", "2", *extra, check=check)


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


# ---- non-finite weights and outputs -----------------------------------------------------------------
def test_loading_a_checkpoint_with_a_nan_names_the_tensor(tmp_path, tiny_teacher):
    key = first_weight(tiny_teacher)
    bad = variant(tiny_teacher, tmp_path / "nan.safetensors", nan_in(key))
    with pytest.raises(checkpoints.CheckpointError, match=f"tensor '{key}' holds 1 non-finite"):
        checkpoints.load_weights(bad)
    out = tmp_path / "samples"
    proc = sample(bad, out)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"tensor '{key}' holds 1 non-finite value" in proc.stderr
    assert not out.exists()  # no folder, no black PNGs


def test_non_finite_images_are_never_written(tmp_path, tiny_teacher):
    x = torch.zeros(3, 3, 4, 4)
    x[1, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteImages, match=r"1 of 3 generated images .*001_00007\.png"):
        save_images(x, [0, 1, 2], [5, 7, 9], tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # through sample.py: finite weights so large that the network overflows to inf / NaN
    huge = variant(tiny_teacher, tmp_path / "huge.safetensors",
                   lambda name, v: v * 1e30 if v.is_floating_point() and v.dim() > 1 else v)
    out = tmp_path / "samples"
    proc = sample(huge, out)
    assert proc.returncode == 1 and "hold NaN or inf values" in proc.stderr and "Traceback" not in proc.stderr
    assert not list(out.glob("*.png"))


def test_evaluators_refuse_non_finite_images_and_classifiers(tmp_path):
    from sfd_ddpm.classifiers import build_classifier, save_classifier
    from sfd_ddpm.metrics.ua import classify, classify_folder

    model = build_classifier("small_cnn", 10, 3, width=8).eval()
    images = torch.zeros(4, 3, 16, 16)
    images[2] = float("nan")
    with pytest.raises(ValueError, match="1 of 4 images hold NaN or inf"):
        classify(model, images)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("nan")
    save_images(torch.zeros(2, 3, 16, 16), [0, 0], [0, 1], tmp_path / "imgs")
    with pytest.raises(ValueError, match="NaN or inf logits"):
        classify_folder(model, tmp_path / "imgs")
    # and a classifier file with a NaN weight is refused at load, by evaluate.py with a one-line message
    path = tmp_path / "clf.safetensors"
    save_classifier(path, model, architecture="small_cnn", dataset="builtin", image_size=16, test_accuracy=None,
                    training={})
    proc = run_script("evaluate.py", "ua", "--images", tmp_path / "imgs", "--classifier", path, "--forget", "0",
                      "--out", tmp_path / "ua.json", check=False)
    assert proc.returncode == 1 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ua.json").exists()



# ---- provenance of a sample folder ------------------------------------------------------------------
def test_sample_refuses_a_folder_of_another_checkpoint_or_settings(tmp_path, tiny_teacher):
    other = variant(tiny_teacher, tmp_path / "other.safetensors", lambda name, v: v * 1.01 if v.is_floating_point() else v)
    out = tmp_path / "samples"
    sample(tiny_teacher, out, check=True)
    before = files(out)
    assert len([n for n in before if n.endswith(".png")]) == 4
    for args, changed in (((other,), "checkpoint_sha256"), ((tiny_teacher, "--seed", "1"), "seed"),
                          ((tiny_teacher, "--guidance", "2"), "guidance")):
        proc = sample(args[0], out, *args[1:])
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "holds images made with another checkpoint or settings" in proc.stderr and changed in proc.stderr
        assert files(out) == before  # nothing deleted, added or relabelled
    # the same checkpoint and settings may add images; settings.json then counts every image
    sample(tiny_teacher, out, "--per-class", "3", check=True)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["images_per_class"] == {"0": 3, "1": 3} and settings["complete"] is True
    assert all((out / n).read_bytes() == b for n, b in before.items() if n.endswith(".png"))
    # --overwrite starts clean with the other checkpoint
    proc = sample(other, out, "--overwrite", check=True)
    settings = json.loads((out / "settings.json").read_text())
    assert settings["checkpoint_sha256"] == checkpoints.file_hash(other)
    assert settings["images_per_class"] == {"0": 2, "1": 2} and "wrote 4 images" in proc.stdout
    assert sorted(p.name for p in out.glob("*.png")) == ["000_00000.png", "000_00001.png", "001_00000.png",
                                                          "001_00001.png"]
    assert (out / "000_00000.png").read_bytes() != before["000_00000.png"]


def test_sample_refuses_images_without_settings(tmp_path, tiny_teacher):
    out = tmp_path / "samples"
    out.mkdir()
    (out / "000_00000.png").write_bytes(b"someone else's image")
    proc = sample(tiny_teacher, out)
    assert proc.returncode == 1 and "no settings.json" in proc.stderr and "--overwrite" in proc.stderr
    assert files(out) == {"000_00000.png": b"someone else's image"}


# ---- a bad --out is found before any sampling ---------------------------------------------------------
def test_file_blocked_out_fails_before_sampling(tmp_path, tiny_teacher):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    proc = sample(tiny_teacher, blocker / "samples", "--sampler", "ddpm")  # would take minutes if it sampled first
    assert proc.returncode == 1 and "cannot write to --out" in proc.stderr and "Traceback" not in proc.stderr
    assert "sampling" not in proc.stderr  # no progress bar: it stopped before sampling
    proc = sample(tiny_teacher, blocker)
    assert proc.returncode != 0 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text() == "a file where a folder should be"


def test_classifier_given_as_ckpt_is_named(tmp_path):
    from sfd_ddpm.classifiers import build_classifier, save_classifier

    path = tmp_path / "clf.safetensors"
    save_classifier(path, build_classifier("small_cnn", 10, 3, width=8), architecture="small_cnn", dataset="builtin",
                    image_size=16, test_accuracy=None, training={})
    proc = sample(path, tmp_path / "out")
    assert proc.returncode == 1 and "is a classifier" in proc.stderr and "--classifier" in proc.stderr
    assert not (tmp_path / "out").exists()


# ---- clean errors before any work, and a clean start after a kill ---------------------------------------
@pytest.mark.parametrize("override,message", [
    ("training.batch_size=0", "training.batch_size must be at least 1, got 0"),
    ("training.batch_size=8.5", "training.batch_size must be a whole number, got 8.5"),
    ("training.n_iters=-5", "training.n_iters must be at least 1, got -5"),
])
def test_bad_counts_are_config_errors(tmp_path, override, message):
    out = tmp_path / "runs"
    proc = run_script("train.py", "--config", "configs/builtin_train.yaml", "--outdir", out, override, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_run_folder_appears_only_once_inputs_are_valid(tmp_path):
    out = tmp_path / "runs"
    proc = run_script("train.py", "--config", "configs/builtin_sfd.yaml", "--outdir", out,
                      f"sfd.init={tmp_path / 'missing.safetensors'}", check=False)
    assert proc.returncode == 1 and "not found" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    proc = run_script("train.py", "--config", "configs/builtin_train.yaml", "--outdir", blocker / "runs", check=False)
    assert proc.returncode == 1 and "is a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
    assert blocker.read_text() == "x"


def test_resume_cleans_up_after_a_kill_and_refuses_a_second_writer(tmp_path, tiny_teacher):
    import subprocess
    import sys

    from conftest import TINY
    out = tmp_path / "runs"
    run_script("train.py", "--config", "configs/builtin_train.yaml", "--outdir", out, *TINY, "training.n_iters=2",
               "training.snapshot_every=100")
    (run,) = out.iterdir()
    assert not (run / "run.lock").exists()  # released at the end
    # what a kill after the state of iteration 2 leaves: logged iterations 3-4, half a line, a temporary file
    with open(run / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n{"step": 4, "loss": 1.0}\n{"step": 5, "lo')
    (run / ".training-state-0000003.pt.k1ll3d.tmp").write_bytes(b"half a state")
    # a live process holds the lock: a second writer is refused and changes nothing
    (run / "run.lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": __import__("os").getpid()}))
    before = files(run)
    proc = run_script("train.py", "--resume", run, "training.n_iters=4", check=False)
    assert proc.returncode == 1 and "is being written by another process" in proc.stderr
    assert "Traceback" not in proc.stderr and files(run) == before
    # the holder died (a stale lock): the resume takes over, removes the temporary, truncates the log
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / "run.lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead.pid}))
    run_script("train.py", "--resume", run, "training.n_iters=4")
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert not list(run.glob("*.tmp")) and not list(run.glob(".*.tmp")) and not (run / "run.lock").exists()
    from sfd_ddpm.rotation import latest_state
    assert torch.load(latest_state(run), weights_only=True)["step"] == 4


def test_evaluation_converts_grey_and_rgba_images_to_what_the_classifier_takes(tmp_path):
    from PIL import Image

    from sfd_ddpm.classifiers import build_classifier
    from sfd_ddpm.metrics.ua import classify_folder

    torch.manual_seed(0)
    model = build_classifier("small_cnn", 10, 3, width=8).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    rgb, mixed = tmp_path / "rgb", tmp_path / "mixed"
    save_images(x, [0, 0, 1, 1], [0, 1, 0, 1], rgb)
    save_images(x, [0, 0, 1, 1], [0, 1, 0, 1], mixed)
    Image.open(mixed / "000_00001.png").convert("L").save(mixed / "000_00001.png")
    Image.open(mixed / "001_00000.png").convert("RGBA").save(mixed / "001_00000.png")
    Image.open(rgb / "000_00001.png").convert("L").convert("RGB").save(rgb / "000_00001.png")  # what grey means in RGB
    a, la, _ = classify_folder(model, rgb)
    b, lb, _ = classify_folder(model, mixed)
    assert torch.equal(la, lb) and torch.allclose(a, b, atol=1e-6)
    # through evaluate.py with a classifier file
    from sfd_ddpm.classifiers import save_classifier
    path = tmp_path / "clf.safetensors"
    save_classifier(path, model, architecture="small_cnn", dataset="builtin", image_size=16, test_accuracy=None,
                    training={})
    proc = run_script("evaluate.py", "ua", "--images", mixed, "--classifier", path, "--forget", "0",
                      "--out", tmp_path / "ua.json", check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "ua.json").read_text())["results"]["n_forget_images"] == 2
