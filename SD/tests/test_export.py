"""export.py: a trained tiny snapshot -> diffusers pipeline folder -> the card's snippet -> same image as generate.py."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from conftest import SD_DIR

PROMPTS = SD_DIR / "prompts"


@pytest.fixture(scope="module")
def trained_snapshot(tiny_sd_dir, tmp_path_factory):
    """A real SFD run on the tiny model: 2 iterations, so the generator differs from the teacher."""
    from train import main

    out = tmp_path_factory.mktemp("runs")
    args = [f"sd_model={tiny_sd_dir}", f"remain_prompts={PROMPTS / 'remain_prompts_small.txt'}",
            f"forget_prompts={PROMPTS / 'brad_pitt_prompts.txt'}", "concept_to_forget=brad pitt",
            "concept_to_override=a middle aged man", "generator_init=teacher", "resolution=16", "batch=2",
            "grad_checkpointing=false", "lr_fake=1e-3", "lr_gen=1e-3", "duration_kimg=0.004",
            "snap_kimg=0.004", "state_kimg=0.004", f"outdir={out}"]
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return next(out.glob("00000-*/network-snapshot-000000004"))


def export(*args):
    from export import main

    return CliRunner().invoke(main, [str(a) for a in args])


def front_matter(card: str) -> dict:
    m = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert m, card[:200]
    return yaml.safe_load(m.group(1))


def test_export_loads_with_the_documented_snippet_and_matches_generate(trained_snapshot, tmp_path, monkeypatch):
    from generate import main as generate

    out = tmp_path / "export"
    res = export("--snapshot", trained_snapshot, "--out", out, "--base-model-id",
                 "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert res.exit_code == 0, res.output
    names = {p.name for p in out.iterdir()}
    assert {"model_index.json", "pipeline.py", "README.md", "unet", "vae", "text_encoder", "tokenizer",
            "scheduler"} <= names
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == ["pipeline", "SFDOneStepPipeline"]

    # The card: YAML front matter as hubs parse it, naming the concept, its override and the base model.
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert meta["license"] == "creativeml-openrail-m" and meta["library_name"] == "diffusers"
    assert meta["sfd"]["concept_forgotten"] == "brad pitt" and meta["sfd"]["concept_override"] == "a middle aged man"
    assert "brad pitt" in card and "a middle aged man" in card and "| `lr_gen` | 0.001 |" in card

    # The documented snippet, run as written (from the card, pointed at the folder) in a fresh cwd.
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "DiffusionPipeline.from_pretrained" in snippet
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - our own card's code
    assert type(scope["pipe"]).__name__ == "SFDOneStepPipeline"
    ours = np.asarray(Image.open(tmp_path / "cat.png"))

    res = CliRunner().invoke(generate, ["--network", str(trained_snapshot), "--prompt", "a photo of a cat",
                                        "--seeds", "0-2", "--resolution", "16", "--outdir", str(tmp_path / "gen")])
    assert res.exit_code == 0, res.output
    ref = np.asarray(Image.open(tmp_path / "gen" / "a-photo-of-a-cat" / "00000.png"))
    assert ours.shape == ref.shape == (16, 16, 3)
    # Same computation on the same CPU: equal up to a rounding step of the uint8 conversion.
    assert np.abs(ours.astype(int) - ref.astype(int)).max() <= 1

    # Several seeds at once, one generator per image: each is generate.py's image for its seed.
    import torch

    pipe = scope["pipe"]
    imgs = pipe(["a photo of a cat"] * 3, generator=[torch.Generator().manual_seed(s) for s in range(3)],
                output_type="np").images
    for s in range(3):
        ref = np.asarray(Image.open(tmp_path / "gen" / "a-photo-of-a-cat" / f"{s:05d}.png")).astype(int)
        assert np.abs(np.round(imgs[s] * 255).astype(int) - ref).max() <= 1
    assert np.abs(np.round(imgs[0] * 255) - np.round(imgs[1] * 255)).max() > 5  # seeds differ

    # It is the trained generator, not the base UNet: the teacher's one-step image differs.
    from diffusers import UNet2DConditionModel

    base = UNet2DConditionModel.from_pretrained(json.loads(
        (trained_snapshot / "sfd_generator.json").read_text())["sd_model"], subfolder="unet")
    pipe.unet = base
    teacher_img = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.abs(np.round(teacher_img * 255) - ours).max() > 5


def test_card_eval_table_local_base_and_errors(trained_snapshot, tmp_path):
    record = {"metric": "clip_score", "label": "SFD", "prompt_set": "coco", "totals": {"clip_score": 31.25,
                                                                                     "images": 40}}
    (tmp_path / "clip.json").write_text(json.dumps(record))
    out = tmp_path / "export"
    res = export("--snapshot", trained_snapshot, "--out", out, "--eval-json", tmp_path / "clip.json")
    assert res.exit_code != 0 and "--license" in res.output  # a local base folder: licence unknown
    res = export("--snapshot", trained_snapshot, "--out", out, "--eval-json", tmp_path / "clip.json",
                 "--license", "creativeml-openrail-m")
    assert res.exit_code == 0, res.output
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert "base_model" not in meta  # a local folder is not a hub id: named in the text only
    assert meta["license"] == "creativeml-openrail-m"
    assert "## Evaluation" in card and "31.25 (n=40)" in card and "CLIP score" in card

    res = export("--snapshot", trained_snapshot, "--out", out)
    assert res.exit_code != 0 and "not empty" in res.output
    res = export("--snapshot", trained_snapshot.parent, "--out", tmp_path / "x")
    assert res.exit_code != 0 and "not a generator snapshot" in res.output
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_unknown_base_licence_needs_an_option(trained_snapshot, tmp_path):
    res = export("--snapshot", trained_snapshot, "--out", tmp_path / "e", "--base-model-id", "someone/other-model")
    assert res.exit_code != 0 and "--license" in res.output and not (tmp_path / "e").exists()
    res = export("--snapshot", trained_snapshot, "--out", tmp_path / "e", "--base-model-id", "someone/other-model",
                 "--license", "apache-2.0")
    assert res.exit_code == 0, res.output
    assert front_matter((tmp_path / "e" / "README.md").read_text())["license"] == "apache-2.0"


def test_push_without_login_fails_clearly(trained_snapshot, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)  # whatever this machine has
    res = export("--snapshot", trained_snapshot, "--out", tmp_path / "p", "--push-to-hub", "me/sfd",
                 "--base-model-id", "stable-diffusion-v1-5/stable-diffusion-v1-5")
    assert res.exit_code != 0 and "hf auth login" in res.output
