"""Image sets to evaluate.

A *generated* set is a ``generate.py`` output folder: ``<outdir>/<prompt slug>/<seed:05d>.png`` and
``manifest.json`` (prompt, seed and path of every image, plus model and sampler settings). Each image is
keyed by its path relative to the folder (``slug/seed.png``), which is what matches an unlearned-model
image to the original-model image of the same prompt and seed. A *reference* set (e.g. COCO validation
images) is any folder; its images are found recursively.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..prompts import PromptError, read_prompt_file
from .records import EvaluationError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True)
class ImageItem:
    path: Path
    key: str                 # path relative to the set's folder, POSIX separators
    prompt: str | None = None
    seed: int | None = None

    def row(self) -> dict:
        return dict(path=self.key, prompt=self.prompt, seed=self.seed)


@dataclass
class ImageSet:
    folder: Path
    items: list[ImageItem]
    manifest_settings: dict | None = None   # the manifest without its per-image list
    prompt_filter: list[str] = field(default_factory=list)

    def settings(self) -> dict:
        return dict(folder=str(self.folder), images=len(self.items), manifest=self.manifest_settings,
                    prompt_filter_files=self.prompt_filter)


def read_generated(folder: str | Path, prompt_files: Sequence[str] = (), need_prompts: bool = False) -> ImageSet:
    """Images of a ``generate.py`` folder, optionally only those whose prompt is in ``prompt_files``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"image folder {str(folder)!r} not found")
    manifest_path = folder / "manifest.json"
    settings = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
            rows = manifest["images"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise EvaluationError(f"{str(manifest_path)!r} is not a generate.py manifest: {exc}") from exc
        settings = {k: v for k, v in manifest.items() if k != "images"}
        items = []
        for row in rows:
            path = folder / row["path"]
            if not path.is_file():
                raise EvaluationError(f"{str(manifest_path)!r} lists {row['path']!r}, which does not exist")
            items.append(ImageItem(path, Path(row["path"]).as_posix(), row.get("prompt"), row.get("seed")))
    else:
        if need_prompts or prompt_files:
            raise EvaluationError(f"{str(folder)!r} has no manifest.json, so its images have no prompts "
                                  "(write it with generate.py)")
        items = [ImageItem(p, p.relative_to(folder).as_posix()) for p in list_image_files(folder)]
    if prompt_files:
        try:
            wanted = {p for f in prompt_files for p in read_prompt_file(f, "--prompts")}
        except PromptError as exc:
            raise EvaluationError(str(exc)) from exc
        items = [it for it in items if it.prompt in wanted]
    if not items:
        what = f" with a prompt from {list(prompt_files)}" if prompt_files else ""
        raise EvaluationError(f"no images{what} in {str(folder)!r}")
    return ImageSet(folder, items, settings, [str(f) for f in prompt_files])


def list_image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"image folder {str(folder)!r} not found")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_reference(folder: str | Path) -> ImageSet:
    folder = Path(folder)
    items = [ImageItem(p, p.relative_to(folder).as_posix()) for p in list_image_files(folder)]
    if not items:
        raise EvaluationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {str(folder)!r}")
    return ImageSet(folder, items)


def load_rgb(path: Path):
    """The image decoded in full (a file cut short fails here, not later as a wrong number)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:  # PIL reports damage with all three
        if Path(path).is_file() and Path(path).stat().st_size == 0:
            why = "the file is empty (0 bytes)"
        elif isinstance(exc, UnidentifiedImageError):
            why = "not an image file PIL can read (damaged or cut short at its start)"
        else:
            why = str(exc) if "truncated" in str(exc).lower() else f"damaged or cut short ({exc})"
        raise EvaluationError(f"cannot read image {str(path)!r}: {why}; regenerate or replace it") from exc


def check_readable(items: Sequence[ImageItem]) -> None:
    """Decode every image once, for scorers that read the files themselves (NudeNet through OpenCV, plug-in
    recognizers): a damaged file then stops the run with its name instead of crashing or being scored."""
    for it in items:
        load_rgb(it.path)
