"""Classes named by numbers (class folders `1`, `2`, `3`): every entry point reads a class argument by the
one rule of data.resolve_class, and a value that is the name of one class and the index of another is
refused with both readings shown. In-process: the resolution functions and the click commands."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import compare
import demo
import evaluate
import sample
import save_dataset
import train
from conftest import TREE
from sfd_ddpm.config import load_config
from sfd_ddpm.data import resolve_class, resolve_classes

NAMES = ["1", "2", "3"]
# value -> the class every entry point must read (an int), or the two readings of an ambiguous value
CASES = {
    "name:1": 0, "index:1": 1, "name:3": 2, "index:2": 2,
    "0": 0,            # no class is called 0: only the index reading
    "3": 2,            # index 3 is out of range: only the name reading
    "1": ("class 0 ('1')", "class 1 ('2')"),
    "2": ("class 1 ('2')", "class 2 ('3')"),
}


@pytest.fixture(scope="module")
def numbered(tmp_path_factory):
    """Class folders 1, 2, 3 with 4 tiny PNGs each (one held out per class)."""
    root = tmp_path_factory.mktemp("numbered")
    rng = np.random.default_rng(0)
    for name in NAMES:
        (root / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A tiny (untrained) classifier file whose classes are the folder names."""
    from sfd_ddpm.classifiers import SmallCNN, save_classifier
    path = tmp_path_factory.mktemp("clf") / "clf.safetensors"
    save_classifier(path, SmallCNN(3, 3, 4), architecture="small_cnn", dataset="folder", image_size=8,
                    test_accuracy=None, training={}, class_names=NAMES)
    return path


def check(value, outcome, read):
    """``read(value)`` gives ``outcome``: the class index, or an error showing both readings."""
    if isinstance(outcome, int):
        assert read(value) == outcome, value
    else:
        with pytest.raises(Exception) as err:
            read(value)
        message = str(getattr(err.value, "message", err.value))
        assert "ambiguous" in message and all(r in message for r in outcome), message
        assert f"name:{value}" in message and f"index:{value}" in message, message


@pytest.mark.parametrize("value", list(CASES))
def test_the_rule_is_the_same_for_text_and_numbers(value):
    """`sfd.forget=[1]` reaches train.py as the int 1, `--forget 1` as the text '1': one reading."""
    check(value, CASES[value], lambda v: resolve_class(v, NAMES))
    if value.isdigit():
        check(value, CASES[value], lambda v: resolve_class(int(v), NAMES))
    check(value, CASES[value], lambda v: resolve_classes(v, NAMES)[0])
    # names that are not numbers: indices and names never collide
    assert resolve_class(1, ["cat", "dog"]) == resolve_class("1", ["cat", "dog"]) == 1
    assert resolve_classes("name:dog,index:0", ["cat", "dog"]) == [1, 0]


def _train_cfg(numbered, *overrides, config="configs/builtin_sfd.yaml"):
    return load_config(TREE / config, ["data.dataset=folder", f"data.root={numbered}", "data.n_classes=3",
                                       "data.channels=3", "data.image_size=8", *overrides])


