"""What every evaluation JSON holds, and the small helpers around it.

A record is ``{"metric", "label", "prompt_set", "settings", "totals", "images"}``: ``settings`` has every
choice that changes a number (model ids and revisions, thresholds, detector and library versions, the
``generate.py`` manifest's settings), ``images`` one row per image, ``totals`` the summary numbers.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import platform
from pathlib import Path
from typing import Iterable

from ..checkpoints import atomic_write_json

BASE_PACKAGES = ("torch", "transformers", "torchmetrics", "torch-fidelity", "pillow", "numpy")


class EvaluationError(ValueError):
    """Bad input to an evaluation (missing files, empty sets, unknown names); the message says which."""


def library_versions(extra: Iterable[str] = ()) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in (*BASE_PACKAGES, *extra):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_record(metric: str, label: str, prompt_set: str, settings: dict, totals: dict, images: list[dict],
                packages: Iterable[str] = ()) -> dict:
    return dict(metric=metric, label=label, prompt_set=prompt_set, totals=totals, images=images,
                settings=dict(settings, library_versions=library_versions(packages)))


def write_record(path: str | Path, record: dict) -> None:
    atomic_write_json(Path(path), record)


def read_record(path: str | Path) -> dict:
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{str(path)!r} is not a readable evaluation JSON: {exc}") from exc
    if not isinstance(record, dict) or not {"metric", "label", "totals"} <= record.keys():
        raise EvaluationError(f"{str(path)!r} is not an evaluation record (no metric/label/totals)")
    return record


def load_plugin(spec: str, what: str):
    """'package.module:attribute' -> the attribute (a factory the user supplies, see the README)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise EvaluationError(f"{what} {spec!r}: expected 'module:factory' (e.g. my_giphy_adapter:build)")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as exc:
        raise EvaluationError(f"{what} {spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise EvaluationError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise EvaluationError(f"{what} {spec!r} is not callable")
    return obj


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: no CUDA device available")
    return torch.device(device)
