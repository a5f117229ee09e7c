#!/usr/bin/env python
"""Collect the rows written by the paper-table scripts into one markdown table beside SPEC section 7.

Reads OUT/<row>/ua.json and OUT/<row>/fid.json (evaluate.py) for the rows pretrained, sfd, retrain,
sa, salun, esd (missing rows are listed as not run) and writes OUT/table.md (and prints it). The
reference columns are the authors' own CIFAR-10 numbers (class 0 forgotten, FID on classes 1-9
against their 45k training images); they are comparable only with DATASET=cifar10 at real scale
and FID_FEATURES=inception. Rows with OUT/<row>/attack.json (evaluate.py attack, run by the scripts
unless ATTACKS=0) add the attack columns: success rate of the noise search and of the better
label-embedding search at the largest budget (--no-attacks leaves them out).
"""
from __future__ import annotations

import json
from pathlib import Path

import click

ROWS = [("pretrained", "pretrained DDPM"), ("sfd", "SFD one-step"), ("retrain", "Retrain"),
        ("sa", "Selective Amnesia"), ("salun", "SalUn"), ("esd", "ESD")]
# SPEC section 7: (guidance, IS, FID, precision, recall); SA has no reference number.
REFERENCE = {"pretrained": (0, 9.07, 4.84, 0.692, 0.553), "sfd": (0, 9.53, 5.32, 0.659, 0.547),
             "retrain": (0, 8.34, 7.94, 0.642, 0.520), "esd": (2, 9.78, 12.68, 0.771, 0.385),
             "salun": (2, 9.41, 11.25, 0.781, 0.318)}


def _fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def collect(out: Path) -> list[dict]:
    rows = []
    for key, name in ROWS:
        ua_path, fid_path = out / key / "ua.json", out / key / "fid.json"
        row = {"row": key, "name": name, "ran": ua_path.exists() and fid_path.exists()}
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


def table(rows: list[dict], attacks: bool = True) -> str:
    budgets = sorted({r["attack_budget"] for r in rows if "attack_budget" in r})
    attacks = attacks and bool(budgets)
    at = "@" + "/".join(map(str, budgets)) if attacks else ""
    extra = f" noise attack {at} | embedding attack {at} |" if attacks else ""
    head = (f"| model | UA | remaining acc | FID (ours) | IS | precision | recall |{extra}| ref. w | ref. IS | ref. FID | "
            "ref. precision | ref. recall |")
    lines = [head, "|---|---|---|---|---|---|---|" + ("---|---|" if attacks else "") + "|---|---|---|---|---|"]
    for r in rows:
        ref = REFERENCE.get(r["row"], (None,) * 5)
        keys = ("ua", "remaining_acc", "fid", "is_mean", "precision", "recall") + (
            ("noise_attack", "embedding_attack") if attacks else ())
        ours = [_fmt(r.get(k)) for k in keys] if r["ran"] else ["not run"] + ["-"] * (len(keys) - 1)
        lines.append(f"| {r['name']} | {' | '.join(ours)} || {' | '.join(_fmt(v, 2) for v in ref)} |")
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, exists=True),
              help="The scripts' OUT folder (e.g. runs/paper-cifar10).")
@click.option("--no-attacks", is_flag=True, help="Leave out the attack columns even where attack.json exists.")
def main(out, no_attacks):
    """Write OUT/table.md: our numbers beside the reference numbers of SPEC section 7."""
    out = Path(out)
    rows = collect(out)
    if not any(r["ran"] for r in rows):
        raise click.ClickException(f"no evaluated rows (ROW/ua.json + ROW/fid.json) under {out}")
    kinds = sorted({r["fid_kind"] for r in rows if r["ran"]})
    text = (f"# Class forgetting ({out})\n\nOur FID: {', '.join(kinds)} features. Reference: the authors' CIFAR-10 "
            f"evaluation logs (SPEC section 7; class 0 forgotten, FID on classes 1-9)."
            + ("" if no_attacks or not any("attack_budget" in r for r in rows) else
               " Attack columns: share of attacked images classified as the forget class after that many gradient "
               "steps of a white-box search (evaluate.py attack; see README, \"Attacks\").")
            + f"\n\n{table(rows, not no_attacks)}\n")
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    click.echo(text)


if __name__ == "__main__":
    main()
