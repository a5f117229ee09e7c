"""FID of generated images (docs/method.md section 7, preserved quality), with clean resizing.

- ``vs reference``: generated images against a folder of real images (e.g. COCO val2014 images for COCO
  captions);
- ``vs original``: unlearned-model images against the original model's images for the same prompts and
  seeds (matched by ``slug/seed.png``), i.e. how far unlearning moved the output distribution.

Every image is read with PIL, converted to RGB and resized to ``size`` x ``size`` (299 for Inception) with
PIL's bicubic filter, which low-pass filters when shrinking (the "clean" resize of Parmar et al.; the
aliased tensor resizes of older FID code change the numbers). The uint8 images then go through
torchmetrics' ``FrechetInceptionDistance``. Features: ``inception-v3`` = torch-fidelity's Inception-v3
with the TF-ported FID weights, 2048-d pool3 (the standard FID); offline, pass the weights file
(``weights-inception-2015-12-05-6726825d.pth``) as ``weights_path``. That file, or torch-fidelity's cached
download, must have the known sha256 (``INCEPTION_SHA256``): random weights under the right keys give FID 0
without complaint, so another file is refused unless ``allow_unknown`` (recorded in the settings). A plug-in ``module:factory`` returns
any ``torch.nn.Module`` mapping uint8 (N, 3, size, size) to (N, D) features (numbers are then not
comparable with Inception FID; the tests use this for a tiny stand-in).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .folders import ImageItem, ImageSet, load_rgb
from .records import EvaluationError, file_sha256, load_plugin

INCEPTION = "inception-v3"
INCEPTION_SIZE = 299
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
# sha256 of that file (95,628,359 bytes; torch hub names files by the first 8 digits of their sha256)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
ALLOW_UNKNOWN = "--allow-unknown-inception-weights"
RESIZE = "PIL bicubic (antialiased when shrinking), RGB, uint8"


def clean_resize(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    im = load_rgb(path)
    if im.size != (size, size):
        im = im.resize((size, size), resample=Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def check_inception_weights(path: str | Path) -> None:
    """Read the file as plain tensors first: torch-fidelity then unpickles it without restriction, and a
    pickle can run code. Also catches a wrong file with a clear message."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: not a plain state dict
        raise EvaluationError(f"--inception-weights {str(path)!r} is not a plain PyTorch state dict ({exc}); "
                              f"expected {INCEPTION_URL}") from exc
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if fc is None or tuple(fc.shape) != (1008, 2048):
        raise EvaluationError(f"--inception-weights {str(path)!r} does not hold the FID Inception-v3 weights "
                              f"(no fc.weight of shape 1008 x 2048); expected {INCEPTION_URL}")


def known_weights(path: str | Path, what: str, fix: str, allow_unknown: bool) -> dict:
    """Refuse a weights file that is not the FID Inception file unless ``allow_unknown``; -> what the
    record says about it (path, sha256, known, override)."""
    digest = file_sha256(path)
    known = digest == INCEPTION_SHA256
    if not known and not allow_unknown:
        raise EvaluationError(f"{what} {str(path)!r} has sha256 {digest[:16]}..., not that of the FID Inception "
                              f"weights ({INCEPTION_SHA256[:16]}...): FID from it is not comparable with any "
                              f"published number. {fix}, or pass {ALLOW_UNKNOWN} to use this file anyway "
                              "(recorded in the JSON)")
    return dict(inception_weights=str(path), inception_weights_sha256=digest, inception_weights_known=known,
                allow_unknown_inception_weights=allow_unknown)


