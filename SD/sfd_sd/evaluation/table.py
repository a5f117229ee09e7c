"""A markdown table of forgetting vs preservation from evaluation JSONs (one row per model label).

Forgetting (lower is better): celebrity ``forget_accuracy``; NudeNet images with any EXPOSED detection
and the number of detections. Preservation: accuracy on other celebrities and CLIP score (higher is
better), FID against the reference set and against the original model (lower is better). A second table
lists NudeNet detections per class.
"""
from __future__ import annotations

from typing import Sequence

from .nudity import EXPOSED_CLASSES


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _cells(rec: dict) -> list[tuple[str, str, str]]:
    """-> [(group, column header, cell)] for one record."""
    t, s, ps = rec["totals"], rec.get("settings", {}), rec.get("prompt_set", "")
    m = rec["metric"]
    if m == "celebrity":
        return [("Forgetting", f"{t['forget']} acc. % ↓ ({ps})", f"{_pct(t['forget_accuracy'])} (n={t['forget_images']})"),
                ("Preservation", f"other celebrities acc. % ↑ ({ps})",
                 f"{_pct(t['other_accuracy'])} (n={t['other_images']})")]
    if m == "nudenet":
        thr = s.get("threshold")
        return [("Forgetting", f"NudeNet images with exposed ↓ ({ps}, thr {thr})",
                 f"{t['images_with_exposed']}/{t['images']} ({_pct(t['share_with_exposed'])}%)"),
                ("Forgetting", f"NudeNet exposed detections ↓ ({ps}, thr {thr})", str(t["detections"]))]
    if m == "clip_score":
        return [("Preservation", f"CLIP score ↑ ({ps})", f"{t['clip_score']:.2f} (n={t['images']})")]
    if m == "fid":
        out = []
        if t.get("fid_vs_reference") is not None:
            out.append(("Preservation", f"FID vs reference ↓ ({ps})", f"{t['fid_vs_reference']:.2f}"))
        if t.get("fid_vs_original") is not None:
            out.append(("Preservation", f"FID vs original model ↓ ({ps})", f"{t['fid_vs_original']:.2f}"))
        return out
    return []


def _table(rows: dict[str, dict[str, str]], columns: list[str]) -> list[str]:
    lines = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, cells in rows.items():
        lines.append(f"| {label} | " + " | ".join(cells.get(c, "–") for c in columns) + " |")
    return lines


def markdown_table(records: Sequence[dict], title: str = "SFD on SD v1.5: forgetting vs preservation") -> str:
    groups: dict[str, dict[str, dict[str, str]]] = {"Forgetting": {}, "Preservation": {}}
    columns: dict[str, list[str]] = {"Forgetting": [], "Preservation": []}
    labels = list(dict.fromkeys(r["label"] for r in records))
    for rec in records:
        for group, col, cell in _cells(rec):
            if col not in columns[group]:
                columns[group].append(col)
            groups[group].setdefault(rec["label"], {})[col] = cell
    lines = [f"# {title}", ""]
    for group in ("Forgetting", "Preservation"):
        if columns[group]:
            lines += [f"## {group}", ""]
            lines += _table({lab: groups[group].get(lab, {}) for lab in labels}, columns[group]) + [""]
    nude = [r for r in records if r["metric"] == "nudenet"]
    if nude:
        classes = [c for c in EXPOSED_CLASSES if any(c in r["totals"]["detections_per_class"] for r in nude)]
        lines += ["## NudeNet detections per class", ""]
        rows = {f"{r['label']} ({r.get('prompt_set', '')})": {c: str(r["totals"]["detections_per_class"].get(c, "–"))
                                                             for c in classes} for r in nude}
        lines += _table(rows, classes) + [""]
    lines += ["Settings (models, revisions, thresholds, detector and library versions) are in each JSON's "
              "`settings`.", ""]
    return "\n".join(lines)
