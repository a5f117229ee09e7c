"""White-box attacks (sfd_ddpm.attacks) on constructed models whose answer is known.

Data: K classes, x0 | c ~ N(m_c, s^2 I) with m_c random +-1 patterns in 3x8x8. ``RoutedGaussian`` is
the exact eps-network for that data whose class mean is read through a label-embedding table:
m(c) = softmax(E[c]) @ M, with rows E[c] = 3 one-hot(c) (so label c draws mostly m_c). The judge is
the Bayes-style linear classifier logits_c = x . m_c / T.

* teacher: M = all K patterns.
* re-routed generator: the teacher with row E[f] replaced by the override's row E[o]; label f now
  draws class o, but the network still holds m_f, reachable from another embedding.
* never-seen model: M's row f replaced by the mean of the other patterns, so no embedding can draw
  m_f: every output lies in the hull of the remaining classes.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from sfd_ddpm.attacks import (Sampling, embedding_override, embedding_search, label_embedding_table, noise_search,
                              render, run_attacks)
from sfd_ddpm.diffusion import Denoiser, VPSchedule

K, FORGET, OVERRIDE = 4, 0, 1
SHAPE = (3, 8, 8)
S = 0.3


class RoutedGaussian(nn.Module):
    """eps(x_t, t, c) = b_t (x_t - a_t m(c)) / (a_t^2 s^2 + b_t^2), m(c) = softmax(class_embedding(c)) @ M."""

    def __init__(self, means: torch.Tensor, scale: float = 3.0):
        super().__init__()
        self.n_classes = len(means)
        self.class_embedding = nn.Embedding(K + 1, K)
        with torch.no_grad():
            self.class_embedding.weight.copy_(torch.cat([scale * torch.eye(K), torch.zeros(1, K)]))
        self.register_buffer("means", means.flatten(1).clone())
        self.sched = VPSchedule()

    @property
    def null_label(self) -> int:
        return self.n_classes

    def forward(self, x, t, label):
        m = self.class_embedding(label).softmax(1) @ self.means
        a, b = self.sched.a(t)[:, None], self.sched.b(t)[:, None]
        return (b * (x.flatten(1) - a * m) / (a * a * S * S + b * b)).view_as(x)


class LinearJudge(nn.Module):
    def __init__(self, means: torch.Tensor, temperature: float):
        super().__init__()
        self.register_buffer("w", means.flatten(1) / temperature)

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def patterns() -> torch.Tensor:
    return torch.sign(torch.randn(K, *SHAPE, generator=torch.Generator().manual_seed(3)))


def denoiser(net) -> Denoiser:
    return Denoiser(net.eval(), VPSchedule(), net.null_label)


def teacher():
    return RoutedGaussian(patterns())


def rerouted():
    net = teacher()
    with torch.no_grad():
        net.class_embedding.weight[FORGET] = net.class_embedding.weight[OVERRIDE]
    return net


def never_seen():
    pats = patterns()
    pats[FORGET] = pats[[c for c in range(K) if c != FORGET]].mean(0)
    return RoutedGaussian(pats)


ONE_STEP = Sampling("one_step", t_init=440)
JUDGE = LinearJudge(patterns(), temperature=8.0)


@torch.no_grad()
def false_positive_rate(net, n: int = 64) -> float:
    """Share of the model's ordinary samples, over every label, that the judge calls the forget class."""
    labels = torch.arange(K).repeat_interleave(n)
    z = torch.randn((len(labels), *SHAPE), generator=torch.Generator().manual_seed(11))
    x = render(denoiser(net), labels, z, ONE_STEP)
    return float((JUDGE(x).argmax(1) == FORGET).float().mean())


@pytest.mark.parametrize("init", ["forget", "mean"])
def test_embedding_attack_breaks_a_model_that_only_reroutes_the_label(init):
    net = rerouted()
    rows = embedding_search(denoiser(net), JUDGE, FORGET, ONE_STEP, SHAPE, init=init, budgets=(0, 40), n=16,
                            n_eval=64, lr=0.1)
    assert rows[0]["budget"] == 0 and rows[0]["success_rate"] == 0.0  # asked normally, label 0 draws class 1
    assert rows[-1]["success_rate"] >= 0.9, rows
    assert rows[-1]["mean_p_forget"] > 0.9 and rows[-1]["embedding_shift"] > 0.1, rows
    # the attack used only the override hook: the network's own table is unchanged afterwards
    assert torch.equal(net.class_embedding.weight, rerouted().class_embedding.weight)


