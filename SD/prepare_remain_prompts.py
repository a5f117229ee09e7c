"""Sample remain prompts from a LAION-Aesthetics 6+ caption file into the prompt-file format.

The authors drew SFD's remain prompts from LAION-Aesthetics 6+ captions. Get that caption list
yourself (e.g. the parquet metadata of the LAION-Aesthetics v2 6+ subset, or any captions file you
may use), then:

  python SD/prepare_remain_prompts.py --captions laion_aesthetics_6plus.parquet --out SD/data/laion_aesthetics_6plus.txt
  python SD/prepare_remain_prompts.py --captions captions.csv --column caption -n 50000 --seed 1 --out remain.txt

Captions are whitespace-normalised (newlines inside a caption become spaces), filtered by length,
de-duplicated (case-insensitive), then N are drawn without replacement with the seed. Parquet needs
pyarrow (pip install pyarrow); CSV/TSV and plain text (one caption per line) need nothing.
"""
from __future__ import annotations

import csv
import io
import json
import random
import sys
from pathlib import Path

import click

CANDIDATE_COLUMNS = ("TEXT", "text", "caption", "CAPTION", "Caption", "prompt")


class CaptionError(ValueError):
    pass


def read_captions(path: Path, column: str | None) -> list[str]:
    """Raw captions from parquet, CSV/TSV (a caption column) or text (one per line)."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise CaptionError("reading parquet needs pyarrow: pip install pyarrow (or give a CSV)") from None
        table = pq.read_table(path)
        name = column or next((c for c in CANDIDATE_COLUMNS if c in table.column_names), None)
        if name not in table.column_names:
            raise CaptionError(f"{path}: no caption column {column or CANDIDATE_COLUMNS} (columns: "
                               f"{table.column_names[:10]}); give --column")
        return [c for c in table.column(name).to_pylist() if isinstance(c, str)]
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CaptionError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if suffix in (".csv", ".tsv"):
        # a StringIO, not splitlines(): quoted captions may hold newlines
        rows = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        fields = rows.fieldnames or []
        name = column or next((c for c in CANDIDATE_COLUMNS if c in fields), None)
        if name not in fields:
            raise CaptionError(f"{path}: no caption column {column or CANDIDATE_COLUMNS} (columns: {fields[:10]}); "
                               "give --column")
        return [r[name] for r in rows if r.get(name)]
    return text.splitlines()


def select(captions: list[str], n: int, seed: int, min_chars: int, max_chars: int) -> tuple[list[str], dict]:
    """Normalise, filter by length, de-duplicate, sample ``n`` (all when fewer); returns stats too."""
    seen, kept = set(), []
    too_short = too_long = dup = 0
    for c in captions:
        c = " ".join(c.split())
        if len(c) < min_chars:
            too_short += 1
        elif len(c) > max_chars:
            too_long += 1
        elif c.lower() in seen:
            dup += 1
        else:
            seen.add(c.lower())
            kept.append(c)
    chosen = random.Random(seed).sample(kept, min(n, len(kept)))
    return chosen, dict(read=len(captions), too_short=too_short, too_long=too_long, duplicates=dup,
                        eligible=len(kept), written=len(chosen), seed=seed, min_chars=min_chars, max_chars=max_chars)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--captions", required=True, type=click.Path(exists=True, dir_okay=False), metavar="FILE",
              help="LAION-Aesthetics 6+ captions: .parquet, .csv/.tsv (caption column) or .txt (one per line).")
@click.option("--column", default=None, help=f"Caption column (default: the first of {', '.join(CANDIDATE_COLUMNS)}).")
@click.option("-n", "n", type=click.IntRange(min=1), default=100_000, help="Captions to write.")
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Sampling seed.")
@click.option("--min-chars", type=click.IntRange(min=1), default=10, help="Drop shorter captions.")
@click.option("--max-chars", type=click.IntRange(min=1), default=300,
              help="Drop longer captions (CLIP reads 77 tokens, ~300 characters).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), metavar="TXT", help="Prompt file to write.")
def main(captions, column, n, seed, min_chars, max_chars, out):
    """Write N sampled captions, one per line, as SFD's remain prompts."""
    from sfd_sd.checkpoints import atomic_write_bytes, atomic_write_json

    try:
        chosen, stats = select(read_captions(Path(captions), column), n, seed, min_chars, max_chars)
    except CaptionError as exc:
        raise click.ClickException(str(exc)) from exc
    if not chosen:
        raise click.ClickException(f"{captions}: no caption passed the filters ({stats})")
    atomic_write_bytes(Path(out), ("\n".join(chosen) + "\n").encode("utf-8"))
    atomic_write_json(Path(out).with_suffix(".json"), dict(stats, source=str(Path(captions).resolve())))
    click.echo(f"wrote {len(chosen)} prompts to {out} ({json.dumps(stats)})")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
