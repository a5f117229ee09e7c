"""The entry scripts as a user runs them: train, resume, torchrun, sample, save_dataset, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY, run_script, torchrun


def only_run(outdir):
    runs = [p for p in outdir.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def test_help_explains_every_option():
    """Every option of every entry point carries a help text, and --help prints it; --list-keys prints
    every config key with its default and meaning."""
    import click

    import evaluate
    import sample
    import save_dataset
    import train

    commands = {"train.py": train.main, "sample.py": sample.main, "save_dataset.py": save_dataset.main,
                **{f"evaluate.py {name}": cmd for name, cmd in evaluate.main.commands.items()}}
    for name, cmd in commands.items():
        text = run_script(*name.split(), "--help").stdout
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help and len(param.help) > 10, f"{name} {param.opts[0]} has no help"
                assert param.opts[-1] in text, f"{name} --help does not list {param.opts[-1]}"
    from sfd_ddpm import config as C
    keys = run_script("train.py", "--list-keys").stdout
    for line in C.describe():
        key, meaning = line.split(" = ")[0], line.split("\n", 1)[1].strip()
        assert f"{key} = " in keys and meaning[:60] in keys, key
    assert len(C.describe()) == keys.count("\n    ")


def test_dry_run_prints_the_resolved_config():
    """defaults <- YAML file <- command line: keys the file leaves out take the schema defaults, the file
    overrides defaults, the command line overrides the file."""
    import yaml

    from sfd_ddpm import config as C
    raw = yaml.safe_load(open("configs/cifar10_sfd.yaml"))
    cfg = json.loads(run_script("train.py", "--config", "configs/cifar10_sfd.yaml", "--dry-run", "sfd.forget=[0,3]",
                                "training.n_iters=77").stdout)
    defaults = C.defaults()
    assert raw["sfd"]["forget"] == [0] and cfg["sfd"]["forget"] == [0, 3]                      # command line wins
    assert raw["training"]["n_iters"] == 50000 and cfg["training"]["n_iters"] == 77
    assert defaults["method"] == "pretrain" and cfg["method"] == raw["method"] == "sfd"          # the file wins
    assert "forget_warmup" not in raw["sfd"] and cfg["sfd"]["forget_warmup"] == defaults["sfd"]["forget_warmup"]
    assert "model" not in raw and cfg["model"] == defaults["model"]                               # defaults fill in
    assert "grid" not in raw and cfg["grid"] == defaults["grid"]
    for section, values in raw.items():  # every other value of the file is there unchanged
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)]):
            got = cfg[section] if key is None else cfg[section][key]
            if (section, key) not in (("sfd", "forget"), ("training", "n_iters")):
                assert got == value, (section, key)


def test_pretrain_run_writes_its_artefacts(tiny_teacher):
    run = tiny_teacher.parent
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "log.jsonl", "training-state-0000004.pt", "network-0000004.safetensors",
            "grid-0000004.png"} <= names
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["images_per_s"] > 0 and "loss" in r for r in records)
    assert records[-1]["images_seen"] == 32
    assert set(load_file(str(tiny_teacher))) and json.loads((run / "config.json").read_text())["method"] == "pretrain"


@pytest.mark.parametrize("method_args", [
    ["--config", "configs/builtin_train.yaml"],
    ["--config", "configs/builtin_sfd.yaml"],
])
def test_resume_is_exact(tmp_path, tiny_teacher, method_args):
    """N iterations straight == N/2, then --resume for the other N/2: identical weights."""
    extra = [*TINY, f"sfd.init={tiny_teacher}", "training.snapshot_every=100"]
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    run_script("train.py", *method_args, "--outdir", straight, *extra, "training.n_iters=4")
    run_script("train.py", *method_args, "--outdir", halves, *extra, "training.n_iters=2")
    run_h = only_run(halves)
    run_script("train.py", "--resume", run_h, "training.n_iters=4")
    a = load_file(str(only_run(straight) / "network-0000004.safetensors"))
    b = load_file(str(run_h / "network-0000004.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(line)["step"] for line in (run_h / "log.jsonl").read_text().splitlines()]
    assert log == [1, 2, 3, 4]


def test_sfd_run_outputs_and_one_step_sampling(tmp_path, tiny_teacher):
    out = tmp_path / "sfd"
    run_script("train.py", "--config", "configs/builtin_sfd.yaml", "--outdir", out, *TINY,
               f"sfd.init={tiny_teacher}", "training.n_iters=4", "training.early_snapshots=2")
    run = only_run(out)
    weights = load_file(str(run / "network-0000004.safetensors"))
    assert {k.split(".")[0] for k in weights} == {"generator_ema", "generator", "fake_score"}
    assert (run / "network-0000001.safetensors").exists()  # early log-spaced snapshot
    assert (run / "grid_ema-0000004.png").exists() and (run / "grid-0000004.png").exists()
    record = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    assert {"phi_remain", "phi_forget", "theta_remain", "theta_forget", "images_seen", "images_per_s"} <= set(record)
    samples = tmp_path / "samples"
    run_script("sample.py", "--ckpt", run, "--out", samples, "--classes", "0,1", "--per-class", "3", "--sampler", "one_step")
    names = sorted(p.name for p in samples.glob("*.png"))
    assert names == [f"{c:03d}_{i:05d}.png" for c in (0, 1) for i in range(3)]
    settings = json.loads((samples / "settings.json").read_text())
    assert settings["sampler"] == "one_step" and settings["t_init"] == 440 and settings["nfe_per_image"] == 1


def test_torchrun_two_processes(tmp_path, tiny_teacher):
    out = tmp_path / "runs"
    torchrun("train.py", "--config", "configs/builtin_train.yaml", "--outdir", out, *TINY, "training.n_iters=2",
             "--device", "cpu")
    run = only_run(out)  # rank 0 alone created a run directory
    assert (run / "network-0000002.safetensors").exists()
    # every rank draws its own timesteps and noise, with half of the global batch
    for method, extra in (("pretrain", []), ("sfd", [f"sfd.init={tiny_teacher}"])):
        probe = tmp_path / f"{method}.json"
        torchrun("tests/dist_probe.py", probe, method, *TINY, "training.n_iters=1", *extra)
        ranks = json.loads(probe.read_text())
        assert [r["batch"] for r in ranks] == [4, 4]
        assert ranks[0]["t"] != ranks[1]["t"]
        n_draws = {"pretrain": 1, "sfd": 8}[method]  # SFD: z and eps for 4 terms
        assert len(ranks[0]["noise"]) == len(ranks[1]["noise"]) == n_draws, method
        for a, b in zip(ranks[0]["noise"], ranks[1]["noise"]):
            assert len(a) > 0 and a != b, method  # each rank draws its own noise, every time


def test_save_dataset_writes_named_pngs(tmp_path):
    out = tmp_path / "ref"
    run_script("save_dataset.py", "--dataset", "builtin", "--out", out, "--exclude-class", "0", "--per-class", "2")
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{c:03d}_{i:05d}.png" for c in range(1, 10) for i in range(2)]


@pytest.mark.parametrize("args,message", [
    (["train.py", "--config", "configs/builtin_train.yaml", "data.dataset=imagenet", "training.n_iters=1"], "unknown dataset"),
    (["train.py", "--config", "configs/builtin_train.yaml", "training.bogus=1"], "unknown config key"),
    (["train.py", "--config", "configs/missing.yaml"], "not found"),
    (["train.py", "--config", "configs/builtin_sfd.yaml", "sfd.init=nowhere.safetensors"], "not found"),
    (["train.py", "--config", "configs/builtin_sfd.yaml"], "set sfd.init"),
    (["sample.py", "--ckpt", "CORRUPT", "--out", "OUT"], "not a readable safetensors"),
])
def test_bad_input_fails_loudly(tmp_path, args, message):
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a checkpoint at all")
    args = [str(corrupt) if a == "CORRUPT" else str(tmp_path / "o") if a == "OUT" else a for a in args]
    proc = run_script(*args, "--outdir", tmp_path / "runs", check=False) if args[0] == "train.py" else \
        run_script(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_labels_and_architecture_mismatch(tmp_path, tiny_teacher):
    proc = run_script("sample.py", "--ckpt", tiny_teacher, "--out", tmp_path / "o", "--classes", "12", check=False)
    assert proc.returncode != 0 and "out of range" in proc.stderr
    proc = run_script("train.py", "--config", "configs/builtin_sfd.yaml", "--outdir", tmp_path / "r", *TINY,
                      f"sfd.init={tiny_teacher}", "sfd.forget=[12]", check=False)
    assert proc.returncode != 0 and "out of range" in proc.stderr
    from sfd_ddpm.checkpoints import CheckpointError, load_into, load_weights
    from sfd_ddpm.networks import ClassConditionalUNet
    nets, _ = load_weights(tiny_teacher)
    wider = ClassConditionalUNet(16, 3, 10, 16, [1, 2], 1, [8], 0.0)
    with pytest.raises(CheckpointError, match="different architecture"):
        load_into(wider, nets["ema"], str(tiny_teacher))


def test_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tiny_teacher):
    out = tmp_path / "nan"
    proc = run_script("train.py", "--config", "configs/builtin_sfd.yaml", "--outdir", out, *TINY,
                      f"sfd.init={tiny_teacher}", "training.n_iters=6", "training.state_every=1",
                      "sfd.lr_theta=1e38", "sfd.grad_clip_value=0", check=False)
    assert proc.returncode != 0 and "non-finite" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    run = only_run(out)
    from sfd_ddpm.checkpoints import non_finite_tensor
    states = sorted(run.glob("training-state-*.pt"))
    assert all(non_finite_tensor(torch.load(p, weights_only=True)["method"]) is None for p in states)  # no NaN saved
    named = f"finite weights is {states[-1]}" if states else f"no training state in {run} holds finite weights"
    assert named in proc.stderr, proc.stderr  # the newest finite state, or that there is none
