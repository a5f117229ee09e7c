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
    assert res.exit_code == 1 and "cannot unpickle" in res.output
    res = convert_cli("--pkl", tmp_path / "none.pkl", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "file not found" in res.output
