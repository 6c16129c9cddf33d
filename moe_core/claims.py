"""Plain verdicts on the papers' claims: agrees / disagrees / undecided at this scale, with a reason.

Each function takes numbers this code measured and returns a `Verdict`; the notebooks glue its
text next to the paper's number. The rules are written down here, once, so every chapter judges
the same way: a direction claim needs a confidence interval that excludes zero, an equivalence
claim needs TOST, and anything in between is undecided.
"""
from __future__ import annotations

from dataclasses import dataclass

AGREES, DISAGREES, UNDECIDED = "agrees", "disagrees", "undecided"


@dataclass(frozen=True)
class Verdict:
    outcome: str  # agrees | disagrees | undecided
    reason: str

    def __str__(self) -> str:
        return f"{self.outcome}: {self.reason}"


def direction(lo: float, hi: float, expect: str, what: str, level: int = 95) -> Verdict:
    """A claim that a paired difference (first - second, in loss) is negative or positive.

    Agrees when the `level`% CI lies entirely on the expected side, disagrees when it lies entirely
    on the other side, undecided when it contains zero.
    """
    if expect not in ("negative", "positive"):
        raise ValueError(f"expect={expect!r}: choose negative or positive")
    below, above = hi < 0, lo > 0
    ci = f"{level}% CI [{lo:+.4f}, {hi:+.4f}]"
    if (below and expect == "negative") or (above and expect == "positive"):
        return Verdict(AGREES, f"{what}: the {ci} excludes zero on the paper's side")
    if below or above:
        return Verdict(DISAGREES, f"{what}: the {ci} excludes zero on the opposite side")
    return Verdict(UNDECIDED, f"{what}: the {ci} contains zero")


def gap_direction(gap: dict, expect: str, what: str) -> Verdict:
    """direction() on a paired gap from experiments.paired_gap, its basis (seeds or one seed's batches) named."""
    return direction(gap["lo"], gap["hi"], expect, f"{what}, {gap['basis']}")


def all_of(verdicts: list[Verdict], what: str) -> Verdict:
    """A claim made of several parts: agrees when every part agrees, disagrees when any part disagrees,
    undecided otherwise; the reason lists the parts."""
    outcomes = {v.outcome for v in verdicts}
    outcome = DISAGREES if DISAGREES in outcomes else AGREES if outcomes == {AGREES} else UNDECIDED
    return Verdict(outcome, f"{what}: " + "; ".join(v.reason for v in verdicts))


def equivalence(n_equivalent: int, n_pairs: int, n_clearly_different: int, delta: float, basis: str) -> Verdict:
    """The paper's equifinality claim: every pair of cosine variants is TOST-equivalent at delta.

    Agrees when all pairs are equivalent; disagrees when some pair's 90% CI lies entirely outside
    +-delta (a difference larger than the margin); otherwise undecided (CIs straddle the margin).
    `basis` names what the intervals resample (one seed's batches, say), for the reason.
    """
    if n_equivalent == n_pairs:
        return Verdict(AGREES, f"all {n_pairs} pairs are TOST-equivalent at delta = {delta} ({basis})")
    if n_clearly_different:
        return Verdict(DISAGREES, f"{n_clearly_different} of {n_pairs} pairs differ by more than delta = {delta} "
                                  f"(90% CI entirely outside the margin; {basis})")
    return Verdict(UNDECIDED, f"{n_equivalent} of {n_pairs} pairs are equivalent at delta = {delta}; the others' "
                              f"90% CIs straddle the margin ({basis})")


def not_equivalent(tost_result: dict, what: str) -> Verdict:
    """A negative control's claim that a pair falls outside the equivalence band: agrees when the pair is
    not TOST-equivalent (its 90% CI is not inside +-delta), disagrees when it is. `tost_result` is
    stats.tost's dict."""
    ci = f"90% CI [{tost_result['lo']:+.4f}, {tost_result['hi']:+.4f}]"
    if tost_result["equivalent"]:
        return Verdict(DISAGREES, f"{what}: the {ci} lies inside +-{tost_result['delta']}, so TOST calls it equivalent")
    return Verdict(AGREES, f"{what}: the {ci} is not inside +-{tost_result['delta']}")


def within_margin(gap: float, noise: float, delta: float, what: str) -> Verdict:
    """The paper's equifinality criterion for seed means: |gap| (in cross-entropy) inside +-delta, with the
    seed spread `noise` (a std, same units) as the uncertainty. Agrees when |gap| + noise < delta,
    disagrees when |gap| - noise > delta, undecided in between or without a seed spread."""
    text = f"{what}: |gap| {abs(gap):.4f} against delta = {delta}, seed std {noise:.4f}"
    if noise != noise or noise <= 0:  # nan or no spread: the gap's uncertainty is unknown
        return Verdict(UNDECIDED, text + " (no seed spread)")
    if abs(gap) + noise < delta:
        return Verdict(AGREES, text + ": inside the margin by more than the spread")
    if abs(gap) - noise > delta:
        return Verdict(DISAGREES, text + ": outside the margin by more than the spread")
    return Verdict(UNDECIDED, text + ": within one spread of the margin")


def threshold(value: float, agree_if: str, bound: float, what: str, undecided_band: float = 0.0) -> Verdict:
    """A claim that a measured value is above (`agree_if="above"`) or below a bound.

    Values within `undecided_band` of the bound are undecided.
    """
    if agree_if not in ("above", "below"):
        raise ValueError(f"agree_if={agree_if!r}: choose above or below")
    margin = value - bound if agree_if == "above" else bound - value
    text = f"{what} = {value:.3g} ({'>' if agree_if == 'above' else '<'} {bound:.3g} expected)"
    if abs(margin) <= undecided_band:
        return Verdict(UNDECIDED, text + ", too close to call")
    return Verdict(AGREES if margin > 0 else DISAGREES, text)