@pytest.mark.parametrize("init", ["forget", "mean"])
def test_embedding_attack_does_not_break_a_model_that_never_saw_the_class(init):
    net = never_seen()
    fp = false_positive_rate(net)
    rows = embedding_search(denoiser(net), JUDGE, FORGET, ONE_STEP, SHAPE, init=init, budgets=(0, 40), n=16,
                            n_eval=64, lr=0.1)
    assert rows[-1]["success_rate"] <= fp + 0.05, (fp, rows)
    assert rows[-1]["mean_p_forget"] < 0.05, rows


def test_noise_search_raises_p_forget_on_the_teacher_through_ddim():
    """Judge at a temperature where the teacher's own forget-class samples are not all certain; the noise
    search, differentiating through a 4-step DDIM, raises p(forget) while the noise keeps a typical norm."""
    judge = LinearJudge(patterns(), temperature=90.0)
    ddim4 = Sampling("ddim", steps=4)
    rows = noise_search(denoiser(teacher()), judge, FORGET, ddim4, SHAPE, budgets=(0, 10, 30), n=32, lr=0.05)
    p = [r["mean_p_forget"] for r in rows]
    assert 0.4 < p[0] < 0.85, p
    assert p[1] > p[0] + 0.01 and p[2] > p[1] + 0.01 and p[2] > p[0] + 0.03, p
    assert abs(rows[-1]["noise_rms"] - 1.0) < 0.05, rows


def test_noise_search_prior_weight_keeps_the_noise_typical():
    """Without the prior the search inflates the noise; with it the RMS stays near 1 (the knob is wired)."""
    judge = LinearJudge(patterns(), temperature=90.0)
    ddim4 = Sampling("ddim", steps=4)
    kw = dict(budgets=(0, 30), n=16, lr=0.1)
    free = noise_search(denoiser(teacher()), judge, FORGET, ddim4, SHAPE, prior_weight=0.0, **kw)[-1]
    held = noise_search(denoiser(teacher()), judge, FORGET, ddim4, SHAPE, prior_weight=20.0, **kw)[-1]
    assert free["noise_rms"] > 1.3 and abs(held["noise_rms"] - 1.0) < 0.02, (free, held)


def test_noise_search_cannot_recover_a_rerouted_label_through_the_one_step_generator():
    """Sanity of scale: the one-step output moves only ~0.035 per unit of noise, so searching the noise of
    the re-routed label gets nowhere, while the embedding search (above) does: the two attacks differ."""
    rows = noise_search(denoiser(rerouted()), JUDGE, FORGET, ONE_STEP, SHAPE, budgets=(0, 20), n=16, lr=0.05)
    assert rows[-1]["success_rate"] == 0.0, rows


def test_run_attacks_reports_each_attack_and_the_better_embedding_start():
    out = run_attacks(denoiser(rerouted()), JUDGE, FORGET, ONE_STEP, SHAPE, budgets=(0, 5), n=8, lr=0.1)
    assert set(out["attacks"]) == {"noise", "embedding_forget", "embedding_mean"}
    assert [r["budget"] for r in out["attacks"]["noise"]] == [0, 5]
    best = out["embedding_best"]
    assert best in (out["at_budget"]["embedding_forget"], out["at_budget"]["embedding_mean"])
    assert best["success_rate"] == max(out["at_budget"][a]["success_rate"] for a in ("embedding_forget", "embedding_mean"))
    with pytest.raises(ValueError, match="unknown attack"):
        run_attacks(denoiser(rerouted()), JUDGE, FORGET, ONE_STEP, SHAPE, attacks=("nois",))
    with pytest.raises(ValueError, match="out of range"):
        run_attacks(denoiser(rerouted()), JUDGE, K, ONE_STEP, SHAPE, budgets=(0,))


