"""prepare_remain_prompts.py: captions -> a remain-prompt file (filters, dedup, seeded sample)."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner


def run(*args):
    from prepare_remain_prompts import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def caption_csv(tmp_path):
    rows = [{"url": f"u{i}", "TEXT": f"a painting of a lighthouse number {i}"} for i in range(50)]
    rows += [{"url": "d1", "TEXT": "A Painting Of A Lighthouse Number 3"},       # duplicate (case)
             {"url": "s", "TEXT": "tiny"},                                          # too short
             {"url": "l", "TEXT": "x" * 400},                                       # too long
             {"url": "m", "TEXT": "two\nlines   in one caption"}]                   # newline inside a field
    path = tmp_path / "captions.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["url", "TEXT"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_filters_dedups_and_samples_with_the_seed(caption_csv, tmp_path):
    from sfd_sd.prompts import read_prompt_file

    res = run("--captions", caption_csv, "-n", "20", "--seed", "3", "--out", tmp_path / "a.txt")
    assert res.exit_code == 0, res.output
    stats = json.loads((tmp_path / "a.json").read_text())
    assert (stats["read"], stats["too_short"], stats["too_long"], stats["duplicates"], stats["eligible"],
            stats["written"]) == (54, 1, 1, 1, 51, 20)
    a = read_prompt_file(tmp_path / "a.txt")
    assert len(a) == len(set(a)) == 20 and all(10 <= len(p) <= 300 for p in a)
    run("--captions", caption_csv, "-n", "20", "--seed", "3", "--out", tmp_path / "b.txt")
    run("--captions", caption_csv, "-n", "20", "--seed", "4", "--out", tmp_path / "c.txt")
    assert read_prompt_file(tmp_path / "b.txt") == a and read_prompt_file(tmp_path / "c.txt") != a
    res = run("--captions", caption_csv, "-n", "1000", "--out", tmp_path / "all.txt")
    everything = read_prompt_file(tmp_path / "all.txt")
    assert len(everything) == 51 and "two lines in one caption" in everything


def test_column_errors_are_clean(caption_csv, tmp_path):
    res = run("--captions", caption_csv, "--column", "caption", "--out", tmp_path / "x.txt")
    assert res.exit_code == 1 and "no caption column" in res.output and "--column" in res.output
    (tmp_path / "bad.csv").write_bytes(b"TEXT\ncaf\xe9 au lait in paris\n")
    res = run("--captions", tmp_path / "bad.csv", "--out", tmp_path / "x.txt")
    assert res.exit_code == 1 and "not UTF-8" in res.output
    assert not (tmp_path / "x.txt").exists()


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"TEXT": [f"a photo of a red car number {i}" for i in range(30)]}), tmp_path / "c.parquet")
    res = run("--captions", tmp_path / "c.parquet", "-n", "10", "--out", tmp_path / "p.txt")
    assert res.exit_code == 0, res.output
    assert len((tmp_path / "p.txt").read_text().splitlines()) == 10
