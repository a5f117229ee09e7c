"""generate.py: one-step and teacher modes, per-seed determinism whatever the batch, torchrun split."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import SD_DIR, run_env


@pytest.fixture(scope="module")
def snapshot(tiny_sd_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from sfd_sd.checkpoints import save_generator_snapshot

    folder = tmp_path_factory.mktemp("snap") / "network-snapshot-000000008"
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir / "unet")
    return save_generator_snapshot(unet, folder, dict(t_init=625, sd_model=str(tiny_sd_dir), revision=None))


def gen(args):
    from generate import main

    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


def load(out, rel):
    return np.asarray(Image.open(out / rel))


def test_one_step_images_manifest_and_batch_independence(snapshot, tmp_path):
    common = ["--network", str(snapshot), "--prompt", "a photo of a cat", "--prompt", "Brad Pitt on the red carpet",
              "--seeds", "0-4", "--resolution", "16"]
    gen(common + ["--batch", "1", "--outdir", str(tmp_path / "b1")])
    gen(common + ["--batch", "3", "--outdir", str(tmp_path / "b3")])
    man = json.loads((tmp_path / "b3" / "manifest.json").read_text())
    assert man["sampler"] == "one-step" and man["t_init"] == 625 and man["network_evaluations"] == 1
    assert len(man["images"]) == 10 and man["images"][0] == {"prompt": "a photo of a cat", "seed": 0,
                                                            "path": "a-photo-of-a-cat/00000.png"}
    diffs = []
    for rec in man["images"]:
        a, b = load(tmp_path / "b1", rec["path"]), load(tmp_path / "b3", rec["path"])
        assert a.shape == (16, 16, 3)
        diffs.append(np.abs(a.astype(int) - b.astype(int)).max())
    assert max(diffs) <= 1  # same seed -> same image whatever the batch (up to float rounding)
    a0, a1 = load(tmp_path / "b1", "a-photo-of-a-cat/00000.png"), load(tmp_path / "b1", "a-photo-of-a-cat/00001.png")
    assert np.abs(a0.astype(int) - a1.astype(int)).max() > 5  # different seeds differ


def test_teacher_mode_uses_the_pipeline_sampler(tiny_sd_dir, tmp_path):
    gen(["--network", "teacher", "--sd-model", str(tiny_sd_dir), "--prompt", "a dog", "--seeds", "3",
         "--steps", "3", "--resolution", "16", "--outdir", str(tmp_path)])
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["sampler"] == "PNDMScheduler" and man["steps"] == 3 and man["network_evaluations"] == 6
    assert load(tmp_path, "a-dog/00003.png").shape == (16, 16, 3)


def test_bad_network_fails_clearly(tmp_path):
    from generate import main

    res = CliRunner().invoke(main, ["--network", str(tmp_path / "nope"), "--prompt", "x", "--outdir", str(tmp_path)])
    assert res.exit_code != 0 and "not a folder" in res.output


@pytest.mark.slow
def test_torchrun_split_matches_single_process(snapshot, tmp_path):
    common = ["--network", str(snapshot), "--prompt", "a cat", "--prompt", "a dog", "--prompt", "a fish",
              "--seeds", "0-2", "--resolution", "16", "--batch", "2", "--device", "cpu"]
    gen(common + ["--outdir", str(tmp_path / "one")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "generate.py",
           *common, "--outdir", str(tmp_path / "two")]
    res = subprocess.run(cmd, cwd=SD_DIR, env=run_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    man = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert man["world_size"] == 2 and len(man["images"]) == 9
    for rec in man["images"]:
        a, b = load(tmp_path / "one", rec["path"]), load(tmp_path / "two", rec["path"])
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
