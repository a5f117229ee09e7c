"""FID, Inception Score, KID and precision/recall of generated images against a reference set (docs/method.md section 7).

Two feature spaces, never to be confused; every result key carries the space's prefix:

* ``InceptionFeatureSpace``: Inception-v3 pool3 (2048-d) and logits with the TF-ported FID weights, as
  shipped by torch-fidelity (the weights of the original TF FID code). Keys ``fid``, ``is_mean``,
  ``kid_mean``, ``precision``, ``recall``. Offline use: ``weights_path`` = a local copy of the weights
  file; otherwise torch-fidelity downloads it into the torch hub cache on first use. Either file must have
  the known sha256 (``INCEPTION_SHA256``): random weights under the right keys would give FID 0 and IS 1
  without complaint, so another file is refused unless ``allow_unknown_weights`` (recorded with the results).
* ``ClassifierFeatureSpace``: the penultimate features of a dataset classifier (``classifiers.py``);
  for the built-in 16x16 dataset, where Inception features say little. Keys ``classifier_fid``,
  ``classifier_kid_mean``, ``classifier_precision`` ... Not comparable with Inception FID.

The arithmetic on features is torch-fidelity's (``fid_statistics_to_metric``, ``isc_features_to_metric``,
``kid_features_to_metric``, ``prc_features_to_metric``: the k-NN manifold precision/recall of
Kynkaanniemi et al. 2019). Feature extraction is ours, so that one pass serves all metrics and the
classifier space goes through the same code.

Images go in as [-1, 1] tensors and are quantised to 8 bits first (as a saved PNG would be), so
in-memory tensors and folders of PNGs give the same numbers. Reference features are cached in a
safetensors file keyed by the content hash of the reference files, the feature space and the settings.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from ..checkpoints import atomic_write, file_hash
from .folders import iter_batches, iter_tensor_batches, list_pngs, model_channels, quantise

METRICS = ("fid", "is", "kid", "pr")
INCEPTION_ID = "inception-v3-tf-2015-12-05"
# sha256 of torch-fidelity's weights-inception-2015-12-05-6726825d.pth (95,628,359 bytes; the same file as
# pytorch-fid's pt_inception-2015-12-05-6726825d.pth; torch hub names files by their sha256's first 8 digits)
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
ALLOW_UNKNOWN = "--allow-unknown-inception-weights"
CACHE_FORMAT = "sfd_ddpm.ref_features/1"


class FeatureSpace:
    """Maps images in [-1, 1] (B, C, H, W) to (features (B, D), logits (B, K) or None), on the CPU."""

    prefix = ""          # put before every metric name computed in this space
    identity = ""        # names the extractor and its weights; part of the cache key
    batch_size = 128
    channels: int | None = None  # files are converted to grey (1) or RGB (3) for the extractor; None = as stored

    def extract(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class InceptionFeatureSpace(FeatureSpace):
    """torch-fidelity's Inception-v3 with the TF FID weights: 2048-d pool3 features and unbiased logits for IS."""

    prefix = ""
    channels = 3

    def __init__(self, weights_path=None, device="cpu", batch_size: int = 64, allow_unknown_weights: bool = False):
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3

        self.device, self.batch_size = torch.device(device), batch_size
        self.allow_unknown_weights = allow_unknown_weights
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise FileNotFoundError(
                    f"Inception weights file {str(path)!r} not found. Download {URL_INCEPTION_V3} (the TF-ported "
                    f"FID Inception weights) to that path, or omit --inception-weights to let torch-fidelity "
                    f"download it into the torch hub cache.")
            # torch-fidelity loads the file with a full unpickler; check first that it holds tensors only.
            try:
                torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
                raise ValueError(f"{path} is not a plain state dict of tensors ({type(err).__name__}: {err})") from None
            self.weights = self._check_weights(path, "--inception-weights", "Use weights-inception-2015-12-05-6726825d.pth")
            self.identity = f"{INCEPTION_ID}:sha256={self.weights['inception_weights_sha256'][:16]}"
        else:
            self.identity = INCEPTION_ID
        try:
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=None if weights_path is None
                                                   else str(weights_path))
        except RuntimeError as err:
            if weights_path is not None:
                raise ValueError(f"{weights_path} does not hold the FID Inception-v3 weights "
                                 f"({str(err).splitlines()[0]})") from None
            raise RuntimeError(f"could not download the FID Inception weights {URL_INCEPTION_V3} ({err}); "
                               f"download it elsewhere and pass --inception-weights PATH") from None
        except OSError as err:  # URLError and friends: no network
            raise RuntimeError(f"could not download the FID Inception weights {URL_INCEPTION_V3} "
                               f"({type(err).__name__}: {err}); download it elsewhere and pass "
                               f"--inception-weights PATH") from None
        if weights_path is None:  # torch-fidelity does not check its download's hash: the cached copy is checked here
            cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(URL_INCEPTION_V3).name
            self.weights = self._check_weights(cached, "the cached download", "Delete it to download it again") \
                if cached.is_file() else {
                "inception_weights": f"torch-fidelity download of {URL_INCEPTION_V3}"}
        self.net.to(self.device)

    def _check_weights(self, path: Path, what: str, fix: str) -> dict:
        """Refuse weights that are not the FID Inception file (random weights under the right keys give FID 0),
        unless ``allow_unknown_weights``; -> what the metrics JSON records about them."""
        digest = file_hash(path, 64)
        known = digest == INCEPTION_SHA256
        if not known and not self.allow_unknown_weights:
            raise ValueError(f"{what} {str(path)!r} has sha256 {digest[:16]}..., not that of the FID Inception "
                             f"weights ({INCEPTION_SHA256[:16]}...): FID/IS from it are not comparable with any "
                             f"published number. {fix}, or pass "
                             f"{ALLOW_UNKNOWN} to use this file anyway (recorded in the metrics JSON)")
        return {"inception_weights": str(path), "inception_weights_sha256": digest,
                "inception_weights_known": known, "allow_unknown_inception_weights": self.allow_unknown_weights}

    @torch.no_grad()
    def extract(self, x):
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        pool, logits = self.net(x.to(self.device))
        return pool.float().cpu(), logits.float().cpu()


