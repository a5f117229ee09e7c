"""Where models come from and where outputs go: a hub id without a hub, a folder that is not a
generator, an export into a place that cannot be written. Each: one line naming the path or id and
the problem, exit 1, fast, nothing written and no model loaded."""
from __future__ import annotations

import os
import time

import pytest
from click.testing import CliRunner

from test_train import base_args

HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def invoke(script, args):
    module = __import__(script)
    return CliRunner().invoke(module.main, [str(a) for a in args])


def one_line_error(res, *phrases):
    """Exit 1 through click: stderr is exactly one line, 'Error: ...', holding every phrase."""
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.stderr
    for p in phrases:
        assert p in lines[0], (p, lines[0])


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty hub cache, whatever this machine has."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


@pytest.fixture
def no_model_loads(monkeypatch):
    from sfd_sd import models

    monkeypatch.setattr(models, "load_sd_parts", lambda *a, **k: pytest.fail("loaded a model"))


def test_hub_id_offline_fails_at_once_in_one_line(no_hub, no_model_loads, tiny_sd_dir, tmp_path):
    phrases = (repr(HUB_ID), "HF_HUB_OFFLINE=1", "sd_model=/path/to/folder", f"hf download {HUB_ID}")
    start = time.perf_counter()
    one_line_error(invoke("train", base_args(HUB_ID, tmp_path / "runs")), *phrases)
    one_line_error(invoke("generate", ["--network", "teacher", "--prompt", "a cat", "--outdir", tmp_path / "o"]),
                   *phrases)
    assert time.perf_counter() - start < 5  # no retries
    assert not (tmp_path / "runs").exists() and not (tmp_path / "o").exists()


def test_unreachable_hub_fails_at_once_and_a_cached_model_is_left_to_the_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from sfd_sd.models import ModelLoadError, check_model_source

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelLoadError, match="http://127.0.0.1:9 did not answer"):
        check_model_source(HUB_ID)
    (tmp_path / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / "abc").mkdir(parents=True)
    check_model_source(HUB_ID)  # from_pretrained may find it offline; it names what is missing itself


def test_generate_network_at_a_folder_that_is_no_generator(no_model_loads, tiny_sd_dir, tmp_path):
    from sfd_sd.models import unet_folder

    out = tmp_path / "o"
    for folder, phrase in (("vae", "describes AutoencoderKL, not a UNet2DConditionModel"),
                           ("text_encoder", "names no diffusers model class"),
                           ("tokenizer", "no config.json")):
        res = invoke("generate", ["--network", tiny_sd_dir / folder, "--sd-model", tiny_sd_dir, "--prompt", "a cat",
                                  "--outdir", out])
        one_line_error(res, f"--network {str(tiny_sd_dir / folder)!r}", "not a generator snapshot", phrase)
    assert not out.exists()
    assert unet_folder(tiny_sd_dir, "--network") == tiny_sd_dir / "unet"  # a pipeline folder gives its unet/


@pytest.fixture
def snapshot(tiny_sd_dir, tmp_path):
    from sfd_sd.checkpoints import save_generator_snapshot
    from tiny_sd import tiny_unet

    (tmp_path / "run").mkdir()
    return save_generator_snapshot(tiny_unet(0), tmp_path / "run" / "network-snapshot-000000008",
                                   dict(t_init=625, sd_model=str(tiny_sd_dir), revision=None))


def export_args(snap, out):
    return ["--snapshot", snap, "--out", out, "--license", "creativeml-openrail-m"]


def test_export_into_a_place_that_cannot_be_written(no_model_loads, snapshot, tmp_path, monkeypatch):
    import tempfile

    (tmp_path / "file").write_text("x")
    one_line_error(invoke("export", export_args(snapshot, tmp_path / "file" / "pipe")),
                   f"--out {str(tmp_path / 'file' / 'pipe')!r}", "cannot write there", "choose another folder")
    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: refuse writes under `locked` as the kernel would
        real = tempfile.mkdtemp

        def mkdtemp(*a, dir=None, **k):
            if dir is not None and str(dir).startswith(str(locked)):
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    else:
        locked.chmod(0o555)
    for out in (locked / "pipe", locked / "new" / "pipe"):
        one_line_error(invoke("export", export_args(snapshot, out)), f"--out {str(out)!r}", "Permission denied")
    assert list(locked.iterdir()) == [] and (tmp_path / "file").read_text() == "x"


def test_export_snapshot_at_a_vae_folder(no_model_loads, tiny_sd_dir, tmp_path):
    one_line_error(invoke("export", export_args(tiny_sd_dir / "vae", tmp_path / "pipe")),
                   "--snapshot", "describes AutoencoderKL")
    assert not (tmp_path / "pipe").exists()
