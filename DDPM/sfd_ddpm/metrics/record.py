"""What every evaluation JSON records besides its numbers: settings, file hashes, library versions."""
from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from ..checkpoints import atomic_write, file_hash

LIBRARIES = ("torch", "torchvision", "torch-fidelity", "torchmetrics", "numpy", "scipy", "safetensors", "pillow")


def library_versions() -> dict:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def images_settings(folder) -> dict | None:
    """The ``settings.json`` that sample.py writes next to its images (sampler, steps, guidance,
    checkpoint hash ...), or None when the folder has none."""
    path = Path(folder) / "settings.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return {"unreadable": f"{path}: {err}"}


def classifier_record(path, meta: dict) -> dict:
    return {"path": str(path), "sha256": file_hash(path), "architecture": meta["architecture"],
            "dataset": meta["dataset"], "image_size": meta["image_size"], "n_classes": meta["n_classes"],
            "test_accuracy": meta["test_accuracy"]}


def write_result(path, metric: str, results: dict, settings: dict) -> dict:
    """Write {metric, results, settings, versions, command, created} as JSON (atomically); return it."""
    record = {"metric": metric, "results": results, "settings": settings, "versions": library_versions(),
              "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
              "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = json.dumps(record, indent=2, default=str)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
    return record