def cached_download() -> Path:
    """Where torch-fidelity keeps its download (it does not check the file's hash when it reads it)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


def build_features(spec: str, weights_path: str | None, device: torch.device,
                   allow_unknown: bool = False) -> tuple[object, int, dict]:
    """-> (feature argument for FrechetInceptionDistance, input size, settings)."""
    if spec == INCEPTION:
        if weights_path is not None:
            if not Path(weights_path).is_file():
                raise EvaluationError(f"--inception-weights {weights_path!r} not found; download {INCEPTION_URL} "
                                      "to that path (the TF-ported FID Inception weights)")
            check_inception_weights(weights_path)
            ident = known_weights(weights_path, "--inception-weights",
                                  "Use weights-inception-2015-12-05-6726825d.pth", allow_unknown)
        else:
            ident = dict(inception_weights=f"torch-fidelity download/cache of {INCEPTION_URL}")
        return 2048, INCEPTION_SIZE, dict(features="inception-v3 pool3 (2048-d, TF FID weights, torch-fidelity)",
                                          **ident)
    factory = load_plugin(spec, "--features")
    module = factory(device=str(device))
    if not isinstance(module, torch.nn.Module):
        raise EvaluationError(f"--features {spec!r} must return a torch.nn.Module")
    size = int(getattr(module, "input_size", INCEPTION_SIZE))
    return module, size, dict(features=f"plug-in {spec} (not comparable with Inception FID)")


class FidComputer:
    """One feature network for the run; ``__call__(real, fake)`` -> FID."""

    def __init__(self, spec: str, weights_path: str | None, device: torch.device, batch: int = 50,
                 allow_unknown_weights: bool = False):
        from torchmetrics.image.fid import FrechetInceptionDistance

        feature, self.size, self.settings = build_features(spec, weights_path, device, allow_unknown_weights)
        try:
            self.metric = FrechetInceptionDistance(
                feature=feature, reset_real_features=True, normalize=False,
                input_img_size=(3, self.size, self.size),
                feature_extractor_weights_path=None if spec != INCEPTION else weights_path).to(device)
        except Exception as exc:  # noqa: BLE001 - download and load failures come in many types
            raise EvaluationError(f"could not build the FID feature network ({exc}); offline, download "
                                  f"{INCEPTION_URL} and pass --inception-weights PATH") from exc
        if spec == INCEPTION and weights_path is None and cached_download().is_file():
            self.settings.update(known_weights(cached_download(), "the cached download",
                                               "Delete it to download it again", allow_unknown_weights))
        self.device, self.batch = device, batch
        self.settings.update(resize=RESIZE, resolution=self.size, library="torchmetrics FrechetInceptionDistance")

    def _add(self, items: Sequence[ImageItem], real: bool) -> None:
        for i in range(0, len(items), self.batch):
            arr = np.stack([clean_resize(it.path, self.size) for it in items[i:i + self.batch]])
            self.metric.update(torch.from_numpy(arr).permute(0, 3, 1, 2).to(self.device), real=real)

    @torch.no_grad()
    def __call__(self, real: Sequence[ImageItem], fake: Sequence[ImageItem]) -> float:
        for what, items in (("reference/original", real), ("generated", fake)):
            if len(items) < 2:
                raise EvaluationError(f"FID needs at least 2 {what} images, got {len(items)}")
        self.metric.reset()
        self._add(real, True)
        self._add(fake, False)
        return float(self.metric.compute())


def match_pairs(unlearned: ImageSet, original: ImageSet) -> tuple[list[ImageItem], list[ImageItem], dict]:
    """Images of the same prompt and seed in both sets (keyed by ``slug/seed.png``)."""
    orig = {it.key: it for it in original.items}
    pairs = [(orig[it.key], it) for it in unlearned.items if it.key in orig]
    if not pairs:
        raise EvaluationError(f"no image of {str(unlearned.folder)!r} has a same-prompt, same-seed image in "
                              f"{str(original.folder)!r} (matched by <prompt slug>/<seed>.png)")
    for o, u in pairs:
        if o.prompt is not None and u.prompt is not None and o.prompt != u.prompt:
            raise EvaluationError(f"{u.key!r}: prompts differ between the two sets ({u.prompt!r} vs {o.prompt!r})")
    info = dict(matched=len(pairs), unmatched_unlearned=len(unlearned.items) - len(pairs),
                unmatched_original=len(original.items) - len(pairs))
    return [o for o, _ in pairs], [u for _, u in pairs], info
