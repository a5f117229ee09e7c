"""Settings a run accepts: every rate, weight and probability in its range, and a resume that changes
settings only when asked to, never the network's, with each change recorded; a resume from non-finite
weights names the newest finite state. In-process (click's CliRunner) on a tiny two-iteration run."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open

from conftest import TINY

import train as train_script
from sfd_ddpm import config as C
from sfd_ddpm import training


def invoke(*args):
    return CliRunner().invoke(train_script.main, [str(a) for a in args])


def files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_line_error(res, *parts):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit), res.output
    assert res.output.count("Error: ") == 1, res.output
    line = res.output.split("Error: ")[1]  # after a progress bar when training had begun
    assert line.count("\n") == 1 and line.endswith("\n"), res.output
    for part in parts:
        assert part in line, (part, res.output)
    return line


# ---------------------------------------------------------------- ranges (issue: training.ema=1.5 ran)
# A leaf is a rate, weight, probability or noise level when its name or meaning says so.
NAME = re.compile(r"(^|_)(lr|ema|dropout|alpha|betas?|lambda|gamma|eta|guidance|fraction|ratio|eps|clip|sigma|rho|"
                  r"std|warmup|t|weight)(_|$)")
MEANING = re.compile(r"\b(learning rate|decay|probability|fraction|share)\b|\bweight\b(?! snapshots)", re.I)


def schema_leaves(schema=C.SCHEMA, where=""):
    for key, node in schema.items():
        if isinstance(node, tuple):
            yield f"{where}{key}", key, node
        else:
            yield from schema_leaves(node, f"{where}{key}.")


def rate_like(key, default, meaning) -> bool:
    numeric = (isinstance(default, (int, float)) and not isinstance(default, bool)) or (
        isinstance(default, list) and bool(default) and all(isinstance(x, float) for x in default))
    return bool((numeric or default is None) and NAME.search(key) or numeric and MEANING.search(meaning))


def test_every_rate_weight_and_probability_has_a_range():
    """A new key of this kind without an entry in config.RANGES fails here."""
    like = {path for path, key, (default, meaning) in schema_leaves() if rate_like(key, default, meaning)}
    assert like - set(C.RANGES) == set(), "add these keys to config.RANGES"
    assert {"training.ema", "training.lr", "model.dropout", "sfd.alpha", "sfd.t_min"} <= like
    assert set(C.RANGES) <= {path for path, _, _ in schema_leaves()}  # no stale entry


def outside(rng: C.Range) -> list:
    """Values just outside ``rng`` (a whole-number step, so integer keys reach the range check)."""
    out = []
    if rng.low is not None:
        out += [rng.low - 1] + ([rng.low] if rng.low_open else [])
    if rng.high is not None:
        out += [rng.high + 1] + ([rng.high] if rng.high_open else [])
    return out


@pytest.mark.parametrize("key", sorted(C.RANGES))
def test_a_value_outside_its_range_is_refused(key):
    rng = C.RANGES[key]
    for bad in outside(rng):
        value = [0.5, bad] if rng.pair else bad
        with pytest.raises(C.ConfigError, match=re.escape(f"{key}={value!r}") + ".*" + re.escape(f"allowed {rng}")):
            C.load_config(None, [f"{key}={json.dumps(value)}"])
    for edge in (rng.low, rng.high):  # a closed end is a valid value
        if edge is not None and not (rng.low_open if edge == rng.low else rng.high_open):
            C._check_range(key, [edge, edge] if rng.pair else edge)


@pytest.mark.parametrize("low,high,how", C.ORDERED)
def test_swapped_range_ends_are_refused(low, high, how):
    cfg = C.load_config(None)
    a, b = C._get(cfg, low), C._get(cfg, high)
    with pytest.raises(C.ConfigError, match=re.escape(f"need {low} {how} {high}")):
        C.load_config(None, [f"{low}={b}", f"{high}={a}"])


def test_ema_above_one_is_refused_before_any_work(tmp_path):
    res = invoke("--config", "configs/builtin_train.yaml", "--outdir", tmp_path / "runs", *TINY, "training.ema=1.5")
    one_line_error(res, "training.ema=1.5 is out of range: allowed [0, 1]")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- resume with changed settings
@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """A tiny pretraining run stopped after iteration 2 of its 2 (states kept at 1 and 2)."""
    out = tmp_path_factory.mktemp("run")
    res = invoke("--config", "configs/builtin_train.yaml", "--outdir", out, *TINY, "training.n_iters=2",
                 "training.state_every=1", "training.keep_states=0", "training.snapshot_every=100")
    assert res.exit_code == 0, res.output
    (run,) = out.iterdir()
    return run


@pytest.fixture
def run(two_iterations, tmp_path):
    return shutil.copytree(two_iterations, tmp_path / two_iterations.name)


@pytest.mark.parametrize("override,shown", [("training.lr=2e-3", "training.lr: 0.001 -> 0.002"),
                                            ("seed=9", "seed: 0 -> 9"), ("training.ema=0.9", "training.ema: ")])
def test_resume_with_changed_settings_is_refused(run, override, shown):
    before = files(run)
    one_line_error(invoke("--resume", run, override), "changed settings", shown, "--allow-changed-settings")
    assert files(run) == before


@pytest.mark.parametrize("override", ["model.base_channels=16", "data.image_size=8", "data.n_classes=5",
                                      "diffusion.beta_end=0.03", "method=sfd"])
def test_resume_never_changes_the_network(run, override):
    key = override.split("=")[0]
    before = files(run)
    one_line_error(invoke("--resume", run, override, "--allow-changed-settings"), f"cannot change {key}: ")
    assert files(run) == before


def test_resume_of_a_distillation_run_as_pretraining_is_one_line(run):
    cfg = json.loads((run / "config.json").read_text())
    cfg["method"] = "sfd"  # what an sfd run's config.json says (the refusal comes before its state is read)
    (run / "config.json").write_text(json.dumps(cfg))
    one_line_error(invoke("--resume", run, "method=pretrain"), "cannot change method: 'sfd' -> 'pretrain'")


def test_accepted_changes_are_recorded_with_their_iteration(run):
    original = json.loads((run / "config.json").read_text())
    res = invoke("--resume", run, "training.n_iters=3")  # a longer run needs no flag
    assert res.exit_code == 0, res.output
    res = invoke("--resume", run, "training.n_iters=4", "training.lr=2e-3", "--allow-changed-settings")
    assert res.exit_code == 0, res.output
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["training"]["lr"] == 2e-3 and cfg["training"]["n_iters"] == 4
    assert cfg["changes"] == [{"iteration": 2, "key": "training.n_iters", "old": 2, "new": 3},
                              {"iteration": 3, "key": "training.n_iters", "old": 3, "new": 4},
                              {"iteration": 3, "key": "training.lr", "old": 1e-3, "new": 2e-3}]
    with safe_open(str(run / "network-0000004.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["config"])["changes"] == cfg["changes"]
    for change in reversed(cfg.pop("changes")):  # the original settings, walked back
        section, key = change["key"].split(".")
        cfg[section][key] = change["old"]
    assert cfg == original
    assert invoke("--resume", run).exit_code == 0  # nothing changed: nothing added
    assert len(json.loads((run / "config.json").read_text())["changes"]) == 3


def test_resume_below_the_saved_iteration_is_refused(run):
    before = files(run)
    one_line_error(invoke("--resume", run, "training.n_iters=1"), "training.n_iters=1 is below iteration 2")
    assert files(run) == before


# ---------------------------------------------------------------- non-finite states (issue 26 item 7)
def poison(path):
    state = torch.load(path, weights_only=True)
    name, tensor = next((k, v) for k, v in state["method"]["net"].items() if v.is_floating_point())
    tensor.view(-1)[0] = float("nan")
    torch.save(state, path)
    return f"net.{name}"


def test_resume_from_a_non_finite_state_names_the_newest_finite_one(run):
    assert poison(run / "training-state-0000002.pt")
    before = files(run)
    line = one_line_error(invoke("--resume", run, "training.n_iters=3"), "training-state-0000002.pt: tensor 'net.",
                          "holds non-finite values", f"finite weights is {run / 'training-state-0000001.pt'}",
                          "move training-state-0000002.pt out of")
    assert "--allow-changed-settings" in line
    assert files(run) == before


def test_resume_when_no_state_is_finite_says_so(run):
    for path in run.glob("training-state-*.pt"):
        poison(path)
    one_line_error(invoke("--resume", run, "training.n_iters=3"), f"no training state in {run} holds finite weights")


@pytest.mark.parametrize("snapshot_every", [100, 3], ids=["state", "snapshot-and-state"])
def test_non_finite_weights_are_never_saved(tmp_path, monkeypatch, snapshot_every):
    """Weights that turn NaN in iteration 3 (of 4; a state after each, one kept): neither its state nor its
    snapshot is written, so the finite state of iteration 2 is not rotated away, and the message names it."""
    real = training.train

    def train(method, *args, **kwargs):
        step = method.train_step

        def step_then_poison(i):
            out = step(i)
            if i == 2:
                next(v for v in method.weights()["net"].values() if v.is_floating_point()).fill_(float("nan"))
            return out

        method.train_step = step_then_poison
        return real(method, *args, **kwargs)

    monkeypatch.setattr(training, "train", train)
    res = invoke("--config", "configs/builtin_train.yaml", "--outdir", tmp_path, *TINY, "training.n_iters=4",
                 "training.state_every=1", "training.keep_states=1", f"training.snapshot_every={snapshot_every}")
    (run,) = tmp_path.iterdir()
    one_line_error(res, "became non-finite (NaN or inf) by iteration 3", "nothing of that iteration was saved",
                   f"finite weights is {run / 'training-state-0000002.pt'}")
    assert sorted(p.name for p in run.glob("training-state-*")) == ["training-state-0000002.pt"]
    assert not list(run.glob("network-*")) and not list(run.glob(".*.tmp"))
