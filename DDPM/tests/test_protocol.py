"""The sampling protocol of every table (sfd_ddpm/protocol.py) and its statistics: the variants each
kind of model gets, their headers and NFE, the distillation target, the Student-t interval and the
separation marker."""
from __future__ import annotations

import math

import pytest

from conftest import TREE
from sfd_ddpm import protocol as P
from sfd_ddpm.config import load_config

DDPM_CFG = load_config(TREE / "configs/builtin_train.yaml")
EDM_CFG = load_config(TREE / "configs/builtin_edm_train.yaml")
SFD_CFG = load_config(TREE / "configs/builtin_sfd.yaml")


def test_multi_step_model_gets_unguided_and_guided_ddim():
    un, gu = P.multi_step_variants(DDPM_CFG, guidance=2.0, ddim_steps=50)
    assert (un.key, un.sampler, un.steps, un.guidance, un.eta, un.clip_x0) == ("unguided", "ddim", 50, 0.0, 0.0, True)
    assert (gu.key, gu.guidance, gu.w, gu.clip_x0) == ("guided", 2.0, 2.0, True)
    assert (un.nfe, gu.nfe) == (50, 100)       # DDIM-50 on T=1000: 50 grid timesteps, guided = 2 per step
    assert un.header == "DDIM-50, w=0, 50 NFE" and gu.header == "DDIM-50, w=2, 100 NFE"
    assert gu.label("SA") == "SA (DDIM-50, w=2, 100 NFE)"
    assert gu.sample_kwargs() == {"sampler": "ddim", "steps": 50, "eta": 0.0, "guidance": 2.0, "clip_x0": True}
    # the settings are read, not fixed
    un3, gu3 = P.multi_step_variants(DDPM_CFG, guidance=3.5, ddim_steps=3)
    assert (gu3.guidance, gu3.steps, un3.nfe, gu3.nfe) == (3.5, 3, 4, 8)   # DDIM-3: 0, 333, 666, 999


def test_edm_model_gets_heun():
    un, gu = P.multi_step_variants(EDM_CFG, guidance=2.0, edm_steps=18, ddim_steps=7)
    assert (un.sampler, un.steps, un.nfe, gu.nfe) == ("edm", 18, 35, 70)
    assert not un.clip_x0 and gu.header == "EDM-Heun-18, w=2, 70 NFE"


def test_generator_is_sampled_as_distilled():
    v = P.generator_variant(SFD_CFG)
    assert "guidance" not in SFD_CFG["sfd"] or SFD_CFG["sfd"]["guidance"] == 0
    assert (v.key, v.sampler, v.steps, v.guidance, v.nfe, v.w) == ("distilled", "one_step", 1, 0.0, 1, 0.0)
    assert v.header == "one-step, distilled at w=0, 1 NFE"
    guided = {**SFD_CFG, "sfd": {**SFD_CFG["sfd"], "guidance": 2.0}}
    g = P.generator_variant(guided)
    assert g.guidance == 0.0 and g.w == 2.0 and g.header == "one-step, distilled at w=2, 1 NFE"
    # a checkpoint config from before the key existed: 0
    old = {**SFD_CFG, "sfd": {k: v for k, v in SFD_CFG["sfd"].items() if k != "guidance"}}
    assert P.distilled_guidance(old) == 0.0
    assert P.variants_for({"kind": "sfd", "config": guided}) == [g]
    assert [v.key for v in P.variants_for({"kind": "ddpm", "config": DDPM_CFG})] == ["unguided", "guided"]


def test_distillation_target_is_the_teacher_at_the_generators_w():
    teacher = P.multi_step_variants(DDPM_CFG, guidance=2.0)
    g0 = P.generator_variant(SFD_CFG)
    g2 = P.generator_variant({**SFD_CFG, "sfd": {**SFD_CFG["sfd"], "guidance": 2.0}})
    g3 = P.generator_variant({**SFD_CFG, "sfd": {**SFD_CFG["sfd"], "guidance": 3.0}})
    assert P.distillation_target(g0, teacher).key == "unguided"
    assert P.distillation_target(g2, teacher).key == "guided"
    assert P.distillation_target(g3, teacher) is None
    extended = P.multi_step_variants(DDPM_CFG, guidance=2.0, extra_w=(3.0, 2.0, 0.0))
    assert [v.key for v in extended] == ["unguided", "guided", "w3"]
    assert P.distillation_target(g3, extended).w == 3.0


def test_checkpoint_variants_read_the_metadata(tiny_teacher):
    assert [v.key for v in P.checkpoint_variants(tiny_teacher, guidance=1.5, ddim_steps=2)] == ["unguided", "guided"]
    assert P.checkpoint_variants(tiny_teacher.parent, guidance=1.5)[1].guidance == 1.5


# -- statistics --------------------------------------------------------------------------------
def test_t_interval_by_hand():
    assert P.t95(1) == 12.706 and P.t95(2) == 4.303 and P.t95(30) == 2.042 and P.t95(31) == 1.960
    r = P.mean_interval([1.0, 3.0])            # s = sqrt(2), half = 12.706 * sqrt(2) / sqrt(2)
    assert r["mean"] == 2.0 and r["half"] == pytest.approx(12.706, abs=1e-12)
    assert (r["lo"], r["hi"]) == pytest.approx((2 - 12.706, 2 + 12.706))
    r = P.mean_interval([0.5, 0.7, 0.9])       # s = 0.2, half = 4.303 * 0.2 / sqrt(3)
    assert r["mean"] == pytest.approx(0.7) and r["half"] == pytest.approx(4.303 * 0.2 / math.sqrt(3), rel=1e-12)
    one = P.mean_interval([0.4])
    assert one["half"] is None and one["lo"] == one["hi"] == 0.4
    with pytest.raises(ValueError):
        P.mean_interval([])
    with pytest.raises(ValueError):
        P.t95(0)


def test_separation_marker_on_a_constructed_column():
    cell = lambda m, h: {"mean": m, "half": h, "lo": m - h, "hi": m + h}  # noqa: E731
    best, overlap, apart = cell(0.9, 0.05), cell(0.8, 0.06), cell(0.7, 0.1)
    # higher is better: 0.9 best; 0.8 +- 0.06 reaches 0.86 > 0.85 (overlaps); 0.7 +- 0.1 ends at 0.8 < 0.85
    assert P.column_marks([best, overlap, apart, None], True) == ["best", "", "sep", ""]
    # intervals that touch (0.25 + 0.25 = 0.75 - 0.25, exact in binary) overlap: not marked
    assert P.column_marks([cell(0.75, 0.25), cell(0.25, 0.25), cell(0.25, 0.125)], True) == ["best", "", "sep"]
    # lower is better: 0.7 is best, 0.9 +- 0.05 starts at 0.85 > 0.8: separated; 0.8 +- 0.06 overlaps
    assert P.column_marks([best, overlap, apart], False) == ["sep", "", "best"]
    # one seed: no intervals, nothing separates
    assert P.column_marks([P.mean_interval([0.9]), P.mean_interval([0.1])], True) == ["best", ""]
    assert P.format_cell(best, "best") == "**0.900** ± 0.050"
    assert P.format_cell(apart, "sep") == "0.700 ± 0.100 †" and P.format_cell(None) == "-"
    assert P.format_cell(P.mean_interval([0.25])) == "0.250"
