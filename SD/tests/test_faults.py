"""One test per fault: a one-line message that says what to do, exit code 1, nothing lost or mislabelled.

Training faults share one tiny run (2 iterations, a state after each) that each test copies.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from test_train import PROMPTS, base_args


def invoke(main, args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_error(res, *phrases):
    """Exit 1 through click (no traceback), last line 'Error: ...' holding every phrase."""
    assert res.exit_code == 1, (res.exit_code, res.output, res.exception)
    assert isinstance(res.exception, SystemExit), repr(res.exception)
    last = res.stderr.strip().splitlines()[-1]  # the error is the last line on stderr
    assert last.startswith("Error: ") and "Traceback" not in res.output, res.output
    for p in phrases:
        assert p in last, (p, last)


def train_main():
    from train import main

    return main


def gen_main():
    from generate import main

    return main


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def log_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]


RUN_ARGS = ("duration_kimg=0.004", "tick_kimg=0.002", "snap_kimg=0.002", "state_kimg=0.002", "seed=1")


@pytest.fixture(scope="module")
def one_run(tiny_sd_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-run")
    res = invoke(train_main(), base_args(tiny_sd_dir, out, *RUN_ARGS))
    assert res.exit_code == 0, res.output
    return next(out.glob("00000-*"))


@pytest.fixture
def run_copy(one_run, tmp_path):
    dst = tmp_path / "runs" / one_run.name
    shutil.copytree(one_run, dst)
    return dst


def resume_args(tiny_sd_dir, run, *extra, duration="0.004"):
    """The run's own settings given again in full (as a user re-running the command would), longer."""
    return base_args(tiny_sd_dir, run.parent, *RUN_ARGS, "--resume", run, *extra, f"duration_kimg={duration}")


# ------------------------------------------------------------------ non-finite
def test_nonfinite_loss_stops_keeping_the_last_good_state(tiny_sd_dir, tmp_path, monkeypatch):
    """From the 2nd iteration the generator loss is NaN for every sample (as with a NaN teacher)."""
    from sfd_sd import checkpoints, training

    real, calls, returned = training.sid_generator_loss, [0], []

    def poisoned(*a, **kw):
        calls[0] += 1
        per = real(*a, **kw)
        return per * float("nan") if calls[0] > 2 else per
    monkeypatch.setattr(training, "sid_generator_loss", poisoned)
    real_call = training.SFDStep.__call__
    monkeypatch.setattr(training.SFDStep, "__call__", lambda self, n: returned.append(real_call(self, n)) or returned[-1])

    res = invoke(train_main(), base_args(tiny_sd_dir, tmp_path, *RUN_ARGS))
    assert_clean_error(res, "non-finite loss after 2 images seen", "loss_gen_remain", "last good")
    run = next(tmp_path.glob("00000-*"))
    assert [p.name for p in checkpoints.training_states(run)] == ["training-state-000000002.pt"]
    assert checkpoints.load_training_state(run / "training-state-000000002.pt")["cur_nimg"] == 2
    assert not (run / "network-snapshot-000000004").exists()
    rows = log_rows(run)
    assert [r["images_seen"] for r in rows] == [2]  # nothing logged for the failed iteration
    for name in training.LOSS_NAMES:  # the log holds what the step returned: finite, not a stand-in 0.0
        assert rows[0][name] == pytest.approx(returned[0][name], rel=1e-12) and rows[0][name] != 0.0, name
    assert rows[0]["dropped_samples"] == 0


