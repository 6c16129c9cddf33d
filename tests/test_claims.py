"""The verdict rules: each outcome on hand-picked numbers."""
import math

import pytest

from moe_core import claims


def test_direction():
    assert claims.direction(-0.04, -0.01, "negative", "x").outcome == claims.AGREES
    assert claims.direction(0.01, 0.04, "negative", "x").outcome == claims.DISAGREES
    assert claims.direction(-0.01, 0.01, "positive", "x").outcome == claims.UNDECIDED
    assert "90% CI" in claims.direction(0.01, 0.02, "positive", "x", level=90).reason
    with pytest.raises(ValueError, match="expect='up'"):
        claims.direction(0, 1, "up", "x")


def test_equivalence():
    assert claims.equivalence(10, 10, 0, 0.03, "seed 42").outcome == claims.AGREES
    assert claims.equivalence(6, 10, 2, 0.03, "seed 42").outcome == claims.DISAGREES
    undecided = claims.equivalence(6, 10, 0, 0.03, "seed 42, bootstrap over its batches")
    assert undecided.outcome == claims.UNDECIDED and "seed 42, bootstrap over its batches" in undecided.reason


def test_not_equivalent_on_the_papers_negative_control():
    """The paper's linear - wide: 90% CI [-0.041, -0.025] at delta 0.03, not inside the band."""
    paper = {"lo": -0.041, "hi": -0.025, "delta": 0.03, "equivalent": False}
    assert claims.not_equivalent(paper, "linear - wide").outcome == claims.AGREES
    inside = {"lo": -0.012, "hi": -0.004, "delta": 0.03, "equivalent": True}
    assert claims.not_equivalent(inside, "linear - wide").outcome == claims.DISAGREES


def test_all_of_needs_every_part():
    yes, no, maybe = (claims.Verdict(o, o) for o in (claims.AGREES, claims.DISAGREES, claims.UNDECIDED))
    assert claims.all_of([yes, yes], "both").outcome == claims.AGREES
    assert claims.all_of([yes, maybe], "both").outcome == claims.UNDECIDED
    assert claims.all_of([maybe, no, yes], "both").outcome == claims.DISAGREES
    assert claims.all_of([yes, no], "both").reason == "both: agrees; disagrees"


def test_within_margin_accepts_the_papers_own_rank16_result():
    """Exp 070: Wide 37.72 +- 0.08, Deep 38.27 +- 0.05 PPL; the paper calls them equifinal at delta = 0.03."""
    gap, noise = math.log(37.72 / 38.27), (0.08 / 37.72 + 0.05 / 38.27) / 2
    assert claims.within_margin(gap, noise, 0.03, "g").outcome == claims.AGREES
    assert claims.within_margin(0.05, 0.01, 0.03, "g").outcome == claims.DISAGREES
    assert claims.within_margin(-0.025, 0.01, 0.03, "g").outcome == claims.UNDECIDED
    assert claims.within_margin(0.001, math.nan, 0.03, "g").outcome == claims.UNDECIDED


def test_threshold():
    assert claims.threshold(5.0, "above", 2.0, "v").outcome == claims.AGREES
    assert claims.threshold(1.0, "above", 2.0, "v").outcome == claims.DISAGREES
    assert claims.threshold(0.02, "below", 0.03, "v", undecided_band=0.02).outcome == claims.UNDECIDED
    assert str(claims.threshold(0.01, "below", 0.03, "v")).startswith("agrees: v = 0.01")


def test_gap_direction_names_the_basis():
    gap = {"lo": -0.05, "hi": -0.01, "basis": "3 seeds, t interval over seeds"}
    verdict = claims.gap_direction(gap, "negative", "a - b")
    assert verdict == claims.direction(-0.05, -0.01, "negative", "a - b, 3 seeds, t interval over seeds")