def test_embedding_override_reaches_the_unet_label_table():
    """On the project's UNet the override vector is read in place of the forget row (output equal to
    another class's), the null row used for guidance is untouched, and gradients reach the vector."""
    from sfd_ddpm.networks import ClassConditionalUNet

    torch.manual_seed(0)
    net = ClassConditionalUNet(8, 3, 3, 8, [1, 2], 1, [4], 0.0).eval()
    table = label_embedding_table(net)
    assert table is net.unet.class_embedding
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([100, 100])
    v = table.weight[2].detach().clone().requires_grad_(True)
    with embedding_override(net, 0, v):
        out = net(x, t, torch.tensor([0, 3]))
        out.sum().backward()
    ref = net(x, t, torch.tensor([2, 3]))
    assert torch.allclose(out, ref, atol=1e-5)
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert not torch.allclose(net(x, t, torch.tensor([0, 3])), ref, atol=1e-3)  # hook removed afterwards
    with pytest.raises(ValueError, match="no label-embedding table"):
        label_embedding_table(nn.Linear(2, 2))


def test_ddim_attack_sampler_is_the_evaluation_sampler():
    """The attack renders through the same DDIM as sample.py: same noise, same images."""
    from sfd_ddpm.samplers import image_seed, sample

    den = denoiser(teacher())
    seeds = [image_seed(0, FORGET, i) for i in range(4)]
    labels = torch.full((4,), FORGET)
    ref = sample(den, "ddim", labels, seeds, SHAPE, steps=5, guidance=2.0, clip_x0=True)
    z = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    mine = render(den, labels, z, Sampling("ddim", steps=5, guidance=2.0, clip_x0=True))
    assert torch.allclose(mine.detach(), ref, atol=1e-5) and math.isfinite(float(mine.detach().sum()))


@pytest.mark.parametrize("init", ["forget", "mean"])
def test_embedding_search_starts_from_the_chosen_row(init):
    """Budget 0 = the model with row f replaced by the start row (the forget row, or the mean class row)."""
    net, ref = rerouted(), rerouted()
    with torch.no_grad():
        ref.class_embedding.weight[FORGET] = ref.class_embedding.weight[:K].mean(0) if init == "mean" else \
            ref.class_embedding.weight[FORGET]
    judge = LinearJudge(patterns(), temperature=90.0)
    row = embedding_search(denoiser(net), judge, FORGET, ONE_STEP, SHAPE, init=init, budgets=(0,), n_eval=64)[0]
    z = torch.randn((64, *SHAPE), generator=torch.Generator().manual_seed(7919))  # the held-out noise of seed 0
    with torch.no_grad():
        p = judge(render(denoiser(ref), torch.full((64,), FORGET), z, ONE_STEP)).softmax(1)[:, FORGET].mean()
    assert row["mean_p_forget"] == pytest.approx(float(p), abs=1e-4)


# ---------------------------------------------------------------------------------------------
# evaluate.py attack


def _classifier_file(folder, always_forget: bool):
    from sfd_ddpm.classifiers import SmallCNN, save_classifier

    torch.manual_seed(0)
    model = SmallCNN(width=8)
    if always_forget:  # a judge that labels every image class 0
        with torch.no_grad():
            model.fc.weight.zero_()
            model.fc.bias.copy_(torch.tensor([5.0] + [0.0] * 9))
    path = folder / ("judge.safetensors" if always_forget else "clf.safetensors")
    save_classifier(path, model, architecture="small_cnn", dataset="builtin", image_size=16, test_accuracy=None,
                    training={"note": "random stand-in"})
    return path


