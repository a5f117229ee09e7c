"""convert_edm.py: an NVIDIA persistence pickle is converted without running any of its code.

The pickle is built here, in NVIDIA's format, around random SongUNet weights: a stand-in
``torch_utils.persistence`` module (written in this test) whose reconstruction hook and embedded module
source would each leave a sentinel file if they ever ran.
"""
from __future__ import annotations

import collections
import copyreg
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sfd_ddpm import config as C
from sfd_ddpm.loading import load_network
from sfd_ddpm.networks import build_network

TINY = ["model.arch=songunet", "model.base_channels=16", "model.channel_mult=[1,2]", "model.layers_per_block=1",
        "model.attn_resolutions=[8]", "model.dropout=0.0", "model.augment_dim=9", "model.null_class=false",
        "data.image_size=16", "edm.precond=vp"]


@pytest.fixture
def persistence(tmp_path, monkeypatch):
    """Stand-in torch_utils.persistence and dnnlib.util modules; their code leaves sentinels if run."""
    ran = tmp_path / "reconstruct-ran"
    src_ran = tmp_path / "embedded-source-ran"
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):  # NVIDIA's hook would exec meta['module_src']
        ran.write_text("called")
        exec(meta["module_src"], {})
        raise AssertionError("unreachable in a safe conversion")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    pkg.persistence = mod
    dnnlib, util = types.ModuleType("dnnlib"), types.ModuleType("dnnlib.util")

    class EasyDict(dict):
        pass

    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    util.EasyDict = EasyDict
    dnnlib.util = util
    for name, m in (("torch_utils", pkg), ("torch_utils.persistence", mod), ("dnnlib", dnnlib), ("dnnlib.util", util)):
        monkeypatch.setitem(sys.modules, name, m)
    source = f"open({str(src_ran)!r}, 'w').write('the embedded source ran')\n"
    return types.SimpleNamespace(hook=_reconstruct_persistent_obj, EasyDict=EasyDict, source=source,
                                 sentinels=(ran, src_ran))


class Persistent:
    """Pickles like a torch_utils.persistence-decorated module: (_reconstruct_persistent_obj, (meta,))."""

    def __init__(self, hook, meta):
        self.hook, self.meta = hook, meta

    def __reduce__(self):
        return self.hook, (self.meta,)


class ModuleDictLike:
    """Pickles like a plain (non-persistent) torch.nn.ModuleDict: its class rebuilt by copyreg, then BUILD
    with its __dict__."""

    def __init__(self, state):
        self.state = state

    def __reduce__(self):
        return copyreg._reconstructor, (torch.nn.ModuleDict, object, None), self.state


def persistent_tree(module: torch.nn.Module, name: str, p, kwargs=None):
    """NVIDIA's pickled form of ``module`` (our EDMNetwork tree), with numpy hyper-parameters as theirs."""
    children = collections.OrderedDict((k, persistent_tree(m, type(m).__name__, p)) for k, m in module._modules.items())
    state = {"training": False, "_parameters": collections.OrderedDict(module._parameters),
             "_buffers": collections.OrderedDict(module._buffers), "_non_persistent_buffers_set": set(),
             "_modules": children, "_forward_hooks": collections.OrderedDict(), "skip_scale": np.float64(math.sqrt(0.5)),
             "_init_args": (), "_init_kwargs": p.EasyDict(kwargs or {})}
    if isinstance(module, torch.nn.ModuleDict):
        return ModuleDictLike(state)
    return Persistent(p.hook, {"type": "class", "version": 6, "module_src": p.source, "class_name": name, "state": state})


