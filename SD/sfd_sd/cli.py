"""Small click helpers: options shown in named groups in ``--help``, and range parsing."""
from __future__ import annotations

import re

import click


class GroupedOption(click.Option):
    def __init__(self, *args, group: str = "Other", **kwargs):
        kwargs.setdefault("show_default", True)
        super().__init__(*args, **kwargs)
        self.group = group


class GroupedCommand(click.Command):
    def format_options(self, ctx, formatter):
        groups: dict[str, list] = {}
        for param in self.get_params(ctx):
            rec = param.get_help_record(ctx)
            if rec is not None:
                groups.setdefault(getattr(param, "group", "Other"), []).append(rec)
        for name, recs in groups.items():
            with formatter.section(f"{name} options"):
                formatter.write_dl(recs)


def option(*args, group: str, **kwargs):
    return click.option(*args, cls=GroupedOption, group=group, **kwargs)


class SeedRange(click.ParamType):
    """'0-19', '0,5,7' or '0-3,10' -> list of ints."""

    name = "SEEDS"

    def convert(self, value, param, ctx):
        if isinstance(value, list):
            return value
        seeds: list[int] = []
        for part in str(value).split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
            if not m:
                self.fail(f"{value!r} is not a seed list like '0-19' or '0,3,7'", param, ctx)
            lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
            if hi < lo:
                self.fail(f"empty range {part!r}", param, ctx)
            seeds.extend(range(lo, hi + 1))
        return seeds
