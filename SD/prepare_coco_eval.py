"""COCO captions and real images for the preservation metrics (CLIP score, FID vs reference).

Download the COCO 2014 validation images and caption annotations yourself (cocodataset.org:
`val2014.zip` and `annotations_trainval2014.zip`), unzip them, then:

  python SD/prepare_coco_eval.py --annotations annotations/captions_val2014.json --images val2014 \\
      -n 1000 --captions-out SD/data/coco_captions.txt --reference-out SD/data/coco_val2014

N images are drawn with the seed; each gives one caption (its first, whitespace-normalised; an image
whose caption repeats an earlier one, case-insensitively, is skipped) to the caption file, one per
line, and its JPEG to the reference folder (hard-linked when the file system allows, else copied).
`--reference all` puts every image of the annotations there instead. Both outputs are new: they are
written under temporary names and renamed when complete; the counts go to `<captions-out>.json`.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import click


class CocoError(ValueError):
    pass


def read_annotations(path: Path) -> tuple[dict[int, str], dict[int, str]]:
    """{image id: file name} and {image id: first caption} of a COCO captions file."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        files = {int(im["id"]): str(im["file_name"]) for im in data["images"]}
        anns = sorted(data["annotations"], key=lambda a: int(a["id"]))
        first: dict[int, str] = {}
        for a in anns:
            first.setdefault(int(a["image_id"]), " ".join(str(a["caption"]).split()))
    except (ValueError, KeyError, TypeError) as exc:
        raise CocoError(f"--annotations {str(path)!r}: not a COCO captions file (captions_val2014.json: 'images' "
                        f"with id and file_name, 'annotations' with id, image_id and caption): {exc!r}") from None
    return files, {i: c for i, c in first.items() if c and i in files}


def choose(captions: dict[int, str], n: int, seed: int) -> list[int]:
    """N image ids with distinct captions, drawn with the seed (all eligible ones when fewer)."""
    seen, eligible = set(), []
    for image_id in sorted(captions):
        key = captions[image_id].lower()
        if key not in seen:
            seen.add(key)
            eligible.append(image_id)
    return random.Random(seed).sample(eligible, min(n, len(eligible)))


def fill_reference(out: Path, images: Path, names: list[str]) -> None:
    """``out`` holding ``names`` from ``images``: linked or copied into a temporary folder, then renamed."""
    missing = [n for n in names if not (images / n).is_file()]
    if missing:
        raise CocoError(f"--images {str(images)!r}: {len(missing)} of the {len(names)} images are missing "
                        f"(e.g. {missing[0]}); give the unzipped val2014 folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        for name in names:
            try:
                os.link(images / name, tmp / name)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(images / name, tmp / name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False), metavar="JSON",
              help="COCO captions annotations, e.g. annotations/captions_val2014.json.")
@click.option("--images", required=True, type=click.Path(exists=True, file_okay=False), metavar="DIR",
              help="The images the annotations name, e.g. the unzipped val2014/ folder.")
@click.option("-n", "n", type=click.IntRange(min=1), default=1000,
              help="Images (and captions) to draw; the field reports FID on 10k-30k.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Sampling seed.")
@click.option("--reference", type=click.Choice(["selected", "all"]), default="selected",
              help="Reference folder: the images of the drawn captions, or every image of the annotations.")
@click.option("--captions-out", required=True, type=click.Path(dir_okay=False), metavar="TXT",
              help="Caption file to write (evaluate.py --prompts, generate.py --prompts).")
@click.option("--reference-out", required=True, type=click.Path(file_okay=False), metavar="DIR",
              help="New folder for the real images (evaluate.py fid --reference-images).")
def main(annotations, images, n, seed, reference, captions_out, reference_out):
    """Write N COCO captions (one per line) and a folder of real COCO images for FID."""
    from sfd_sd.checkpoints import atomic_write_bytes, atomic_write_json

    captions_out, reference_out = Path(captions_out), Path(reference_out)
    try:
        for path, what in ((captions_out, "--captions-out"), (reference_out, "--reference-out")):
            if path.exists():
                raise CocoError(f"{what} {str(path)!r} exists: choose a new name (nothing is overwritten)")
        files, captions = read_annotations(Path(annotations))
        chosen = choose(captions, n, seed)
        if not chosen:
            raise CocoError(f"--annotations {annotations!r}: no image with a caption")
        names = [files[i] for i in (chosen if reference == "selected" else sorted(files))]
        fill_reference(reference_out, Path(images), names)
    except CocoError as exc:
        raise click.ClickException(str(exc)) from exc
    atomic_write_bytes(captions_out, ("\n".join(captions[i] for i in chosen) + "\n").encode("utf-8"))
    digest = hashlib.sha256(Path(annotations).read_bytes()).hexdigest()
    atomic_write_json(captions_out.with_suffix(".json"), dict(
        annotations=str(Path(annotations).resolve()), annotations_sha256=digest, images_in_annotations=len(files),
        captioned_images=len(captions), captions=len(chosen), seed=seed, reference=reference,
        reference_images=len(names), reference_folder=str(reference_out.resolve()),
        image_ids=chosen))
    click.echo(f"wrote {len(chosen)} captions to {captions_out} and {len(names)} images to {reference_out}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