def test_partly_nonfinite_term_drops_samples_and_logs_the_count(tiny_parts):
    """One NaN sample of two: the term keeps the finite one (authors' safety net) and counts the drop."""
    from test_reference import REMAIN, FORGET, OVERRIDE, make_cfg

    from sfd_sd.denoiser import GuidedDenoiser, PromptEncoder, VPSchedule
    from sfd_sd.distributed import Dist
    from sfd_sd.prompts import PromptSampler
    from sfd_sd.training import Nets, SFDStep, guidance_settings
    import copy

    class HalfNaN(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.inner = unet

        def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
            out = self.inner(x, t, encoder_hidden_states=encoder_hidden_states).sample.clone()
            out[0] = float("nan")
            return (out,)

    enc = PromptEncoder(tiny_parts.tokenizer, tiny_parts.text_encoder, "cpu")
    sch = VPSchedule(tiny_parts.alphas_cumprod)
    teacher = GuidedDenoiser(HalfNaN(tiny_parts.unet), sch, enc)
    fake, gen = GuidedDenoiser(copy.deepcopy(tiny_parts.unet), sch, enc), GuidedDenoiser(copy.deepcopy(tiny_parts.unet), sch, enc)
    cfg = make_cfg(prompt_dropout=0.0)
    opt = lambda d: torch.optim.Adam(d.unet.parameters(), lr=1e-4)  # noqa: E731
    sc = torch.amp.GradScaler("cpu", enabled=False)
    step = SFDStep(cfg, Nets(teacher, fake, gen, None), PromptSampler([REMAIN], [(FORGET, OVERRIDE)]),
                   guidance_settings(cfg), Dist(), opt(fake), opt(gen), sc, sc, torch.Generator().manual_seed(0),
                   torch.Generator().manual_seed(1), (4, 8, 8))
    losses = step(0)
    assert losses["dropped_samples"] == 2  # one per generator term
    assert all(torch.isfinite(torch.tensor(losses[k])) for k in ("loss_gen_remain", "loss_gen_forget"))
    assert all(torch.isfinite(p).all() for p in gen.unet.parameters())


def _nan_unet(seed=0):
    from tiny_sd import tiny_unet

    unet = tiny_unet(seed)
    with torch.no_grad():
        unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    return unet


def test_nan_teacher_weights_refused_before_the_run_dir(tmp_path):
    from tiny_sd import build_tiny_sd

    sd = build_tiny_sd(tmp_path / "nan-sd", unet=_nan_unet())
    res = invoke(train_main(), base_args(sd, tmp_path / "runs"))
    assert_clean_error(res, "'conv_in.weight'", "non-finite")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # no empty run folder


def test_nan_generator_start_and_snapshot_refused(tiny_sd_dir, tmp_path):
    _nan_unet().save_pretrained(tmp_path / "gen")
    res = invoke(train_main(), base_args(tiny_sd_dir, tmp_path / "runs", f"generator_init={tmp_path / 'gen'}"))
    assert_clean_error(res, "generator_init", "'conv_in.weight'")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    (tmp_path / "gen" / "sfd_generator.json").write_text(json.dumps({"sd_model": str(tiny_sd_dir), "t_init": 625}))
    res = invoke(gen_main(), ["--network", tmp_path / "gen", "--prompt", "a cat", "--seeds", "0", "--resolution", "16",
                              "--outdir", tmp_path / "out"])
    assert_clean_error(res, "--network", "'conv_in.weight'")


# ------------------------------------------------------------------ resume
def test_resume_from_truncated_state(tiny_sd_dir, run_copy):
    state = run_copy / "training-state-000000004.pt"
    state.write_bytes(state.read_bytes()[:5000])
    before = files(run_copy)
    res = invoke(train_main(), resume_args(tiny_sd_dir, run_copy, duration="0.006"))
    assert_clean_error(res, "training-state-000000004.pt", "truncated or damaged", "earlier")
    assert files(run_copy) == before


def test_resume_removes_leftovers_truncates_the_log_and_continues_exactly(tiny_sd_dir, one_run, run_copy):
    """Killed after logging step 4 but before its state: resume from 2 redoes step 4 once."""
    (run_copy / "training-state-000000004.pt").unlink()
    (run_copy / ".training-state-000000004.pt.x1y2.tmp").write_bytes(b"partial")
    (run_copy / ".network-snapshot-000000004.abc").mkdir()
    assert [r["images_seen"] for r in log_rows(run_copy)] == [2, 4]
    res = invoke(train_main(), resume_args(tiny_sd_dir, run_copy))
    assert res.exit_code == 0, res.output
    assert [r["images_seen"] for r in log_rows(run_copy)] == [2, 4]
    assert not [p.name for p in run_copy.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".network")]
    a = torch.load(one_run / "training-state-000000004.pt", weights_only=True)
    b = torch.load(run_copy / "training-state-000000004.pt", weights_only=True)
    assert all(torch.equal(a["generator"][k], b["generator"][k]) for k in a["generator"])


