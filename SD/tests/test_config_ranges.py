"""Every numeric key of the SD schema has a valid range, checked before any model loads (issue 26 item 6).

In-process and model-free: the values go through the real resolve path (``load_config`` overrides, then
``TrainConfig.check``), and one case through ``train.py``'s CLI."""
from __future__ import annotations

import dataclasses
import math

import pytest
from click.testing import CliRunner

from sfd_sd import config as C

# check() needs these before it looks at anything else; they name no file it opens
REQUIRED = ("remain_prompts=r.txt", "concept_to_forget=brad pitt", "concept_to_override=a man")


def _is_int(key: str) -> bool:
    return C._TYPES[key] in (int, int | None)


def out_of_range(key: str, valid: C.Range) -> list:
    """Values just outside ``valid`` on each bounded side, plus nan and inf for float keys."""
    step = 1 if _is_int(key) else 0.5
    bad = []
    if valid.lo is not None:
        bad.append(valid.lo if valid.lo_open else valid.lo - step)
    if valid.hi is not None:
        bad.append(valid.hi if valid.hi_open else valid.hi + step)
    if not _is_int(key):
        bad += [math.nan, math.inf]
    return bad


def in_range_edges(key: str, valid: C.Range) -> list:
    return [v for v in (valid.lo, valid.hi) if v is not None and v in valid]


def test_every_numeric_key_has_a_range_and_every_range_a_key():
    assert C.unranged_keys() == []
    assert set(C.RANGES) <= {f.name for f in C.schema_fields()}


def test_a_new_numeric_key_without_a_range_is_caught():
    """The coverage check itself: a rate added to the schema without a RANGES entry is reported."""
    @dataclasses.dataclass
    class Grown(C.TrainConfig):
        lr_new: float = C.K(1e-4, "a new learning rate", "Optimiser")
        betas_new: list[float] = C.K([0.9], "new decay rates", "Optimiser")
        warmup_new: int | None = C.K(None, "a new optional count", "Schedule")
        name_new: str = C.K("x", "not a number: needs no range", "I/O")

    assert C.unranged_keys(Grown) == ["lr_new", "betas_new", "warmup_new"]


def test_defaults_and_closed_edges_are_accepted():
    C.load_config(overrides=REQUIRED).check()
    for key, valid in C.RANGES.items():
        for v in in_range_edges(key, valid):
            value = [v, v] if key == "adam_betas" else v
            C.check_ranges(C.load_config(overrides=[*REQUIRED, f"{key}={value}"]))


@pytest.mark.parametrize("key", sorted(C.RANGES))
def test_each_out_of_range_value_is_refused_with_key_value_and_range(key):
    valid = C.RANGES[key]
    for v in out_of_range(key, valid):
        value = [0.0, v] if key == "adam_betas" else v
        cfg = C.load_config(overrides=[*REQUIRED, f"{key}={value!r}".replace("nan", ".nan").replace("inf", ".inf")])
        with pytest.raises(C.ConfigError) as err:
            cfg.check()
        msg = str(err.value)
        assert msg.startswith(f"{key} must ") and f" {valid}" in msg and f"got {getattr(cfg, key)!r}" in msg, msg
        assert "\n" not in msg


@pytest.mark.parametrize("override, message", [
    ("ema_rampup=1.5", "ema_rampup must be in [0, 1], got 1.5"),        # the EMA case, SD's EMA knob
    ("ema_halflife_kimg=-1", "ema_halflife_kimg must be >= 0, got -1.0"),
    ("prompt_dropout=-0.1", "prompt_dropout must be in [0, 1], got -0.1"),
    ("lr_gen=0", "lr_gen must be > 0, got 0.0"),
    ("lr_fake=.nan", "lr_fake must be > 0, got nan"),
    ("adam_betas=[0.9, 1.0]", "adam_betas must each be in [0, 1), got [0.9, 1.0]"),
    ("adam_eps=0", "adam_eps must be > 0 (or null), got 0.0"),
    ("w_gen_forget=-0.01", "w_gen_forget must be >= 0, got -0.01"),
    ("kappa_teacher=0", "kappa_teacher must be > 0, got 0.0"),
    ("alpha=-1", "alpha must be >= 0, got -1.0"),
    ("t_init=1000", "t_init must be in [1, 999], got 1000"),
])
def test_the_intended_ranges(override, message):
    """Independent of the table: the ranges the method allows (docs/method.md section 3)."""
    with pytest.raises(C.ConfigError, match=None) as err:
        C.load_config(overrides=[*REQUIRED, override]).check()
    assert str(err.value) == message


def test_range_wording():
    assert str(C.POSITIVE) == "> 0" and str(C.NON_NEGATIVE) == ">= 0" and str(C.UNIT) == "in [0, 1]"
    assert str(C.RANGES["adam_betas"]) == "in [0, 1)" and 1.0 not in C.RANGES["adam_betas"]
    assert 0.0 not in C.POSITIVE and 0.0 in C.NON_NEGATIVE and math.nan not in C.UNIT


def test_train_cli_refuses_a_probability_above_1_before_any_work(tmp_path):
    """One line, exit 1, no run folder, no model loaded (sd_model names no folder)."""
    from train import main

    res = CliRunner().invoke(main, [*REQUIRED, f"sd_model={tmp_path / 'no-model'}", "generator_init=teacher",
                                    f"outdir={tmp_path / 'runs'}", "prompt_dropout=1.5"])
    assert res.exit_code == 1, res.output
    assert res.output.strip().splitlines() == ["Error: prompt_dropout must be in [0, 1], got 1.5"]
    assert not (tmp_path / "runs").exists()


def test_list_keys_shows_the_range():
    assert "\n    Adam learning rate of the generator [> 0]" in "\n".join(C.describe())
