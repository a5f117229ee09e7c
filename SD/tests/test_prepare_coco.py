"""prepare_coco_eval.py: COCO captions and the matching real images, as evaluate.py reads them."""
from __future__ import annotations

import json

from click.testing import CliRunner


def coco(tmp_path, n_images=6):
    """A captions_val2014.json-shaped file: two captions per image, images 4 and 5 share one caption."""
    images = tmp_path / "val2014"
    images.mkdir()
    entries, anns = [], []
    for i in range(n_images):
        name = f"COCO_val2014_{i:012d}.jpg"
        (images / name).write_bytes(bytes([i]) * 10)
        entries.append({"id": i, "file_name": name})
        first = "a dog on a red  sofa" if i in (4, 5) else f"picture number {i}"
        anns += [{"id": 100 + 2 * i, "image_id": i, "caption": f" {first}\n"},
                 {"id": 101 + 2 * i, "image_id": i, "caption": f"second caption {i}"}]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": entries, "annotations": anns[::-1]}))
    return path, images


def run(*args):
    from prepare_coco_eval import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_captions_and_reference_images_match(tmp_path):
    ann, images = coco(tmp_path)
    out_txt, out_ref = tmp_path / "coco_captions.txt", tmp_path / "coco_ref"
    res = run("--annotations", ann, "--images", images, "-n", 4, "--captions-out", out_txt, "--reference-out", out_ref)
    assert res.exit_code == 0, res.output
    captions = out_txt.read_text().splitlines()
    meta = json.loads(out_txt.with_suffix(".json").read_text())
    ids = meta["image_ids"]
    assert len(captions) == len(ids) == 4 and len(set(ids)) == 4 and not {4, 5} <= set(ids)  # one of the twins
    for i, caption in zip(ids, captions):  # each image's first caption (by annotation id), normalised
        assert caption == ("a dog on a red sofa" if i in (4, 5) else f"picture number {i}")
    assert sorted(p.name for p in out_ref.iterdir()) == sorted(f"COCO_val2014_{i:012d}.jpg" for i in ids)
    assert (out_ref / f"COCO_val2014_{ids[0]:012d}.jpg").read_bytes() == bytes([ids[0]]) * 10
    assert meta["captions"] == 4 and meta["reference_images"] == 4 and meta["captioned_images"] == 6

    res = run("--annotations", ann, "--images", images, "--captions-out", out_txt, "--reference-out", tmp_path / "x")
    assert res.exit_code == 1 and "exists" in res.output and not (tmp_path / "x").exists()  # nothing overwritten
    res = run("--annotations", ann, "--images", images, "--reference", "all", "--captions-out", tmp_path / "c.txt",
              "--reference-out", tmp_path / "all")
    assert res.exit_code == 0 and len(list((tmp_path / "all").iterdir())) == 6
    assert len((tmp_path / "c.txt").read_text().splitlines()) == 5  # 6 images, one repeated caption


def test_bad_annotations_or_missing_images_leave_nothing(tmp_path):
    ann, images = coco(tmp_path)
    (images / "COCO_val2014_000000000003.jpg").unlink()
    res = run("--annotations", ann, "--images", images, "-n", 6, "--captions-out", tmp_path / "c.txt",
              "--reference-out", tmp_path / "ref")
    assert res.exit_code == 1 and "1 of the 5 images are missing" in res.output.strip().splitlines()[-1]
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    res = run("--annotations", tmp_path / "bad.json", "--images", images, "--captions-out", tmp_path / "c.txt",
              "--reference-out", tmp_path / "ref")
    assert res.exit_code == 1 and "not a COCO captions file" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.json", "captions_val2014.json", "val2014"]