def test_second_writer_is_refused_by_the_lock(tiny_sd_dir, run_copy):
    code = ("import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); f.truncate(0); "
            "f.write('pid 4242 on testhost'); f.flush(); print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_copy / "run.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = files(run_copy)
        res = invoke(train_main(), resume_args(tiny_sd_dir, run_copy, duration="0.006"))
        assert_clean_error(res, "being written by pid 4242 on testhost")
        assert files(run_copy) == before
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("flag, value, key", [("lr_gen", "2e-4", "lr_gen"), ("alpha", "1.2", "alpha"),
                                              ("batch", "4", "batch"), ("seed", "7", "seed")])
def test_resume_with_changed_settings_is_refused(tiny_sd_dir, run_copy, flag, value, key):
    before = files(run_copy)
    res = invoke(train_main(), resume_args(tiny_sd_dir, run_copy, f"{flag}={value}", duration="0.008"))
    assert_clean_error(res, "changed settings", f"{key}:", "--allow-changed-settings")
    assert files(run_copy) == before


def test_resume_with_allowed_change_is_recorded(tiny_sd_dir, run_copy):
    res = invoke(train_main(), resume_args(tiny_sd_dir, run_copy, "lr_gen=2e-4", "--allow-changed-settings",
                                           duration="0.006"))
    assert res.exit_code == 0, res.output
    cfg = json.loads((run_copy / "config.json").read_text())
    assert cfg["lr_gen"] == 2e-4
    assert cfg["resolved"]["resumes"] == [{"images_seen": 4, "changed_settings": {"lr_gen": [1e-4, 2e-4]}}]
    assert (run_copy / "training-state-000000006.pt").is_file()


def test_run_dir_of_an_existing_run_needs_resume(tiny_sd_dir, run_copy):
    before = files(run_copy)
    res = invoke(train_main(), base_args(tiny_sd_dir, run_copy.parent, f"run_dir={run_copy}"))
    assert_clean_error(res, "already holds a run", "--resume")
    assert files(run_copy) == before


# ------------------------------------------------------------------ inputs
def test_non_utf8_prompt_file(tiny_sd_dir, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 in paris\n".encode("latin-1"))
    args = base_args(tiny_sd_dir, tmp_path / "runs", f"remain_prompts={bad}")
    assert_clean_error(invoke(train_main(), args), "latin1.txt", "not UTF-8")
    assert not (tmp_path / "runs").exists()
    res = invoke(gen_main(), ["--network", "teacher", "--sd-model", tiny_sd_dir, "--prompts", bad, "--outdir", tmp_path / "o"])
    assert_clean_error(res, "not UTF-8")


def test_missing_relative_model_folder_is_named_as_a_folder(tiny_sd_dir, tmp_path):
    res = invoke(train_main(), base_args(tiny_sd_dir, tmp_path / "runs", "sd_model=some/relative/folder"))
    assert_clean_error(res, "'some/relative/folder'", "local folder not found")
    assert "internet" not in res.output
    res = invoke(gen_main(), ["--network", "teacher", "--sd-model", "some/relative/folder", "--prompt", "a cat",
                              "--outdir", tmp_path / "o"])
    assert_clean_error(res, "local folder not found")
    # one slash looks like a hub id: the message still says no such local folder exists
    res = invoke(train_main(), base_args(tiny_sd_dir, tmp_path / "runs", "sd_model=models/sd15"))
    assert_clean_error(res, "'models/sd15'", "there is no local folder")
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------ generate.py
@pytest.fixture(scope="module")
def snapshots(tiny_sd_dir, tmp_path_factory):
    from sfd_sd.checkpoints import save_generator_snapshot
    from tiny_sd import tiny_unet

    root = tmp_path_factory.mktemp("snaps")
    info = dict(t_init=625, sd_model=str(tiny_sd_dir), revision=None)
    for seed in (0, 1):
        (root / f"run{seed}").mkdir()
    return [save_generator_snapshot(tiny_unet(seed), root / f"run{seed}" / "network-snapshot-000000008", info)
            for seed in (0, 1)]


def gen_args(snap, out, *extra):
    return ["--network", snap, "--prompt", "a photo of a cat", "--seeds", "0-1", "--resolution", "16",
            "--outdir", out, *extra]


def pngs(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.glob("*/*.png")}


def test_network_at_a_non_snapshot_folder(tmp_path):
    (tmp_path / "run").mkdir()
    res = invoke(gen_main(), ["--network", tmp_path / "run", "--prompt", "x", "--outdir", tmp_path / "o"])
    assert_clean_error(res, "not a generator snapshot", "network-snapshot-*")
    assert not (tmp_path / "o").exists()


def test_outdir_file_or_blocked_fails_before_sampling(snapshots, tmp_path, monkeypatch):
    from sfd_sd import generation

    monkeypatch.setattr(generation.OneStepSampler, "__init__", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "file").write_text("x")
    assert_clean_error(invoke(gen_main(), gen_args(snapshots[0], tmp_path / "file")), "is a file")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a-photo-of-a-cat").write_text("x")
    assert_clean_error(invoke(gen_main(), gen_args(snapshots[0], tmp_path / "out")), "'a-photo-of-a-cat' is a file")
    if os.geteuid() != 0:  # root ignores permissions
        (tmp_path / "ro").mkdir(mode=0o555)
        assert_clean_error(invoke(gen_main(), gen_args(snapshots[0], tmp_path / "ro")), "not writable")


def test_outdir_holds_one_provenance(snapshots, tmp_path):
    out = tmp_path / "out"
    res = invoke(gen_main(), gen_args(snapshots[0], out))
    assert res.exit_code == 0, res.output
    first = files(out)
    # another network, or the same network with another t_init: refused, nothing touched
    assert_clean_error(invoke(gen_main(), gen_args(snapshots[1], out)), "another network or settings", "network",
                       "--overwrite")
    assert_clean_error(invoke(gen_main(), gen_args(snapshots[0], out, "--t-init", "500")), "t_init")
    assert files(out) == first
    # same settings, more seeds and a prompt: merged, the manifest lists every image in the folder
    res = invoke(gen_main(), gen_args(snapshots[0], out, "--seeds", "1-2", "--prompt", "a dog"))
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert {r["path"] for r in man["images"]} == pngs(out) == {
        "a-photo-of-a-cat/00000.png", "a-photo-of-a-cat/00001.png", "a-photo-of-a-cat/00002.png",
        "a-dog/00001.png", "a-dog/00002.png"}
    assert man["complete"] is True and man["t_init"] == 625 and man["seeds"] == [0, 1, 2]
    # --overwrite starts clean: only the new network's images remain, described by its manifest
    res = invoke(gen_main(), gen_args(snapshots[1], out, "--overwrite", "--seeds", "5"))
    assert res.exit_code == 0, res.output
    man = json.loads((out / "manifest.json").read_text())
    assert pngs(out) == {r["path"] for r in man["images"]} == {"a-photo-of-a-cat/00005.png"}
    assert man["network"] == str(snapshots[1].resolve())


def test_images_without_manifest_are_not_adopted(snapshots, tmp_path):
    out = tmp_path / "out"
    (out / "a-photo-of-a-cat").mkdir(parents=True)
    (out / "a-photo-of-a-cat" / "00000.png").write_bytes(b"\x89PNG old")
    assert_clean_error(invoke(gen_main(), gen_args(snapshots[0], out)), "without a manifest.json", "--overwrite")
    assert (out / "a-photo-of-a-cat" / "00000.png").read_bytes() == b"\x89PNG old"
