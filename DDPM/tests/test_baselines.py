"""Baselines of docs/method.md section 5 (retrain, Selective Amnesia, SalUn, ESD): each method's defining
computation, a short run of each through train.py, and the paper-table scripts end to end."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import TINY, TREE, run_script
from sfd_ddpm.checkpoints import CheckpointError
from sfd_ddpm.config import load_config
from sfd_ddpm.diffusion import Denoiser, VPSchedule
from sfd_ddpm.distributed import Dist
from sfd_ddpm.loading import load_network
from sfd_ddpm.methods import get_method
from sfd_ddpm.methods.esd import esd_target, partial_ddim
from sfd_ddpm.methods.sa import fisher_penalty, load_fisher
from sfd_ddpm.methods.salun import saliency_mask


# -- defining computations ------------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.5, 0.3, 1.0])
def test_salun_mask_keeps_exactly_the_fraction_with_the_largest_gradients(fraction):
    g = torch.Generator().manual_seed(0)
    grads = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(13, generator=g), "c": torch.randn(2, 3, 4, generator=g)}
    mask = saliency_mask(grads, fraction)
    total = sum(v.numel() for v in grads.values())
    kept = sum(int(m.sum()) for m in mask.values())
    assert kept == round(fraction * total)
    assert all(m.shape == grads[n].shape and set(m.unique().tolist()) <= {0.0, 1.0} for n, m in mask.items())
    if fraction < 1:
        kept_abs = torch.cat([grads[n].abs()[mask[n] == 1] for n in grads])
        dropped_abs = torch.cat([grads[n].abs()[mask[n] == 0] for n in grads])
        assert kept_abs.min() >= dropped_abs.max()
    with pytest.raises(ValueError):
        saliency_mask(grads, 0.0)


def test_esd_target_is_negative_guidance_from_the_null_prediction():
    e_null, e_f = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])
    assert torch.equal(esd_target(e_null, e_f, 0.0), e_null)
    assert torch.allclose(esd_target(e_null, e_f, 1.0), torch.tensor([-1.0, -4.5]))   # 2 e_null - e_f
    assert torch.allclose(esd_target(e_null, e_f, 7.5), e_null - 7.5 * (e_f - e_null))


class _Zero(nn.Module):
    """eps = 0 everywhere: DDIM then rescales x0 = x / a_t exactly, a checkable trajectory."""
    null_label = 10

    def forward(self, x, t, label):
        return torch.zeros_like(x)


def test_esd_partial_sampling_returns_the_timestep_it_stopped_at():
    sched = VPSchedule(num_timesteps=1000)
    den = Denoiser(_Zero(), sched, 10)
    x = torch.randn(3, 1, 2, 2)
    labels = torch.zeros(3, dtype=torch.long)
    seq = list(range(0, 1000, 100))
    out, t = partial_ddim(den, labels, x, steps=10, stop=9)
    assert t == seq[9] and torch.equal(out, x)              # the top of the grid: still the noise
    out, t = partial_ddim(den, labels, x, steps=10, stop=3)
    assert t == seq[3]
    # eps = 0: x_{t'} = sqrt(abar_t') * x / sqrt(abar_T-top), consistent with the returned t
    ratio = (sched.abar[seq[3]] / sched.abar[seq[9]]).sqrt().item()
    assert torch.allclose(out, x * ratio, atol=1e-5)
    with pytest.raises(ValueError):
        partial_ddim(den, labels, x, steps=10, stop=10)


def test_sa_fisher_penalty_by_hand_and_fisher_file_checks(tmp_path):
    net, ref = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([[1.0, 2.0]]))
        ref.bias.fill_(0.5)
        net.weight.copy_(torch.tensor([[1.5, 1.0]]))
        net.bias.fill_(0.0)
    fisher = {"weight": torch.tensor([[2.0, 3.0]]), "bias": torch.tensor([4.0])}
    # 2 * 0.5^2 + 3 * 1^2 + 4 * 0.5^2 = 0.5 + 3 + 1
    assert fisher_penalty(net, ref, fisher).item() == pytest.approx(4.5)
    good = tmp_path / "f.safetensors"
    save_file(fisher, str(good))
    assert set(load_fisher(good, net, "cpu")) == {"weight", "bias"}
    bad = tmp_path / "bad.safetensors"
    save_file({"weight": torch.ones(1, 3), "bias": torch.ones(1)}, str(bad))
    with pytest.raises(CheckpointError, match="shape"):
        load_fisher(bad, net, "cpu")
    with pytest.raises(ValueError, match="sa_fisher"):
        load_fisher(None, net, "cpu")


def test_sa_loss_terms(tiny_teacher, tmp_path):
    """Each term is what the spec says: noise images at c_f, replay of the remaining classes only, and
    a penalty that is 0 at theta* and equals sum F d^2 after a known perturbation."""
    net, _, _ = load_network(tiny_teacher)
    fisher = {n: torch.full_like(p, 2.0) for n, p in net.named_parameters()}
    path = tmp_path / "fisher.safetensors"
    save_file(fisher, str(path))
    cfg = load_config(TREE / "configs/builtin_sa.yaml", [*TINY, f"baseline.init={tiny_teacher}",
                                                         f"baseline.sa_fisher={path}", "baseline.sa_replay_per_class=2",
                                                         "baseline.sa_replay_steps=2"])
    torch.manual_seed(0)
    sa = get_method("sa")(cfg, Dist())
    sa.start(0)
    assert sorted(set(sa.replay_y.tolist())) == list(range(1, 10)) and len(sa.replay_y) == 18
    terms = sa.losses()
    assert terms["fisher"].item() == 0.0 and terms["forget"].item() > 0 and terms["replay"].item() > 0
    with torch.no_grad():
        for p in sa.net.parameters():
            p.add_(0.01)
    n_params = sum(p.numel() for p in sa.net.parameters())
    assert sa.losses()["fisher"].item() == pytest.approx(2.0 * 0.01 ** 2 * n_params, rel=1e-3)


def test_retrain_never_sees_a_forget_image(monkeypatch):
    cfg = load_config(TREE / "configs/builtin_retrain.yaml", [*TINY, "baseline.forget=[0,3]"])
    seen = []
    import sfd_ddpm.methods.pretrain as pretrain

    real = pretrain.infinite_loader

    def spy(*args, **kwargs):
        for x, y in real(*args, **kwargs):
            seen.extend(y.tolist())
            yield x, y
    monkeypatch.setattr(pretrain, "infinite_loader", spy)
    method = get_method("retrain")(cfg, Dist())
    method.start(0)
    for step in range(30):   # 240 images: more than the 8 remaining classes x 40 (every epoch covered)
        method.train_step(step)
    assert len(seen) == 240 and set(seen) == {1, 2, 4, 5, 6, 7, 8, 9}


def test_salun_moves_only_masked_weights(tiny_teacher):
    cfg = load_config(TREE / "configs/builtin_salun.yaml", [*TINY, f"baseline.init={tiny_teacher}",
                                                            "baseline.salun_mask_batches=2", "baseline.salun_fraction=0.3"])
    torch.manual_seed(0)
    m = get_method("salun")(cfg, Dist())
    before = {n: p.detach().clone() for n, p in m.net.named_parameters()}
    m.start(0)
    kept = sum(int(v.sum()) for v in m.mask.values())
    assert kept == round(0.3 * sum(p.numel() for p in before.values()))
    for step in range(3):
        m.train_step(step)
    moved_outside = sum(int(((p - before[n]) != 0)[m.mask[n] == 0].sum()) for n, p in m.net.named_parameters())
    moved_inside = sum(int(((p - before[n]) != 0)[m.mask[n] == 1].sum()) for n, p in m.net.named_parameters())
    assert moved_outside == 0 and moved_inside > 0


def test_baselines_refuse_bad_input(tiny_teacher):
    for method, extra in (("sa", []), ("esd", ["baseline.init=null"]), ("salun", ["baseline.forget=[12]"])):
        overrides = [*TINY, f"baseline.init={tiny_teacher}", *extra]
        cfg = load_config(TREE / f"configs/builtin_{method}.yaml", overrides)
        with pytest.raises(ValueError):
            get_method(method)(cfg, Dist())


# -- short runs through train.py -----------------------------------------------------------------
def _run(tmp_path, config, *overrides):
    out = tmp_path / "runs"
    run_script("train.py", "--config", f"configs/{config}", "--outdir", out, *TINY, "training.n_iters=4", *overrides)
    (run,) = out.iterdir()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    net, cfg, meta = load_network(run / "network-0000004.safetensors")
    assert meta["kind"] == "ddpm" and (run / "grid-0000004.png").exists()
    return run, log


def test_run_retrain(tmp_path):
    _run(tmp_path, "builtin_retrain.yaml")


def test_fisher_command_and_sa_run(tmp_path, tiny_teacher):
    fisher = tmp_path / "fisher.safetensors"
    run_script("fisher.py", "--ckpt", tiny_teacher, "--out", fisher, "--samples", 3, "--timesteps-stride", 250,
               "--steps", 2)
    net, _, _ = load_network(tiny_teacher)
    f = load_fisher(fisher, net, "cpu")
    assert all(v.min() >= 0 for v in f.values()) and sum(float(v.sum()) for v in f.values()) > 0
    _, log = _run(tmp_path, "builtin_sa.yaml", f"baseline.init={tiny_teacher}", f"baseline.sa_fisher={fisher}",
                  "baseline.sa_replay_per_class=2", "baseline.sa_replay_steps=2")
    assert {"forget", "replay", "fisher"} <= set(log[-1]) and log[0]["fisher"] == 0.0 and log[-1]["fisher"] > 0
    bad = run_script("fisher.py", "--ckpt", tmp_path / "missing.safetensors", "--out", fisher, check=False)
    assert bad.returncode != 0


def test_run_salun(tmp_path, tiny_teacher):
    _, log = _run(tmp_path, "builtin_salun.yaml", f"baseline.init={tiny_teacher}", "baseline.salun_mask_batches=1")
    assert {"forget", "remain"} <= set(log[-1])


def test_salun_reads_real_images_at_the_teachers_size(tiny_teacher):
    """builtin_salun.yaml names no image size (schema default 32 px); the 16-px teacher's size must win, or
    SalUn fine-tunes a 16-px model on 32-px images (a fully convolutional UNet accepts them silently)."""
    from sfd_ddpm import config as C, distributed
    from sfd_ddpm.methods import get_method
    cfg = C.load_config("configs/builtin_salun.yaml", [f"baseline.init={tiny_teacher}", "data.builtin_per_class=20"])
    assert cfg["data"]["image_size"] == 32
    salun = get_method("salun")(cfg, distributed.init("cpu"))
    assert salun.remain_data[0][0].shape == salun.forget_data[0][0].shape == (3, 16, 16)


def test_run_esd(tmp_path, tiny_teacher):
    """At the first iteration theta is the frozen model, so eps_theta(c_f) - target = (1 + eta)(eps_0(c_f) -
    eps_0(null)) on the same draws: the first logged loss scales exactly as (1 + eta)^2 with baseline.esd_eta."""
    first = {}
    for eta in (0.0, 2.0):
        _, log = _run(tmp_path / str(eta), "builtin_esd.yaml", f"baseline.init={tiny_teacher}", "baseline.esd_steps=4",
                      f"baseline.esd_eta={eta}")
        first[eta] = log[0]["loss"]
    assert first[2.0] / first[0.0] == pytest.approx(9.0, rel=1e-4)



def table_cells(table: str) -> dict[str, list[str]]:
    """{model name: its cells} of the markdown table written by scripts/aggregate.py."""
    return {cells[1].strip(): [c.strip() for c in cells[2:-1]] for line in table.splitlines()
            if line.startswith("| ") and (cells := line.split("|"))}


def assert_table_matches_results(out, table: str) -> None:
    """Each row's UA, remaining accuracy and FID cells are the numbers in that row's own JSON files."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("aggregate", TREE / "scripts" / "aggregate.py")
    agg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(agg)
    cells = table_cells(table)
    for key, name in agg.row_list(out):
        if not (out / key / "ua.json").exists():
            continue
        ua = json.loads((out / key / "ua.json").read_text())["results"]
        fid = json.loads((out / key / "fid.json").read_text())["results"]
        fid_value = fid.get("classifier_fid", fid.get("fid"))
        assert cells[name][1:4] == [f"{ua['ua']:.3f}", f"{ua['remaining_accuracy']:.3f}", f"{fid_value:.3f}"], name