@pytest.mark.parametrize("value", list(CASES))
def test_every_entry_point_reads_a_class_alike(value, numbered, classifier, tmp_path, monkeypatch):
    outcome = CASES[value]
    names = {"data": {"dataset": "folder", "root": str(numbered), "class_names": NAMES, "n_classes": 3}}
    other = "index:0" if outcome != 0 else "index:1"

    def train_forget(v):   # YAML reads sfd.forget=[1] as an int, [name:1] as text
        cfg = _train_cfg(numbered, f"sfd.forget=[{v}]", f"sfd.override={other}")
        return train.prepare_data(cfg)["sfd"]["forget"][0]

    def train_override(v):
        return train.prepare_data(_train_cfg(numbered, f"sfd.forget=[{other}]", f"sfd.override={v}"))["sfd"]["override"]

    def retrain_forget(v):
        cfg = _train_cfg(numbered, f"baseline.forget=[{v}]", config="configs/builtin_retrain.yaml")
        return train.prepare_data(cfg)["baseline"]["forget"][0]

    for read in (train_forget, train_override, retrain_forget,
                 lambda v: sample.class_list_of(v, names)[0][0],
                 lambda v: evaluate._classes(v, {"class_names": NAMES, "n_classes": 3}, "--forget")[0]):
        check(value, outcome, read)

    # the click commands: an ambiguous value stops before any work, with both readings
    runner = CliRunner()
    invocations = {
        "evaluate": (evaluate.main, ["ua", "--images", str(numbered / "1"), "--classifier", str(classifier),
                                     "--forget", value, "--out", str(tmp_path / "ua.json")]),
        "save_dataset": (save_dataset.main, ["--dataset", "folder", "--root", str(numbered), "--image-size", "8",
                                             "--exclude-class", value, "--out", str(tmp_path / "refs")]),
        "train": (train.main, ["--config", "configs/builtin_sfd.yaml", "--outdir", str(tmp_path / "runs"),
                               f"data.root={numbered}", "data.dataset=folder", "data.n_classes=3",
                               f"sfd.forget=[{value}]", f"sfd.override={other}"]),
    }
    # demo / compare: stop at their first stage (the classifier) and read the resolution they announce
    stop = RuntimeError("stopped before training")
    monkeypatch.setattr(demo, "run", lambda cmd: (_ for _ in ()).throw(stop))
    monkeypatch.setattr(compare, "start", lambda cmd, log: (_ for _ in ()).throw(stop))
    compare_only = ["--methods", "sfd", "--demo", str(tmp_path / "nodemo")]
    for name, module, classes in (("demo", demo, ["--forget", value, "--override", other]),
                                  ("demo override", demo, ["--override", value, "--forget", other]),
                                  ("compare", compare, ["--forget", value, "--override", other]),
                                  ("compare override", compare, ["--override", value, "--forget", other])):
        invocations[name] = (module.main, ["--data-root", str(numbered), "--image-size", "8", "--quick", *classes,
                                           "--outdir", str(tmp_path / name),
                                           *(compare_only if module is compare else [])])
    for name, (command, args) in invocations.items():
        result = runner.invoke(command, args)
        if isinstance(outcome, int):
            if name.startswith(("demo", "compare")):
                assert result.exception is stop, (name, result.output)
                said = [line for line in result.output.splitlines() if line.startswith("forget class")]
                expected = (f"into class {outcome} ({NAMES[outcome]})" if "override" in name
                            else f"forget class {outcome} ({NAMES[outcome]})")
                assert said and expected in said[0], (name, result.output)
            continue   # the others would go on to real work; their resolution is checked above
        assert result.exit_code != 0 and "ambiguous" in result.output, (name, result.output)
        assert all(r in result.output for r in outcome), (name, result.output)


def test_a_resumed_run_keeps_its_stored_indices(numbered):
    """The run's config.json holds indices already (forget [1] = folder '2'): a resume does not read them
    again as values a user typed (which would be ambiguous)."""
    cfg = train.prepare_data(_train_cfg(numbered, "sfd.forget=[index:1]", "sfd.override=name:1"))
    assert cfg["sfd"]["forget"] == [1] and cfg["sfd"]["override"] == 0 and cfg["data"]["class_names"] == NAMES
    saved = json.loads(json.dumps(cfg))
    assert train.prepare_data(saved, saved)["sfd"] == cfg["sfd"]
    with pytest.raises(ValueError, match="ambiguous"):   # the same values typed fresh are refused
        train.prepare_data(saved)


def test_results_record_index_and_name():
    judge = evaluate._judge({"class_names": NAMES, "test_accuracy": 1.0, "n_classes": 3}, [1])
    assert judge["forget_class_names"] == ["2"]   # next to settings.forget = [1] in every evaluate.py JSON


@pytest.mark.parametrize("method", [m for m in compare.METHODS if compare.available(m)])
def test_demo_and_compare_pass_classes_that_train_reads_back(method, numbered):
    """The class overrides demo.py and compare.py hand to train.py name the classes they resolved, even
    where a folder name would be read differently (class 1 = folder '2', class 2 = folder '3')."""
    cmd = compare.method_commands(method, 0, "T.safetensors", numbered, 2, 8, [], False, classes=(1, 2))["train"]
    config = cmd[cmd.index("--config") + 1]
    overrides = [a for a in cmd if "forget" in a or "override" in a]
    cfg = train.prepare_data(_train_cfg(numbered, *overrides, config=config))
    section = "sfd" if method.startswith("sfd") else "vdu" if method == "vdu" else "baseline"
    assert cfg[section]["forget"] == [1], (method, overrides)
    if section == "sfd":
        assert cfg["sfd"]["override"] == 2
