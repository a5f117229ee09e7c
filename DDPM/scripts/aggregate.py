#!/usr/bin/env python
"""Collect the rows written by the paper-table scripts into one Markdown table beside the paper's numbers.

Reads OUT/<row>/ua.json, OUT/<row>/fid.json (evaluate.py) and OUT/<row>/samples/settings.json (sample.py:
how the images were drawn) for the paper's rows pretrained, sfd, retrain, sa, salun, esd (missing ones
are listed as not run), the guided twins ROW_guided of the multi-step rows, and, when run, the labelled
rows sfd_guided, sid, sfd_2stage_authors, sfd_2stage and the EDM rows edm_teacher, edm_sid, edm_sfd.
Writes OUT/table.md (and prints it) and OUT/table.json. Every row names its sampling protocol (sampler,
steps, guidance, NFE: sfd_ddpm.protocol, the same labels as the demo and `make compare`). The reference
columns are the authors' own CIFAR-10 numbers (class 0 forgotten, FID on classes 1-9 against their 45k
training images), from the authors' evaluation logs of the SFD paper (Chen, Zhang and Zhou, "Score
Forgetting Distillation", ICLR 2025, arXiv:2409.11219), each placed beside the variant they sampled; they
are comparable only with DATASET=cifar10 at real scale and FID_FEATURES=inception. Rows with
OUT/<row>/attack.json (evaluate.py attack, run by the scripts unless ATTACKS=0) add the attack columns:
success rate of the noise search and of the better label-embedding search at the largest budget
(--no-attacks leaves them out).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click

TREE = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TREE))
from sfd_ddpm.checkpoints import CheckpointError, read_metadata  # noqa: E402
from sfd_ddpm.protocol import Variant  # noqa: E402  (one protocol label for every table)

# (row folder, name). Paper rows are listed (as "not run" when missing); the others only when run.
# Every multi-step model has two rows under one protocol (scripts/common.sh, GUIDED=1): ROW unguided and
# ROW_guided; each one-step generator has one row, sampled as it was distilled.
ROWS = [("pretrained", "pretrained DDPM"), ("sfd", "SFD one-step"), ("retrain", "Retrain"),
        ("sa", "Selective Amnesia"), ("salun", "SalUn"), ("esd", "ESD")]
MULTI_STEP = {"pretrained", "retrain", "sa", "salun", "esd"}
EXTRA_ROWS = [("sfd_guided", "SFD one-step, guided teacher (ours)"), ("sid", "SiD one-step (stage 1, nothing forgotten)"),
              ("sfd_2stage_authors", "SFD two-stage, authors' setting (teacher = stage-1 fake score)"),
              ("sfd_2stage", "SFD two-stage, our default (teacher = pretrained model)")]
# EDM backbone (scripts/edm_*.sh): listed only when run; the authors report no class-forgetting
# reference numbers for them (EDM's teacher FID 1.79 and SiD's 1.71 are over all ten classes).
EDM_ROWS = [("edm_teacher", "EDM teacher (Heun-18)"), ("edm_sid", "SiD one-step (EDM)"), ("edm_sfd", "SFD one-step (EDM)")]
# From the authors' evaluation logs of the SFD paper (arXiv:2409.11219), keyed by the row sampled as the
# authors sampled it: (guidance, IS, FID, precision, recall); SA has no reference number.
# The authors' ESD and SalUn numbers are guided (w = 2), the others not.
REFERENCE = {"pretrained": (0, 9.07, 4.84, 0.692, 0.553), "sfd": (0, 9.53, 5.32, 0.659, 0.547),
             "retrain": (0, 8.34, 7.94, 0.642, 0.520), "esd_guided": (2, 9.78, 12.68, 0.771, 0.385),
             "salun_guided": (2, 9.41, 11.25, 0.781, 0.318)}


def row_list(out: Path) -> list[tuple[str, str]]:
    """The rows to show: each paper row (then its guided twin when run), then the extra and EDM rows run."""
    rows = []
    for key, name in ROWS:
        rows.append((key, name))
        if key in MULTI_STEP and (out / f"{key}_guided").exists():
            rows.append((f"{key}_guided", f"{name}, guided"))
    return rows + [(k, n) for k, n in EXTRA_ROWS + EDM_ROWS if (out / k).exists()]


def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def protocol_of(settings: dict) -> dict:
    """How a row's images were drawn (sample.py's settings.json): sampler, steps, guidance, NFE and, for a
    one-step generator, the guidance its teacher was distilled at (read from the checkpoint's config)."""
    sampler = settings["sampler"]
    distilled = None
    if sampler == "one_step":
        try:
            meta = read_metadata(settings["checkpoint"])
            distilled = float(meta["config"].get("sfd", {}).get("guidance", 0.0) or 0.0)
        except (OSError, KeyError, ValueError, CheckpointError):
            distilled = None  # the checkpoint moved: say nothing rather than guess
    guidance, nfe = float(settings.get("guidance") or 0.0), settings.get("nfe_per_image")
    # ddpm's settings record no step count: its steps are its evaluations (two per step when guided)
    steps = settings.get("steps") or (nfe // (2 if guidance else 1) if nfe else 1)
    variant = Variant("row", sampler, steps, guidance, nfe, distilled_w=distilled)
    return {**variant.as_dict(), "label": variant.header if distilled is not None or sampler != "one_step"
            else f"one-step, {nfe} NFE"}


def collect(out: Path) -> list[dict]:
    rows = []
    for key, name in row_list(out):
        ua_path, fid_path = out / key / "ua.json", out / key / "fid.json"
        row = {"row": key, "name": name, "ran": ua_path.exists() and fid_path.exists()}
        settings = out / key / "samples" / "settings.json"
        if settings.exists():
            row["protocol"] = protocol_of(json.loads(settings.read_text()))
        if row["ran"]:
            ua = json.loads(ua_path.read_text())["results"]
            fid = json.loads(fid_path.read_text())
            res = fid["results"]
            prefix = "classifier_" if "classifier_fid" in res else ""
            row.update(ua=ua["ua"], remaining_acc=ua.get("remaining_accuracy"), fid=res.get(prefix + "fid"),
                       fid_kind="classifier" if prefix else "inception", is_mean=res.get("is_mean"),
                       precision=res.get(prefix + "precision"), recall=res.get(prefix + "recall"))
        attack_path = out / key / "attack.json"
        if attack_path.exists():
            rec = json.loads(attack_path.read_text())
            res, budget = rec["results"], rec["settings"]["budgets"][-1]
            row.update(attack_budget=budget, noise_attack=res["at_budget"].get("noise", {}).get("success_rate"),
                       embedding_attack=(res["embedding_best"] or {}).get("success_rate"))
        rows.append(row)
    return rows


def targets(rows: list[dict]) -> list[str]:
    """Which row each one-step generator was distilled from: the pretrained model at the guidance of its
    teacher's score (sfd.guidance), sampled by the multi-step protocol."""
    notes = []
    for r in rows:
        w = r.get("protocol", {}).get("distilled_w")
        if w is not None and r["row"] not in ("edm_sid", "edm_sfd"):
            target = "pretrained" if w == 0 else "pretrained_guided"
            notes.append(f"{r['name']} distils the pretrained model at w = {w:g}: compare it with row "
                         f"{target}" + ("" if any(x["row"] == target and x["ran"] for x in rows) else " (not run)") + ".")
    return notes


def table(rows: list[dict], attacks: bool = True) -> str:
    budgets = sorted({r["attack_budget"] for r in rows if "attack_budget" in r})
    attacks = attacks and bool(budgets)
    at = "@" + "/".join(map(str, budgets)) if attacks else ""
    extra = f" noise attack {at} | embedding attack {at} |" if attacks else ""
    head = (f"| model | sampling (NFE per image) | UA | remaining acc | FID (ours) | IS | precision | recall |{extra} "
            "ref. w | ref. IS | ref. FID | ref. precision | ref. recall |")
    lines = [head, "|" + "---|" * head.count(" |")]  # one delimiter cell per header cell (GFM tables)
    for r in rows:
        ref = REFERENCE.get(r["row"], (None,) * 5)
        keys = ("ua", "remaining_acc", "fid", "is_mean", "precision", "recall") + (
            ("noise_attack", "embedding_attack") if attacks else ())
        ours = [_fmt(r.get(k)) for k in keys] if r["ran"] else ["not run"] + ["-"] * (len(keys) - 1)
        lines.append(f"| {r['name']} | {r.get('protocol', {}).get('label', '-')} | {' | '.join(ours)} | {' | '.join(_fmt(v, 2) for v in ref)} |")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, exists=True),
              help="The scripts' OUT folder (e.g. runs/paper-cifar10).")
@click.option("--no-attacks", is_flag=True, help="Leave out the attack columns even where attack.json exists.")
def main(out, no_attacks):
    """Write OUT/table.md: our numbers beside the SFD paper's reference numbers (arXiv:2409.11219)."""
    out = Path(out)
    rows = collect(out)
    if not any(r["ran"] for r in rows):
        raise click.ClickException(f"no evaluated rows (ROW/ua.json + ROW/fid.json) under {out}")
    kinds = sorted({r["fid_kind"] for r in rows if r["ran"]})
    text = (f"# Class forgetting ({out})\n\nOur FID: {', '.join(kinds)} features. Reference: the authors' CIFAR-10 "
            f"evaluation logs of the SFD paper (arXiv:2409.11219; class 0 forgotten, FID on classes 1-9)."
            + ("" if no_attacks or not any("attack_budget" in r for r in rows) else
               " Attack columns: share of attacked images classified as the forget class after that many gradient "
               "steps of a white-box search (evaluate.py attack; see README, \"Attacks\").")
            + f"\n\n{table(rows, not no_attacks)}\n"
            + "".join(f"\n- {note}" for note in targets(rows)) + "\n")
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    click.echo(text)


if __name__ == "__main__":
    main()