def nvidia_pickle(path, net, p, extra=None, precond="VPPrecond"):
    kw = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000,
              epsilon_t=1e-5, model_type="SongUNet", embedding_type="positional", encoder_type="standard",
              decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=16,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0, augment_dim=9)
    top = persistent_tree(net, precond, p, kw)
    unet_kw = {k: v for k, v in kw.items() if k not in ("img_channels", "use_fp16", "beta_d", "beta_min", "M", "epsilon_t", "model_type")}
    top.meta["state"]["_modules"]["model"].meta["state"]["_init_kwargs"] = p.EasyDict(unet_kw, in_channels=3, out_channels=3)
    data = {"ema": top, "loss_fn": Persistent(p.hook, {"type": "class", "version": 6, "module_src": p.source,
                                                       "class_name": "VPLoss", "state": {"beta_d": 19.9}}),
            "augment_pipe": None, "dataset_kwargs": p.EasyDict(path="cifar10-32x32.zip"), **(extra or {})}
    with open(path, "wb") as f:
        pickle.dump(data, f)


def convert(*args):
    import convert_edm
    return CliRunner().invoke(convert_edm.main, [str(a) for a in args])


@pytest.mark.parametrize("precond", ["VPPrecond", "EDMPrecond"])
def test_conversion_gives_the_same_network_and_runs_nothing(tmp_path, persistence, precond):
    torch.manual_seed(0)
    net = build_network(C.load_config(None, TINY + [f"edm.precond={precond[:-7].lower()}"])).eval()
    for prm in net.parameters():
        prm.data.normal_(0, 0.2)  # random weights everywhere (the zero-initialised layers too)
    pkl, out = tmp_path / "edm.pkl", tmp_path / "edm.safetensors"
    nvidia_pickle(pkl, net, persistence, precond=precond)
    result = convert("--pkl", pkl, "--out", out)
    assert result.exit_code == 0, result.output
    assert not any(s.exists() for s in persistence.sentinels)  # neither the hook nor the embedded source ran
    conv, cfg, meta = load_network(out)
    assert meta["kind"] == "ddpm" and cfg["model"]["arch"] == "songunet"
    assert cfg["edm"]["precond"] == {"VPPrecond": "vp", "EDMPrecond": "edm"}[precond]
    assert cfg["model"]["null_class"] is False and conv.null_label is None
    x, sigma, label = torch.randn(4, 3, 16, 16), torch.tensor([0.01, 0.5, 3.0, 60.0]), torch.tensor([0, 3, 7, 9])
    with torch.no_grad():
        assert torch.equal(conv(x, sigma, label), net(x, sigma, label))


def test_generator_role_writes_a_one_step_checkpoint(tmp_path, persistence):
    net = build_network(C.load_config(None, TINY)).eval()
    pkl, out = tmp_path / "sid.pkl", tmp_path / "sid.safetensors"
    nvidia_pickle(pkl, net, persistence)
    assert convert("--pkl", pkl, "--out", out, "--role", "generator").exit_code == 0
    _, cfg, meta = load_network(out)
    assert meta["kind"] == "sfd" and meta["networks"] == ["generator_ema"] and cfg["sfd"]["sigma_init"] == 2.5


@pytest.mark.parametrize("smuggled", ["os.system", "builtins.eval", "torch.load"])
def test_a_smuggled_callable_is_refused_and_nothing_runs(tmp_path, persistence, smuggled):
    sentinel = tmp_path / "smuggled-ran"

    class Smuggle:
        def __reduce__(self):
            if smuggled == "os.system":
                return os.system, (f"touch {sentinel}",)
            if smuggled == "builtins.eval":
                return eval, (f"open({str(sentinel)!r}, 'w')",)
            return torch.load, (str(sentinel),)

    net = build_network(C.load_config(None, TINY)).eval()
    pkl, out = tmp_path / "evil.pkl", tmp_path / "evil.safetensors"
    nvidia_pickle(pkl, net, persistence, extra={"payload": Smuggle()})
    result = convert("--pkl", pkl, "--out", out)
    assert result.exit_code != 0
    name = {"os.system": "system", "builtins.eval": "builtins.eval", "torch.load": "torch.serialization.load"}[smuggled]
    assert "refused to load" in result.output and name in result.output
    assert not sentinel.exists() and not out.exists() and not any(s.exists() for s in persistence.sentinels)


