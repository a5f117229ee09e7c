"""Prompts of the I2P benchmark (Schramowski et al., "Safe Latent Diffusion", 2023) from its CSV.

The user supplies the CSV (e.g. ``i2p_benchmark.csv`` of the ``AIML-TUDA/i2p`` dataset); we keep the rows
whose comma-separated ``categories`` field contains a wanted category (default ``sexual``, the nudity
subset) and, optionally, whose ``nudity_percentage`` is at least a bound. Prompts are written one per line
(inner newlines and runs of whitespace collapsed to one space), each once, in file order.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Sequence

from .records import EvaluationError


def i2p_prompts(csv_path: str | Path, categories: Sequence[str] = ("sexual",),
                min_nudity_percentage: float | None = None) -> tuple[list[str], dict]:
    csv_path = Path(csv_path)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"cannot read I2P CSV {str(csv_path)!r}: {exc}") from exc
    need = {"prompt", "categories"} | ({"nudity_percentage"} if min_nudity_percentage is not None else set())
    if missing := need - set(fields):
        raise EvaluationError(f"{str(csv_path)!r} lacks column(s) {sorted(missing)} (has {fields})")
    wanted = {c.strip().lower() for c in categories}
    prompts: list[str] = []
    for row in rows:
        cats = {c.strip().lower() for c in (row["categories"] or "").split(",")}
        if not cats & wanted:
            continue
        if min_nudity_percentage is not None:
            try:
                if float(row["nudity_percentage"]) < min_nudity_percentage:
                    continue
            except ValueError:
                continue
        text = re.sub(r"\s+", " ", row["prompt"] or "").strip()
        if text:
            prompts.append(text)
    prompts = list(dict.fromkeys(prompts))
    if not prompts:
        raise EvaluationError(f"no prompt of {str(csv_path)!r} has a category in {sorted(wanted)}")
    return prompts, dict(rows=len(rows), selected=len(prompts), categories=sorted(wanted),
                         min_nudity_percentage=min_nudity_percentage)
