"""convert_sid_lsg.py: a SiD-LSG-style pickle becomes a diffusers folder with identical outputs; a pickle
carrying any other callable is refused and runs nothing."""
from __future__ import annotations

import os
import pickle

import pytest
import torch
from click.testing import CliRunner


def convert_cli(*args):
    from convert_sid_lsg import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_converted_folder_gives_identical_outputs(tmp_path):
    from diffusers import UNet2DConditionModel

    from tiny_sd import tiny_unet

    unet = tiny_unet(seed=3).eval()
    with torch.no_grad():
        unet.conv_out.bias.add_(0.5)  # not the init values
    with open(tmp_path / "g.pkl", "wb") as f:
        pickle.dump({"ema": unet}, f)
    res = convert_cli("--pkl", tmp_path / "g.pkl", "--out", tmp_path / "out")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors", "sfd_generator.json"]
    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "out").eval()
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([625, 625]), torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, emb).sample, unet(x, t, emb).sample)
    res = convert_cli("--pkl", tmp_path / "g.pkl", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "--overwrite" in res.output


class _Payload:
    """Unpickling this calls os.system (what a malicious checkpoint would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["top", "inside"])
def test_pickle_with_another_callable_is_refused_and_runs_nothing(tmp_path, where):
    from tiny_sd import tiny_unet

    marker = tmp_path / "ran"
    payload = _Payload(marker)
    obj = {"ema": payload} if where == "top" else {"ema": tiny_unet(), "extra": [payload]}
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(obj, f)
    res = convert_cli("--pkl", tmp_path / "evil.pkl", "--out", tmp_path / "out")
    assert res.exit_code == 1
    assert "refused to load posix.system" in res.output or "refused to load nt.system" in res.output, res.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pickle_naming_a_non_network_class_is_refused(tmp_path):
    import collections

    with open(tmp_path / "c.pkl", "wb") as f:
        pickle.dump({"ema": collections.Counter("abc")}, f)
    res = convert_cli("--pkl", tmp_path / "c.pkl", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "refused to load collections.Counter" in res.output, res.output


def test_truncated_pickle_and_missing_file(tmp_path):
    from tiny_sd import tiny_unet

    with open(tmp_path / "g.pkl", "wb") as f:
        pickle.dump({"ema": tiny_unet()}, f)
    data = (tmp_path / "g.pkl").read_bytes()
    (tmp_path / "g.pkl").write_bytes(data[: len(data) // 2])
    res = convert_cli("--pkl", tmp_path / "g.pkl", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "a truncated or damaged pickle" in res.output and "cannot unpickle" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    res = convert_cli("--pkl", tmp_path / "none.pkl", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "file not found" in res.output


BAD_FILES = {"empty": (b"", "an empty file (0 bytes)"),
             "html": (b"<!DOCTYPE html>\n<html><body>Access denied</body></html>\n", "an HTML page"),
             "text": (b"batch512_cfg4.54.54.5_t625_8380_v2.pkl\n", "a text file")}


@pytest.mark.parametrize("kind", sorted(BAD_FILES) + ["torch_save", "wrong_object"])
def test_a_file_that_is_not_a_sid_lsg_pickle_is_named_in_one_line(tmp_path, kind):
    pkl = tmp_path / "batch512_cfg4.54.54.5_t625_8380_v2.pkl"
    if kind == "torch_save":
        torch.save({"ema": {"conv_in.weight": torch.zeros(2)}}, pkl)
        what = "a zip archive"
    elif kind == "wrong_object":
        with open(pkl, "wb") as f:
            pickle.dump({"ema": {"conv_in.weight": torch.zeros(2)}}, f)
        what = "holds an object of type dict, not a diffusers network"
    else:
        data, what = BAD_FILES[kind]
        pkl.write_bytes(data)
    res = convert_cli("--pkl", pkl, "--out", tmp_path / "out")
    assert res.exit_code == 1, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and str(pkl) in lines[0] and what in lines[0], res.output
    assert "expected a SiD-LSG generator pickle" in lines[0]
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == [pkl.name]


def test_xformers_attention_processors_convert_to_identical_outputs(tmp_path):
    """SiD-LSG trains with --enable_xformers 1 by default, so its pickles hold XFormersAttnProcessor objects;
    they convert (as the default processor, xformers not needed) to the same folder as without them."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import (AttnProcessor2_0, SlicedAttnProcessor,
                                                      XFormersAttnAddedKVProcessor, XFormersAttnProcessor)

    from tiny_sd import tiny_unet

    unet = tiny_unet(seed=4).eval()
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"ema": unet}, f)
    unet.set_attn_processor(XFormersAttnProcessor())  # what enable_xformers_memory_efficient_attention() sets
    with open(tmp_path / "xformers.pkl", "wb") as f:  # and the other weightless variants, beside the network
        pickle.dump({"ema": unet, "extra": [XFormersAttnAddedKVProcessor(), SlicedAttnProcessor(2)]}, f)
    assert b"XFormersAttnProcessor" in (tmp_path / "xformers.pkl").read_bytes()
    for name in ("plain", "xformers"):
        res = convert_cli("--pkl", tmp_path / f"{name}.pkl", "--out", tmp_path / name)
        assert res.exit_code == 0, res.output
    weights = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "plain" / weights).read_bytes() == (tmp_path / "xformers" / weights).read_bytes()
    assert (tmp_path / "plain/config.json").read_text() == (tmp_path / "xformers/config.json").read_text()
    a, b = (UNet2DConditionModel.from_pretrained(tmp_path / n).eval() for n in ("plain", "xformers"))
    assert all(isinstance(p, AttnProcessor2_0) for p in b.attn_processors.values())
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([625, 625]), torch.randn(2, 16, 32)
    with torch.no_grad():
        assert torch.equal(a(x, t, emb).sample, b(x, t, emb).sample)


def test_xformers_processors_are_read_without_their_class_running(tmp_path, monkeypatch):
    """The processor is mapped by name: the class the pickle names is never looked up or constructed."""
    import diffusers.models.attention_processor as ap

    from sfd_sd.sid_lsg import RestrictedUnpickler

    with open(tmp_path / "p.pkl", "wb") as f:
        pickle.dump([ap.XFormersAttnProcessor(), ap.XFormersAttnAddedKVProcessor()], f)

    def boom(*a, **k):
        raise AssertionError("the pickled processor class was used")

    monkeypatch.setattr(ap.XFormersAttnProcessor, "__setstate__", boom, raising=False)
    monkeypatch.setattr(ap.XFormersAttnProcessor, "__new__", boom)
    with open(tmp_path / "p.pkl", "rb") as f:
        procs = RestrictedUnpickler(f).load()
    assert [type(p).__name__ for p in procs] == ["AttnProcessor2_0", "AttnAddedKVProcessor2_0"]