class ClassifierFeatureSpace(FeatureSpace):
    """Penultimate features (``model.features``) and logits (``model.head``) of a dataset classifier."""

    prefix = "classifier_"

    def __init__(self, model, identity: str = "classifier", batch_size: int = 256):
        self.model, self.identity, self.batch_size = model, f"classifier:{identity}", batch_size
        self.channels = model_channels(model)
        try:
            self.device = next(model.parameters()).device
        except (StopIteration, AttributeError):
            self.device = torch.device("cpu")

    @classmethod
    def from_file(cls, path, device="cpu", batch_size: int = 256) -> "ClassifierFeatureSpace":
        from ..classifiers import load_classifier

        model, _ = load_classifier(path, device)
        return cls(model, f"sha256={file_hash(path)}", batch_size)

    @torch.no_grad()
    def extract(self, x):
        f = self.model.features(quantise(x).to(self.device))
        logits = self.model.head(f) if hasattr(self.model, "head") else None
        return f.float().cpu(), None if logits is None else logits.float().cpu()


# ----------------------------------------------------------------------------------------------
# Features of tensors, folders and cached references

def features_of_tensor(space: FeatureSpace, images: torch.Tensor, progress: bool = False):
    """(features, logits or None) for in-memory images in [-1, 1]."""
    return _collect(space.extract(x) for x in _progress(iter_tensor_batches(images, space.batch_size), progress,
                                                         len(images), space.batch_size))


def features_of_entries(space: FeatureSpace, entries, progress: bool = False):
    """(features, logits or None) for ``folders.list_pngs`` entries."""
    return _collect(space.extract(x) for x, _ in _progress(iter_batches(entries, space.batch_size, space.channels), progress,
                                                           len(entries), space.batch_size))


def reference_key(space: FeatureSpace, entries, settings: dict) -> str:
    """sha256 of the feature space, the settings and every reference file's name and content."""
    h = hashlib.sha256(json.dumps({"format": CACHE_FORMAT, "features": space.identity, **settings},
                                  sort_keys=True).encode())
    for path, _ in entries:
        h.update(path.name.encode() + b"\0")
        h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return h.hexdigest()


