"""Dataset classifiers for evaluation: unlearning accuracy, remaining-class accuracy, classifier FID.

Two architectures, one interface (docs/method.md section 7):

* ``small_cnn``: a few convolutions for the built-in 16x16 dataset; trains to >= 98% test accuracy
  in well under a minute on a CPU.
* ``resnet34``: torchvision ResNet-34 (ImageNet-initialised when the weights are available), fc
  replaced by Linear(512, n_classes), images resized to 224 px *inside* the model, as in the
  authors' ``train_classifier.py`` (~95% CIFAR-10, ~96% STL-10).

Every classifier takes images in [-1, 1] shaped (B, C, H, W) at the dataset's native resolution,
``model(x)`` returns logits (B, n_classes), ``model.features(x)`` the penultimate features used
by ``classifier_fid`` and ``model.head(features)`` the logits from those. Files are safetensors with the architecture, dataset, resolution, test
accuracy and training settings as metadata; ``load_classifier`` rebuilds the network from them.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from .checkpoints import CheckpointError, atomic_write, check_finite

ARCHITECTURES = ("small_cnn", "resnet34")
FORMAT = "sfd_ddpm.classifier/1"
RESNET34_WEIGHTS_URL = "https://download.pytorch.org/models/resnet34-b627a593.pth"


class SmallCNN(nn.Module):
    """Three conv stages (16 -> 8 -> 4 px) and global average pooling: ``width * 4`` features."""

    def __init__(self, n_classes: int = 10, in_channels: int = 3, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, n_classes)
        self.arch_kwargs = {"n_classes": n_classes, "in_channels": in_channels, "width": width}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class ResNet34Classifier(nn.Module):
    """torchvision ResNet-34 on [-1, 1] inputs resized to ``resize`` px; grey images are repeated to RGB.

    The authors normalise with mean = std = 0.5, i.e. the network sees [-1, 1] directly (not the
    ImageNet statistics); we keep that so their fine-tuning recipe transfers unchanged.
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 3, resize: int = 224,
                 imagenet_state: dict | None = None):
        super().__init__()
        from torchvision.models import resnet34

        net = resnet34(weights=None)
        if imagenet_state is not None:
            try:
                net.load_state_dict(imagenet_state, strict=True)
            except RuntimeError as err:
                raise ValueError(f"the ImageNet weights do not fit torchvision's ResNet-34: "
                                 f"{str(err).splitlines()[0]}") from None
        net.fc = nn.Linear(512, n_classes)
        nn.init.xavier_uniform_(net.fc.weight)
        nn.init.zeros_(net.fc.bias)
        self.net, self.in_channels, self.resize = net, in_channels, resize
        self.arch_kwargs = {"n_classes": n_classes, "in_channels": in_channels, "resize": resize}

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resize or x.shape[-2] != self.resize:
            x = F.interpolate(x, size=(self.resize, self.resize), mode="bilinear", align_corners=False)
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(self._prepare(x)))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return torch.flatten(n.avgpool(x), 1)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.fc(features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.fc(self.features(x))

    def head_parameters(self):
        return list(self.net.fc.parameters())

    def body_parameters(self):
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.parameters() if id(p) not in head]


def imagenet_resnet34_state(weights_path: str | None = None) -> dict:
    """ImageNet ResNet-34 weights: from a local state-dict file, else torchvision's download/cache.

    Raises FileNotFoundError for a missing file and RuntimeError when the download fails (no network).
    """
    if weights_path is not None:
        if not Path(weights_path).is_file():
            raise FileNotFoundError(f"ImageNet weights file {str(weights_path)!r} not found")
        try:
            return torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
            raise ValueError(f"{weights_path} is not a loadable state dict ({type(err).__name__}: {err})") from None
    from torchvision.models import ResNet34_Weights

    try:
        return ResNet34_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 - URLError, HTTPError, SSL errors ...
        raise RuntimeError(
            f"could not get torchvision's ImageNet ResNet-34 weights ({type(err).__name__}: {err}). "
            f"Offline? Pass --no-pretrained to start from random weights, or download {RESNET34_WEIGHTS_URL} "
            f"elsewhere and pass --imagenet-weights PATH.") from None


def build_classifier(arch: str, n_classes: int, in_channels: int = 3, *, width: int = 32, resize: int = 224,
                     imagenet_state: dict | None = None) -> nn.Module:
    if arch == "small_cnn":
        if imagenet_state is not None:
            raise ValueError("small_cnn has no ImageNet weights; use --no-pretrained")
        return SmallCNN(n_classes, in_channels, width)
    if arch == "resnet34":
        return ResNet34Classifier(n_classes, in_channels, resize, imagenet_state)
    raise ValueError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


# ----------------------------------------------------------------------------------------------
# Training and accuracy

GOOD_ACCURACY = 0.95  # below this a classifier's verdicts (UA, remaining-class accuracy) are flagged


def classifier_quality_note(meta: dict) -> str | None:
    """A warning to print next to UA when the judging classifier is weak (test accuracy < 0.95 or
    unknown); None when it is good enough to judge."""
    acc = meta.get("test_accuracy")
    if acc is None:
        return ("the classifier's test accuracy is unknown (not measured when it was trained): UA and "
                "remaining-class accuracy may mean little")
    if acc < GOOD_ACCURACY:
        return (f"the classifier's test accuracy is {acc:.3f} (< {GOOD_ACCURACY}): it mislabels real images, so UA "
                f"and remaining-class accuracy partly measure the classifier; train a better one (more steps, "
                f"--arch resnet34) before trusting them")
    return None