def test_aggregate_puts_each_rows_numbers_in_its_row(tmp_path):
    for k, key in enumerate(("sfd", "esd", "esd_guided", "sfd_2stage_authors")):
        (tmp_path / key).mkdir()
        (tmp_path / key / "ua.json").write_text(json.dumps({"results": {"ua": 0.1 + k / 3,
                                                                        "remaining_accuracy": 0.9 - k / 7}}))
        (tmp_path / key / "fid.json").write_text(json.dumps({"results": {"classifier_fid": 3.25 + 10 * k,
                                                                         "classifier_precision": 0.5}}))
    # how each row sampled (sample.py's settings.json); the SFD generators' checkpoints say their distillation w
    import torch
    from sfd_ddpm.checkpoints import save_weights
    for key, w in (("sfd", 0.0), ("sfd_2stage_authors", 2.0)):
        ckpt = tmp_path / key / "network.safetensors"
        save_weights(ckpt, {"generator_ema": {"w": torch.zeros(1)}}, {"sfd": {"guidance": w}}, 1, "sfd")
        (tmp_path / key / "samples").mkdir()
        (tmp_path / key / "samples" / "settings.json").write_text(json.dumps(
            {"checkpoint": str(ckpt), "sampler": "one_step", "steps": None, "guidance": 0.0, "nfe_per_image": 1}))
    (tmp_path / "esd_guided" / "samples").mkdir()
    (tmp_path / "esd_guided" / "samples" / "settings.json").write_text(json.dumps(
        {"checkpoint": "gone.safetensors", "sampler": "ddim", "steps": 25, "guidance": 2.0, "nfe_per_image": 50}))
    run_script("scripts/aggregate.py", "--out", tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert_table_matches_results(tmp_path, table)
    cells = table_cells(table)
    assert cells["ESD, guided"][0] == "DDIM-25, w=2, 50 NFE" and cells["ESD"][0] == "-"
    assert cells["SFD one-step"][0] == "one-step, distilled at w=0, 1 NFE"
    # each generator is pointed at the teacher row it was distilled towards
    assert "SFD one-step distils the pretrained model at w = 0: compare it with row pretrained (not run)." in table
    assert ("SFD two-stage, authors' setting (teacher = stage-1 fake score) distils the pretrained model at w = 2: "
            "compare it with row pretrained_guided (not run).") in table
    cells = table_cells(table)
    assert cells["Retrain"][1] == "not run" and cells["Retrain"][-3] == "7.94"  # the authors' reference FID
    # the authors sampled ESD guided (w = 2): their number sits beside our guided ESD row, not the unguided one
    assert cells["SFD one-step"][-3] == "5.32" and cells["ESD, guided"][-3] == "12.68" and cells["ESD"][-3] == "-"
    assert "Retrain, guided" not in cells  # a guided twin appears only when it ran
    assert "SFD two-stage, authors' setting (teacher = stage-1 fake score)" in cells
    assert "SFD two-stage, our default (teacher = pretrained model)" not in cells


# -- the paper-table scripts, end to end on the built-in dataset with a tiny budget -----------------
@pytest.mark.slow
def test_paper_table_scripts_run_end_to_end(tmp_path):
    import sys
    out = tmp_path / "paper"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "DATASET": "builtin", "OUT": str(out),
           "TEACHER_ARGS": " ".join([*TINY, "training.n_iters=4"]),
           "METHOD_ARGS": " ".join([*TINY, "training.n_iters=2", "training.snapshot_every=2"]),
           "FISHER_ARGS": "--samples 3 --timesteps-stride 250 --steps 2",
           "CLASSIFIER_ARGS": "--epochs 1 --builtin-per-class 60", "PER_CLASS": "3", "REF_PER_CLASS": "8",
           "DDPM_SAMPLER": "ddim", "DDPM_STEPS": "2", "FID_FEATURES": "classifier",
           "ATTACK_ARGS": "--budgets 0,2 --n 3 --steps 2"}
    guided = ("pretrained", "esd")  # the others sample only their unguided row here, to save time

    def launch(row):
        return subprocess.Popen(["bash", f"scripts/{row}.sh"], cwd=TREE, text=True,
                                env={**env, "GUIDED": "1" if row in guided else "0"},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    # the first row makes the teacher, classifier and FID reference; the others reuse them, side by side
    first = launch("pretrained")
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, f"scripts/pretrained.sh failed:\n{output[-4000:]}"
    procs = {row: launch(row) for row in ("sfd", "retrain", "sa", "salun", "esd", "sfd_2stage")}
    for row, proc in procs.items():
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, f"scripts/{row}.sh failed:\n{output[-4000:]}"
    # run twice: the second time every stage is reused (no command runs, no file changes)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = {row: launch(row) for row in ("pretrained", *procs)}
    for row, proc in again.items():
        output = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0 and "\n+ " not in output and "reuse" in output, f"{row}:\n{output[-4000:]}"
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    # one protocol: every multi-step model unguided and guided, every one-step generator once
    for row in ("pretrained", "retrain", "sa", "salun", "esd"):
        assert (out / f"{row}_guided").exists() == (row in guided), row
        for variant, w in ((row, 0.0), (f"{row}_guided", 2.0))[:2 if row in guided else 1]:
            assert (out / variant / "ua.json").exists() and (out / variant / "fid.json").exists(), variant
            settings = json.loads((out / variant / "samples" / "settings.json").read_text())
            assert settings["guidance"] == w and settings["sampler"] == "ddim", (variant, settings)
            attack = json.loads((out / variant / "attack.json").read_text())["settings"]["sampling"]
            assert attack["guidance"] == w, (variant, attack)  # attacked the way the row samples
    for row in ("sfd", "sid", "sfd_2stage_authors", "sfd_2stage"):
        assert json.loads((out / row / "samples" / "settings.json").read_text())["sampler"] == "one_step", row
    # the two two-stage rows differ only in the teacher of stage 2 (the authors' bug vs the pretrained model)
    stage2 = {row: json.loads(next((out / row / "train").glob("*/config.json")).read_text())["sfd"]
              for row in ("sfd_2stage_authors", "sfd_2stage")}
    assert stage2["sfd_2stage_authors"]["stage2_teacher"] == "stage1_fake_score"
    assert stage2["sfd_2stage"]["stage2_teacher"] == "original"
    assert stage2["sfd_2stage"]["init_stage1"] == stage2["sfd_2stage_authors"]["init_stage1"]
    agg = subprocess.run([sys.executable, "scripts/aggregate.py", "--out", out], cwd=TREE, text=True,
                         capture_output=True)
    assert agg.returncode == 0, agg.stderr
    table = (out / "table.md").read_text()
    assert "not run" not in table and table.count("\n| ") == 1 + 5 + 2 + 1 + 3  # header, 5 multi-step, 2 guided twins, SFD, 3 two-stage
    assert_table_matches_results(out, table)
    assert "noise attack @2 | embedding attack @2 |" in table  # every row ran evaluate.py attack
    rows = json.loads((out / "table.json").read_text())
    assert all(0 <= r["noise_attack"] <= 1 and 0 <= r["embedding_attack"] <= 1 for r in rows), rows
    plain = subprocess.run([sys.executable, "scripts/aggregate.py", "--out", out, "--no-attacks"], cwd=TREE, text=True,
                           capture_output=True)
    assert plain.returncode == 0 and "attack" not in (out / "table.md").read_text()
    # the header of every script explains the real-scale settings
    for row in ("sfd", "retrain", "sa", "salun", "esd"):
        assert "Real scale" in (TREE / "scripts" / f"{row}.sh").read_text()
    bad = subprocess.run([sys.executable, "scripts/aggregate.py", "--out", tmp_path], cwd=TREE, text=True,
                         capture_output=True)
    assert bad.returncode != 0 and "no evaluated rows" in bad.stderr