def reference_features(space: FeatureSpace, folder, exclude: Sequence[int] = (), include=None, cache_dir=None,
                       progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Features of the reference PNGs of ``folder`` (class filter by file name), cached in ``cache_dir``.

    Returns (features, info) with info = {"n_images", "cache": "hit" | "miss" | "off", "cache_file", "key"}.
    Any change to the files' contents, their names, the class filter or the feature space changes the key.
    """
    entries = list_pngs(folder, exclude, include)
    if not entries:
        raise ValueError(f"no reference images in {folder} (after excluding classes {list(exclude)})")
    settings = {"exclude": sorted(int(c) for c in exclude), "include": None if include is None else sorted(include)}
    key = reference_key(space, entries, settings) if cache_dir else None
    info = {"n_images": len(entries), "cache": "off", "cache_file": None, "key": key}
    if cache_dir:
        cache_file = Path(cache_dir) / f"ref-{key[:32]}.safetensors"
        info["cache_file"] = str(cache_file)
        if cache_file.is_file():
            try:
                feats, _ = load_reference_file(cache_file, space)
                info["cache"] = "hit"
                return feats, info
            except ValueError:
                pass  # unreadable cache entry: recompute and overwrite it
        info["cache"] = "miss"
    feats, _ = features_of_entries(space, entries, progress)
    if cache_dir:
        meta = {"format": CACHE_FORMAT, "features": space.identity, "key": key, "folder": str(folder),
                "n_images": str(len(entries)), "settings": json.dumps(settings)}
        atomic_write(cache_file, lambda tmp: save_file({"features": feats.contiguous()}, tmp, metadata=meta))
    return feats, info


def load_reference_file(path, space: FeatureSpace) -> tuple[torch.Tensor, dict]:
    """Cached reference features; refuses a file made in another feature space."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        feats = load_file(str(path))["features"]
    except (SafetensorError, OSError, KeyError) as err:
        raise ValueError(f"{path} is not a reference-features file ({type(err).__name__}: {err})") from None
    if meta.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path} is not a reference-features file written by evaluate.py fid")
    if meta.get("features") != space.identity:
        raise ValueError(f"{path} holds features of {meta.get('features')!r}, not of {space.identity!r}")
    return feats, meta


# ----------------------------------------------------------------------------------------------
# Metrics from features

def metrics_from_features(gen: torch.Tensor, gen_logits: torch.Tensor | None, ref: torch.Tensor, prefix: str = "",
                          metrics: Sequence[str] = METRICS, kid_subset_size: int = 1000, kid_subsets: int = 100,
                          pr_k: int = 3, is_splits: int = 10, seed: int = 0) -> tuple[dict, dict]:
    """(results, settings actually used). ``gen``/``ref``: (N, D) features; ``gen_logits`` for IS."""
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {', '.join(METRICS)}")
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ValueError(f"feature shapes {tuple(gen.shape)} and {tuple(ref.shape)} do not match")
    if len(gen) < 2 or len(ref) < 2:
        raise ValueError(f"need at least 2 images on each side, got {len(gen)} generated and {len(ref)} reference")
    gen, ref = gen.double().cpu(), ref.double().cpu()
    results, settings = {}, {"n_generated": len(gen), "n_reference": len(ref), "feature_dim": gen.shape[1]}
    if "fid" in metrics:
        results[f"{prefix}fid"] = fid_statistics_to_metric(fid_features_to_statistics(gen),
                                                           fid_features_to_statistics(ref), verbose=False)[
            "frechet_inception_distance"]
    if "is" in metrics:
        if gen_logits is None:
            raise ValueError(f"IS needs logits, which the {prefix or 'inception '}feature space does not give")
        splits = min(is_splits, len(gen))
        out = isc_features_to_metric(gen_logits.double().cpu(), splits=splits, rng_seed=seed)
        results[f"{prefix}is_mean"], results[f"{prefix}is_std"] = out["inception_score_mean"], out["inception_score_std"]
        settings["is_splits"] = splits
    if "kid" in metrics:
        size = min(kid_subset_size, len(gen), len(ref))
        out = kid_features_to_metric(gen, ref, kid_subsets=kid_subsets, kid_subset_size=size, verbose=False,
                                     rng_seed=seed, kid_kernel="poly", kid_kernel_poly_degree=3,
                                     kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1)
        results[f"{prefix}kid_mean"] = out["kernel_inception_distance_mean"]
        results[f"{prefix}kid_std"] = out["kernel_inception_distance_std"]
        settings.update(kid_subset_size=size, kid_subsets=kid_subsets, kid_kernel="poly degree 3, coef0 1")
    if "pr" in metrics:
        if min(len(gen), len(ref)) <= pr_k:
            raise ValueError(f"precision/recall with k={pr_k} needs more than {pr_k} images on each side")
        # Blockwise distances (save_cpu_ram) so 50k x 50k never sits in memory at once.
        out = prc_features_to_metric(gen.float(), ref.float(), prc_neighborhood=pr_k, prc_batch_size=2048,
                                     save_cpu_ram=True, verbose=False)
        results[f"{prefix}precision"], results[f"{prefix}recall"] = out["precision"], out["recall"]
        settings["pr_k"] = pr_k
    settings["seed"] = seed
    return results, settings