def classifier_class_names(meta: dict) -> list[str] | None:
    """The class names a classifier was trained with (folder names for folder data), or the dataset's
    names for classifiers saved before names were stored; None when unknown."""
    if meta.get("class_names"):
        return list(meta["class_names"])
    from .data import class_names
    try:
        names = class_names(meta["dataset"])
    except (ValueError, KeyError, TypeError):
        return None
    return names if len(names) == meta.get("n_classes") else None


def random_crop(x: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Pad by ``pad`` pixels (reflected) and crop back at a random offset per image (translation augmentation)."""
    if pad <= 0:
        return x
    h, w = x.shape[-2:]
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    off = torch.randint(0, 2 * pad + 1, (x.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(off)])


def epochs_for_steps(n_train: int, batch: int, target_steps: int, min_epochs: int = 1) -> int:
    """Epochs that give about ``target_steps`` optimisation steps on ``n_train`` images (at least ``min_epochs``):
    a small folder gets many epochs, a large one few, so every dataset gets a comparable training budget."""
    per_epoch = max(1, -(-n_train // batch))
    return max(min_epochs, -(-target_steps // per_epoch))


def random_hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)


@torch.no_grad()
def accuracy(model: nn.Module, loader, device="cpu", progress: bool = False) -> float:
    """Top-1 accuracy over a loader of (images in [-1, 1], labels)."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in tqdm(loader, desc="test accuracy", unit="batch", disable=not progress, leave=False):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def fit(model: nn.Module, train_loader, *, epochs: int, lr: float, head_lr_mult: float = 1.0,
        weight_decay: float = 0.0, hflip: bool = False, crop_pad: int = 0, cosine: bool = False, device="cpu",
        seed: int = 0, progress: bool = True, log=print) -> dict:
    """Adam with cross-entropy; the fc layer at ``head_lr_mult`` x lr (the authors use 10x for ResNet-34).

    Returns {"seconds", "final_loss"}. ``hflip`` applies random horizontal flips to each batch,
    ``crop_pad`` > 0 random crops after reflect-padding by that many pixels; ``cosine`` decays the
    learning rate to 0 over the run (long small-data runs settle instead of hopping between minima).
    """
    from tqdm import tqdm

    if hasattr(model, "head_parameters"):
        groups = [{"params": model.body_parameters(), "lr": lr},
                  {"params": model.head_parameters(), "lr": lr * head_lr_mult}]
    else:
        groups = [{"params": model.parameters(), "lr": lr}]
    opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    total_steps = max(1, epochs * len(train_loader))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: 0.5 * (1 + math.cos(math.pi * min(k, total_steps) / total_steps)) if cosine else 1.0)
    gen = torch.Generator().manual_seed(seed)
    model.to(device).train()
    start, loss_value = time.perf_counter(), float("nan")
    for epoch in range(epochs):
        total, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
        for x, y in bar:
            if hflip:
                x = random_hflip(x, gen)
            x = random_crop(x, crop_pad, gen)
            loss = F.cross_entropy(model(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            value = loss.item()
            total, count = total + value * len(y), count + len(y)
            bar.set_postfix(loss=f"{value:.4f}")
        loss_value = total / max(count, 1)
        if not torch.isfinite(torch.tensor(loss_value)):
            raise FloatingPointError(f"classifier loss became {loss_value} in epoch {epoch + 1}; lower --lr")
        log(f"epoch {epoch + 1}/{epochs}: mean loss {loss_value:.4f} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    return {"seconds": time.perf_counter() - start, "final_loss": loss_value}


# ----------------------------------------------------------------------------------------------
# Files

def save_classifier(path, model: nn.Module, *, architecture: str, dataset: str, image_size: int,
                    test_accuracy: float | None, training: dict, class_names: list[str] | None = None) -> None:
    """Atomically write weights and metadata (everything ``load_classifier`` needs) as safetensors."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "kind": "classifier", "architecture": architecture,
            "arch_kwargs": json.dumps(model.arch_kwargs), "dataset": dataset,
            "n_classes": str(model.arch_kwargs["n_classes"]), "in_channels": str(model.arch_kwargs["in_channels"]),
            "image_size": str(image_size), "test_accuracy": json.dumps(test_accuracy),
            "training": json.dumps(training), "class_names": json.dumps(class_names)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_classifier_metadata(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"classifier file {str(path)!r} not found (train one with train_classifier.py)")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
    if raw.get("kind") != "classifier":
        raise CheckpointError(f"{path} is not a classifier file (kind={raw.get('kind')!r}); "
                              f"train one with train_classifier.py")
    try:
        return {"architecture": raw["architecture"], "arch_kwargs": json.loads(raw["arch_kwargs"]),
                "dataset": raw["dataset"], "n_classes": int(raw["n_classes"]),
                "in_channels": int(raw["in_channels"]), "image_size": int(raw["image_size"]),
                "test_accuracy": json.loads(raw["test_accuracy"]), "training": json.loads(raw["training"]),
                "class_names": json.loads(raw.get("class_names", "null")), "format": raw.get("format")}
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{path} has incomplete classifier metadata ({type(err).__name__}: {err})") from None


def load_classifier(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode without gradients, metadata). ``model(x)``: x in [-1, 1], (B, C, H, W) at the
    dataset's native resolution -> logits (B, n_classes); ``model.features(x)``: penultimate features.

    Raises CheckpointError for a missing, corrupt or foreign file.
    """
    meta = read_classifier_metadata(path)
    try:
        model = build_classifier(meta["architecture"], **meta["arch_kwargs"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot rebuild {meta['architecture']!r} ({err})") from None
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path} is corrupt ({err})") from None
    check_finite(state, path)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not fit its {meta['architecture']} metadata "
                              f"({str(err).splitlines()[0]})") from None
    model.to(device).eval().requires_grad_(False)
    meta["path"] = str(path)
    return model, meta