def test_non_ddpmpp_networks_are_refused(tmp_path, persistence):
    net = build_network(C.load_config(None, TINY)).eval()
    pkl = tmp_path / "ncsn.pkl"
    nvidia_pickle(pkl, net, persistence)
    from sfd_ddpm.edm_pickle import load_pickle
    record = load_pickle(pkl)["ema"]
    record.state["_modules"]["model"].state["_init_kwargs"]["embedding_type"] = "fourier"  # NCSN++'s embedding
    import convert_edm
    with pytest.raises(ValueError, match="only DDPM\\+\\+"):
        convert_edm.config_of(record, "cifar10", "teacher", 2.5)


def _bad_file(kind: str, path, good_pickle: bytes) -> None:
    """Write one kind of file that is not an EDM network pickle to ``path``."""
    if kind == "html":  # what a browser or a redirected curl saves in place of the pickle
        path.write_text("<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body></body></html>\n")
    elif kind == "truncated_download":
        path.write_bytes(good_pickle[: len(good_pickle) // 3])
    elif kind == "truncated_pickle":  # all but the last few bytes
        path.write_bytes(good_pickle[:-5])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "torch_save_zip":
        torch.save({"ema": {"weight": torch.zeros(2)}}, path)
    elif kind == "torch_save_legacy":
        torch.save({"ema": {"weight": torch.zeros(2)}}, path, _use_new_zipfile_serialization=False)
    elif kind == "text":
        path.write_text("model: edm-cifar10-32x32-cond-vp\nsee the README\n")
    elif kind == "wrong_object":  # a pickle of a state dict, not of NVIDIA's network records
        with open(path, "wb") as f:
            pickle.dump({"ema": collections.OrderedDict(weight=torch.zeros(2))}, f)
    elif kind == "not_a_dict":
        with open(path, "wb") as f:
            pickle.dump([1, 2, 3], f)


BAD_FILES = {"html": "an HTML page", "truncated_download": "a truncated or damaged pickle",
             "truncated_pickle": "a truncated or damaged pickle", "empty": "an empty file (0 bytes)",
             "torch_save_zip": "a zip archive", "torch_save_legacy": "a torch.save checkpoint",
             "text": "a text file", "wrong_object": "[ema] is of type OrderedDict, not a network",
             "not_a_dict": "a pickle of type list"}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_file_that_is_not_an_edm_pickle_is_named_in_one_line(tmp_path, persistence, kind):
    net = build_network(C.load_config(None, TINY)).eval()
    nvidia_pickle(tmp_path / "good.pkl", net, persistence)
    pkl, out = tmp_path / "edm-cifar10-32x32-cond-vp.pkl", tmp_path / "edm.safetensors"
    _bad_file(kind, pkl, (tmp_path / "good.pkl").read_bytes())
    result = convert("--pkl", pkl, "--out", out)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {pkl}"), result.output  # one line, the file first
    assert BAD_FILES[kind] in lines[0] and "expected an NVIDIA EDM network pickle" in lines[0], lines[0]
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # nothing written
    assert not any(s.exists() for s in persistence.sentinels)


def test_an_existing_out_is_kept_unless_overwrite(tmp_path, persistence):
    net = build_network(C.load_config(None, TINY)).eval()
    pkl, out = tmp_path / "edm.pkl", tmp_path / "edm.safetensors"
    nvidia_pickle(pkl, net, persistence)
    out.write_bytes(b"an earlier conversion")
    result = convert("--pkl", pkl, "--out", out)
    assert result.exit_code == 1 and "--overwrite" in result.output and str(out) in result.output, result.output
    assert out.read_bytes() == b"an earlier conversion"
    assert convert("--pkl", pkl, "--out", out, "--overwrite").exit_code == 0
    assert load_network(out)[2]["kind"] == "ddpm"