def evaluate_tensors(space: FeatureSpace, generated: torch.Tensor, reference: torch.Tensor,
                     metrics: Sequence[str] = ("fid",), **kwargs) -> dict:
    """Metrics of in-memory generated vs reference images (both in [-1, 1]); keys carry ``space.prefix``."""
    gen, logits = features_of_tensor(space, generated)
    ref, _ = features_of_tensor(space, reference)
    return metrics_from_features(gen, logits, ref, space.prefix, metrics, **kwargs)[0]


def classifier_fid(model, generated: torch.Tensor, reference: torch.Tensor, batch_size: int = 256) -> float:
    """FID in the penultimate-feature space of ``model`` (a dataset classifier), for in-memory images in [-1, 1]."""
    return evaluate_tensors(ClassifierFeatureSpace(model, batch_size=batch_size), generated, reference,
                            ("fid",))["classifier_fid"]


def evaluate_folders(space: FeatureSpace, images, reference, exclude: Sequence[int] = (), include=None,
                     metrics: Sequence[str] = METRICS, cache_dir=None, progress: bool = False,
                     **kwargs) -> tuple[dict, dict]:
    """Generated PNG folder vs a reference PNG folder (or a cached reference-features file).

    ``exclude``/``include`` filter both folders by the class in the file names. Returns (results, settings).
    """
    entries = list_pngs(images, exclude, include)
    if not entries:
        raise ValueError(f"no generated images in {images} (after excluding classes {list(exclude)})")
    gen, logits = features_of_entries(space, entries, progress)
    if Path(reference).is_file():
        ref, meta = load_reference_file(reference, space)
        ref_info = {"reference_file": str(reference), "n_images": len(ref), "cache": "file",
                    "reference_folder": meta.get("folder"), "reference_settings": json.loads(meta.get("settings", "{}"))}
    else:
        ref, ref_info = reference_features(space, reference, exclude, include, cache_dir, progress)
    results, settings = metrics_from_features(gen, logits, ref, space.prefix, metrics, **kwargs)
    classes = sorted({c for _, c in entries if c is not None})
    settings.update(feature_space=space.identity, metrics=list(metrics), exclude=sorted(int(c) for c in exclude),
                    include=None if include is None else sorted(include), generated_classes=classes,
                    reference=ref_info)
    return results, settings


def _collect(pairs):
    feats, logits = [], []
    for f, lg in pairs:
        feats.append(f)
        logits.append(lg)
    if not feats:
        return torch.empty(0, 0), None
    return torch.cat(feats), None if any(lg is None for lg in logits) else torch.cat(logits)


def _progress(iterable, progress, n, batch):
    if not progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=(n + batch - 1) // batch, desc="features", unit="batch", leave=False)

