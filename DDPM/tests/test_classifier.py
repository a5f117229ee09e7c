"""Classifiers: the load_classifier contract, bad files, ImageNet weights offline, train_classifier.py."""
from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from sfd_ddpm.checkpoints import CheckpointError, save_weights
from sfd_ddpm.classifiers import (ResNet34Classifier, SmallCNN, build_classifier, imagenet_resnet34_state,
                                  load_classifier, save_classifier)


def save(path, model, arch, image_size=16):
    save_classifier(path, model, architecture=arch, dataset="builtin", image_size=image_size, test_accuracy=0.5,
                    training={"epochs": 1})


@pytest.mark.parametrize("arch", ["small_cnn", "resnet34"])
def test_save_load_roundtrip_follows_the_contract(tmp_path, arch):
    torch.manual_seed(0)
    model = build_classifier(arch, 10, 3, width=8, resize=32).eval()
    path = tmp_path / f"{arch}.safetensors"
    save(path, model, arch)
    loaded, meta = load_classifier(path, "cpu")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert (meta["architecture"], meta["n_classes"], meta["image_size"], meta["dataset"]) == (arch, 10, 16, "builtin")
    assert meta["test_accuracy"] == 0.5 and meta["training"] == {"epochs": 1}
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logits = loaded(x)
        assert logits.shape == (4, 10)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(loaded.head(loaded.features(x)), logits)


def test_resnet34_resizes_inside_and_accepts_grey_images():
    model = ResNet34Classifier(n_classes=7, resize=32).eval()
    with torch.no_grad():
        assert model.features(torch.zeros(2, 3, 16, 16)).shape == (2, 512)
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)
    head = {id(p) for p in model.head_parameters()}
    assert head == {id(model.net.fc.weight), id(model.net.fc.bias)}
    assert len(model.body_parameters()) + 2 == len(list(model.parameters()))


def test_bad_classifier_files_raise_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_classifier(junk)
    ddpm = tmp_path / "ddpm.safetensors"
    save_weights(ddpm, {"ema": {"w": torch.zeros(2)}}, {"data": {}}, step=1, kind="ddpm")
    with pytest.raises(CheckpointError, match="not a classifier file"):
        load_classifier(ddpm)
    good = tmp_path / "good.safetensors"
    save(good, SmallCNN(width=8), "small_cnn")
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(10, 3)}, str(wrong), metadata=meta)
    with pytest.raises(CheckpointError, match="do not fit"):
        load_classifier(wrong)


def test_imagenet_weights_from_a_local_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        imagenet_resnet34_state(tmp_path / "missing.pth")
    from torchvision.models import resnet34

    torch.manual_seed(1)
    standin = resnet34(weights=None).state_dict()  # same keys and shapes as the ImageNet file
    path = tmp_path / "resnet34-standin.pth"
    torch.save(standin, path)
    model = build_classifier("resnet34", 10, imagenet_state=imagenet_resnet34_state(path))
    torch.testing.assert_close(model.net.conv1.weight, standin["conv1.weight"])
    assert model.net.fc.weight.shape == (10, 512)
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="do not fit"):
        build_classifier("resnet34", 10, imagenet_state=imagenet_resnet34_state(tmp_path / "bad.pth"))


def test_train_classifier_help_and_bad_options(tmp_path):
    import train_classifier

    runner = CliRunner()
    res = runner.invoke(train_classifier.main, ["--help"])
    assert res.exit_code == 0 and "--no-pretrained" in res.output and "--imagenet-weights" in res.output
    res = runner.invoke(train_classifier.main, ["--dataset", "builtin", "--out", str(tmp_path / "c.safetensors"),
                                                "--arch", "small_cnn", "--pretrained"])
    assert res.exit_code != 0 and "small_cnn has no ImageNet weights" in res.output
    res = runner.invoke(train_classifier.main, ["--dataset", "builtin", "--out", str(tmp_path / "c.safetensors"),
                                                "--arch", "resnet34", "--imagenet-weights", str(tmp_path / "none.pth")])
    assert res.exit_code != 0 and "not found" in res.output
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("arch,extra", [("small_cnn", []),
                                        ("resnet34", ["--no-pretrained", "--resize", "32", "--limit-train", "40",
                                                              "--limit-test", "100"])])
def test_train_classifier_tiny_run(tmp_path, arch, extra):
    import train_classifier

    out = tmp_path / "clf.safetensors"
    res = CliRunner().invoke(train_classifier.main, ["--dataset", "builtin", "--out", str(out), "--arch", arch,
                                                     "--epochs", "1", "--builtin-per-class", "20", "--no-progress",
                                                     *extra])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    model, meta = load_classifier(out)
    assert meta["architecture"] == arch and meta["image_size"] == 16
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    assert meta["training"]["epochs"] == 1 and meta["training"]["n_test"] == (100 if arch == "resnet34" else 2000)
    assert model(torch.zeros(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.slow
def test_small_cnn_reaches_98_percent_on_builtin(tmp_path):
    """The default built-in recipe; accuracy re-measured independently of the training script."""
    import train_classifier
    from torch.utils.data import DataLoader

    from sfd_ddpm.classifiers import accuracy
    from sfd_ddpm.data import load_dataset

    out = tmp_path / "builtin.safetensors"
    res = CliRunner().invoke(train_classifier.main, ["--dataset", "builtin", "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    model, meta = load_classifier(out)
    test = load_dataset("builtin", split="test", image_size=16)
    acc = accuracy(model, DataLoader(test, batch_size=500))
    assert acc >= 0.98, f"small CNN test accuracy {acc:.4f}"
    assert meta["test_accuracy"] == pytest.approx(acc)
    assert meta["training"]["train_seconds"] < 120
