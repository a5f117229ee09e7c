"""Logging beside log.jsonl: --report-to tensorboard (numbers and one-step grids), the tqdm bar."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import SD_DIR
from test_train import base_args

VAL = str(SD_DIR / "prompts" / "brad_pitt_prompts_val.txt")


def invoke(args):
    from train import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_tensorboard_event_files_hold_the_log_and_the_grids(tiny_sd_dir, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    res = invoke(base_args(tiny_sd_dir, tmp_path, "duration_kimg=0.004", "tick_kimg=0.002", "snap_kimg=0.004",
                           f"val_prompts={VAL}", "report_to=tensorboard"))
    assert res.exit_code == 0, res.output
    run = next(tmp_path.glob("00000-*"))
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    for key in ("loss_fake_remain", "loss_gen_forget"):
        events = ea.Scalars(f"loss/{key}")
        assert [e.step for e in events] == [r["images_seen"] for r in log] == [2, 4]
        assert [e.value for e in events] == pytest.approx([r[key] for r in log], rel=1e-6)
    assert "perf/images_per_sec" in ea.Tags()["scalars"]
    for name in ("train", "val"):
        shots = ea.Images(f"grid/{name}")
        assert [s.step for s in shots] == [0, 4]
        png = Image.open(run / f"grid-{name}-000000004.png")
        assert (shots[-1].width, shots[-1].height) == png.size
        logged = np.asarray(Image.open(__import__("io").BytesIO(shots[-1].encoded_image_string)).convert("RGB"))
        assert np.array_equal(logged, np.asarray(png.convert("RGB")))  # the very grid that was saved


def test_tensorboard_missing_fails_before_any_work(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    res = invoke(base_args(tiny_sd_dir, tmp_path / "runs", "duration_kimg=0.002", "report_to=tensorboard"))
    assert res.exit_code != 0 and "pip install tensorboard" in res.output, res.output
    assert not (tmp_path / "runs").exists()


def test_progress_bar_counts_images(tiny_sd_dir, tmp_path):
    res = invoke(base_args(tiny_sd_dir, tmp_path, "duration_kimg=0.004", "tick_kimg=0.004", "snap_kimg=0.004"))
    assert res.exit_code == 0, res.output
    assert "SFD: 100%" in res.output and "4/4" in res.output, res.output