def test_attack_cli_writes_every_setting_and_uses_the_judge(tmp_path, tiny_teacher):
    import json

    from click.testing import CliRunner

    import evaluate

    clf, judge = _classifier_file(tmp_path, False), _classifier_file(tmp_path, True)
    common = ["attack", "--ckpt", tiny_teacher, "--classifier", clf, "--forget", "0", "--budgets", "0,2", "--n", "3",
              "--steps", "2", "--attacks", "noise,embedding_forget", "--device", "cpu"]
    res = CliRunner().invoke(evaluate.main, [*map(str, common), "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "a.json").read_text())
    s, r = rec["settings"], rec["results"]
    assert rec["metric"] == "attack" and s["forget"] == 0 and s["budgets"] == [0, 2] and s["n"] == 3
    assert s["sampling"] == {"sampler": "ddim", "steps": 2, "guidance": 2.0, "clip_x0": True}  # a DDPM-kind model
    assert s["checkpoint"]["kind"] == "ddpm" and len(s["checkpoint"]["sha256"]) == 16
    assert s["classifier"]["path"] == str(clf) and s["judge"] == "the attacked classifier"
    assert [row["budget"] for row in r["attacks"]["noise"]] == [0, 2]
    assert set(r["at_budget"]) == {"noise", "embedding_forget"} and r["embedding_best"] == r["at_budget"]["embedding_forget"]

    res = CliRunner().invoke(evaluate.main, [*map(str, common), "--judge", str(judge), "--sampler", "one_step",
                                             "--out", str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "b.json").read_text())
    assert rec["settings"]["judge"]["path"] == str(judge) and rec["settings"]["sampling"]["sampler"] == "one_step"
    assert all(row["success_rate"] == 1.0 for rows in rec["results"]["attacks"].values() for row in rows)


@pytest.mark.parametrize("args, message", [
    (["--forget", "0,1"], "one forgotten class"),
    (["--forget", "0", "--attacks", "noise,xyz"], "choose from"),
    (["--forget", "0", "--budgets", "0,a"], "gradient-step counts"),
    (["--forget", "12"], "out of range"),
])
def test_attack_cli_bad_input_is_one_line(tmp_path, tiny_teacher, args, message):
    from click.testing import CliRunner

    import evaluate

    clf = _classifier_file(tmp_path, False)
    res = CliRunner().invoke(evaluate.main, ["attack", "--ckpt", str(tiny_teacher), "--classifier", str(clf),
                                             *args, "--out", str(tmp_path / "x.json")])
    assert res.exit_code != 0 and message in res.output, res.output
    assert not (tmp_path / "x.json").exists()


# ---------------------------------------------------------------------------------------------
# the attack columns of make compare and of the paper-table aggregator


def test_aggregate_attack_columns_and_no_attacks(tmp_path):
    import json
    import subprocess
    import sys

    from conftest import TREE

    for row, (noise, emb) in {"sfd": (0.25, 0.75), "retrain": (0.0, 0.0625)}.items():
        (tmp_path / row).mkdir()
        (tmp_path / row / "ua.json").write_text(json.dumps({"results": {"ua": 0.9, "remaining_accuracy": 0.8}}))
        (tmp_path / row / "fid.json").write_text(json.dumps({"results": {"classifier_fid": 3.0}}))
        (tmp_path / row / "attack.json").write_text(json.dumps({
            "settings": {"budgets": [0, 50]},
            "results": {"at_budget": {"noise": {"success_rate": noise}}, "embedding_best": {"success_rate": emb}}}))
    run = lambda *a: subprocess.run([sys.executable, "scripts/aggregate.py", "--out", tmp_path, *a], cwd=TREE,  # noqa: E731
                                    text=True, capture_output=True)
    assert run().returncode == 0
    table = (tmp_path / "table.md").read_text()
    assert "noise attack @50 | embedding attack @50 |" in table
    assert "| SFD one-step | - | 0.900 | 0.800 | 3.000 | - | - | - | 0.250 | 0.750 |" in table
    assert "| Retrain | - | 0.900 | 0.800 | 3.000 | - | - | - | 0.000 | 0.062 |" in table
    assert "| SalUn | - | not run | - | - | - | - | - | - | - |" in table
    assert run("--no-attacks").returncode == 0
    table = (tmp_path / "table.md").read_text()
    assert "attack" not in table.split("\n", 1)[1] and "| SFD one-step | - | 0.900 | 0.800 | 3.000 | - | - | - | 0 | 9.53 |" in table
