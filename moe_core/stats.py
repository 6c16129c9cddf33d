"""Equivalence statistics of the paper's Appendix B: paired bootstrap, bootstrap TOST, seed-level TOST.

Every model is evaluated on the same fixed, sequential validation batches, so two models are compared through
the per-batch paired differences d_b = loss_i[b] - loss_j[b]. Pairing cancels batch difficulty, which makes the
CIs about 10x tighter than comparing two unpaired means.

- paired_bootstrap: percentile 95% CI of the mean difference (Table 13, Table 15).
- tost: CI-inclusion TOST, equivalent iff the 90% CI lies in the closed interval [-delta, +delta] (Table 14);
  block > 1 gives the moving-block bootstrap for autocorrelated batches (Table 16).
- pairwise_equivalence / equivalence_counts: all pairs of models at several margins and block sizes.
- seed_interval: a t interval over per-seed paired differences, for direction claims with several seeds.
- seed_tost: a Welch t-based TOST across independent seeds (pingouin), for final metrics of multi-seed runs.

pandas and pingouin are imported inside the functions that need them: the training machine has neither.
"""
from __future__ import annotations

import math

import numpy as np

# A CI bound within this fraction of delta of the margin counts as on it: a mean of copies of 0.05 need not
# equal 0.05 in floating point, and the interval is closed (App. B.5).
_REL_TOL = 1e-9


def _as_series(values, name: str, min_len: int) -> np.ndarray:
    """values as a 1-D float64 array of finite numbers with at least min_len entries."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size < min_len:
        raise ValueError(f"{name} must be 1-D with at least {min_len} values, got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
        raise ValueError(f"{name} must be finite, got {x[bad[0]]} at index {bad[0]}")
    return x


def _check_positive(value, name: str) -> float:
    if not (isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_fraction(value, name: str, high: float) -> float:
    if not (isinstance(value, (int, float, np.integer, np.floating)) and 0 < value < high):
        raise ValueError(f"{name} must lie in (0, {high}), got {value!r}")
    return float(value)


def paired_differences(losses_a, losses_b) -> np.ndarray:
    """Per-batch differences losses_a[b] - losses_b[b] of two models evaluated on the same batches."""
    a = _as_series(losses_a, "losses_a", 2)
    b = _as_series(losses_b, "losses_b", 2)
    if a.size != b.size:
        raise ValueError(f"losses_a and losses_b must be evaluated on the same batches, "
                         f"got lengths {a.size} and {b.size}")
    return a - b


def bootstrap_means(diffs, n_resamples: int = 10_000, seed: int = 42, block: int = 1) -> np.ndarray:
    """Means of n_resamples bootstrap resamples of diffs, shape (n_resamples,).

    block=1 is the ordinary bootstrap (n indices drawn with replacement). block=b>1 is the moving-block
    bootstrap: ceil(n/b) block starts drawn uniformly from 0..n-b, the contiguous blocks concatenated and
    truncated to n, which keeps the correlation between neighbouring batches inside a block.
    Both use one draw of shape (n_resamples, ceil(n/b)) from np.random.default_rng(seed).
    """
    d = _as_series(diffs, "diffs", 2)
    n = d.size
    if not isinstance(n_resamples, (int, np.integer)) or n_resamples < 1:
        raise ValueError(f"n_resamples must be an integer >= 1, got {n_resamples!r}")
    if not isinstance(block, (int, np.integer)) or not 1 <= block <= n:
        raise ValueError(f"block must be an integer in [1, {n}] (the number of diffs), got {block!r}")
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n - block + 1, size=(n_resamples, -(-n // block)))
    idx = (starts[:, :, None] + np.arange(block)).reshape(n_resamples, -1)[:, :n]
    return d[idx].mean(axis=1)


def _percentile_ci(means: np.ndarray, level: float) -> tuple[float, float]:
    """Central percentile interval holding `level` of the bootstrap means (numpy's linear interpolation)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_bootstrap(diffs, n_resamples: int = 10_000, seed: int = 42, block: int = 1, ci: float = 0.95) -> dict:
    """Mean paired difference with its percentile bootstrap CI; zero_in_ci means 'no significant difference'."""
    ci = _check_fraction(ci, "ci", 1.0)
    d = _as_series(diffs, "diffs", 2)
    lo, hi = _percentile_ci(bootstrap_means(d, n_resamples, seed, block), ci)
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "zero_in_ci": lo <= 0.0 <= hi,
            "n": int(d.size), "block": int(block)}


def pct_change(new, base):
    """Change of `new` over `base` in percent, 100 (new / base - 1): the papers' Delta-PPL%. Floats or arrays."""
    return 100.0 * (new / base - 1.0)


def ppl_gap_in_ce(mean_a: float, std_a: float, mean_b: float, std_b: float) -> tuple[float, float]:
    """Two seed-mean PPLs (mean, std) as a cross-entropy gap and noise, the units of the paper's margin:
    ln(mean_a / mean_b), and the mean of the two seed stds of ln PPL (about std / mean each)."""
    return float(np.log(mean_a / mean_b)), (std_a / mean_a + std_b / mean_b) / 2


def seed_interval(seed_means, ci: float = 0.95) -> dict:
    """Student t interval of the mean of per-seed paired differences. The seeds are the independent units:
    the validation batches of one pair of runs share that pair's luck, so a bootstrap over them leaves out
    the spread between seeds (at the smoke scale several times the width of one seed's batch CI)."""
    from scipy import stats as scipy_stats

    ci = _check_fraction(ci, "ci", 1.0)
    m = _as_series(seed_means, "seed_means", 2)
    half = float(scipy_stats.t.ppf(0.5 + ci / 2, m.size - 1) * m.std(ddof=1) / np.sqrt(m.size))
    return {"mean": float(m.mean()), "lo": float(m.mean()) - half, "hi": float(m.mean()) + half, "n_seeds": int(m.size)}


def _inside(lo: float, hi: float, delta: float) -> bool:
    """Whether [lo, hi] lies in the closed interval [-delta, +delta], up to floating-point rounding."""
    edge = delta * (1 + _REL_TOL)
    return bool(-edge <= lo and hi <= edge)


def _outside(lo: float, hi: float, delta: float) -> bool:
    """Whether [lo, hi] lies entirely beyond +-delta; a bound on the margin (up to rounding) counts as inside."""
    edge = delta * (1 + _REL_TOL)
    return bool(lo > edge or hi < -edge)


def _tost_p(means: np.ndarray, delta: float) -> float:
    """Larger of the bootstrap one-sided p-values: the share of means strictly beyond either margin."""
    edge = delta * (1 + _REL_TOL)
    return float(max(np.mean(means < -edge), np.mean(means > edge)))


def tost(diffs, delta: float, n_resamples: int = 10_000, seed: int = 42, block: int = 1,
         alpha: float = 0.05) -> dict:
    """Bootstrap two one-sided tests of H0: |mean diff| >= delta against H1: |mean diff| < delta.

    Equivalent iff the whole (1 - 2*alpha) percentile CI (90% at alpha=0.05) lies in the CLOSED interval
    [-delta, +delta], as in App. B. The paper does not say how its p-values were computed; here
    p = max(P*(mean < -delta), P*(mean > +delta)) over the bootstrap means, the bootstrap analogue of the
    larger of the two one-sided p-values. Means exactly on +-delta count as inside, consistent with the closed
    interval. p has resolution 1/n_resamples, so p = 0 should be reported as p < 1/n_resamples.
    """
    delta = _check_positive(delta, "delta")
    alpha = _check_fraction(alpha, "alpha", 0.5)
    d = _as_series(diffs, "diffs", 2)
    means = bootstrap_means(d, n_resamples, seed, block)
    lo, hi = _percentile_ci(means, 1 - 2 * alpha)
    return {"mean": float(d.mean()), "lo": lo, "hi": hi, "delta": delta, "equivalent": _inside(lo, hi, delta),
            "p_value": _tost_p(means, delta), "block": int(block)}


def pairwise_equivalence(losses: dict, deltas=(0.02, 0.03, 0.05), blocks=(1, 5, 10),
                         n_resamples: int = 10_000, seed: int = 42):
    """Tables 13, 14 and 16 at once: one row per unordered pair of models, in the dict's order.

    losses maps a model name to its per-batch validation losses (same batches, same order for every model).
    Columns: first, second, mean, ci95_lo, ci95_hi, zero_in_ci (ordinary bootstrap, diff = first - second);
    then per block b: ci90_lo_b{b}, ci90_hi_b{b}, and per margin d: tost_{d}_b{b} (bool).
    Every pair and block uses the same seed, so equal-length inputs share the same resampling indices.
    """
    import pandas as pd

    names = list(losses)
    if len(names) < 2:
        raise ValueError(f"losses must hold at least 2 models, got {len(names)}: {names}")
    deltas = [_check_positive(d, "delta") for d in deltas]
    rows = []
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            d = paired_differences(losses[first], losses[second])
            means = {b: bootstrap_means(d, n_resamples, seed, b) for b in dict.fromkeys((1, *blocks))}
            lo, hi = _percentile_ci(means[1], 0.95)
            row = {"first": first, "second": second, "mean": float(d.mean()),
                   "ci95_lo": lo, "ci95_hi": hi, "zero_in_ci": lo <= 0.0 <= hi}
            for b in blocks:
                lo90, hi90 = _percentile_ci(means[b], 0.90)
                row[f"ci90_lo_b{b}"], row[f"ci90_hi_b{b}"] = lo90, hi90
                for delta in deltas:
                    row[f"tost_{delta}_b{b}"] = _inside(lo90, hi90, delta)
            rows.append(row)
    return pd.DataFrame(rows)


def _column(table, name: str, asked: str):
    """A column of a pairwise_equivalence table, or an error naming what was asked and the columns of its kind."""
    if name not in table.columns:
        available = [c for c in table.columns if c.split("_")[0] == name.split("_")[0]]  # tost_*, ci90_*
        raise ValueError(f"no column {name!r} for {asked}; available: {available}")
    return table[name]


def equivalence_counts(table, deltas, block: int = 1) -> dict:
    """Number of pairs declared equivalent at each margin (Table 14), from a pairwise_equivalence table."""
    return {float(d): int(_column(table, f"tost_{float(d)}_b{block}", f"delta={d}, block={block}").sum())
            for d in deltas}


def outside_counts(table, deltas, block: int = 1) -> dict:
    """Number of pairs clearly different at each margin: the whole 90% CI beyond +-delta, a gap larger than
    the margin (neither equivalent nor undecided). The complement of `equivalence_counts`' rule at the edge."""
    lo, hi = (_column(table, f"ci90_{end}_b{block}", f"block={block}") for end in ("lo", "hi"))
    return {float(d): sum(_outside(a, b, _check_positive(d, "delta")) for a, b in zip(lo, hi)) for d in deltas}


def seed_tost(values_a, values_b, bound: float) -> dict:
    """Unpaired TOST (pingouin) with Welch's t on a final metric across independent seeds, margin fixed in advance.

    Seeds of two configurations are independent, so the test is unpaired; their spreads can differ (the paper's
    Deep 3x4 seeds vary 8x less than Wide's), so the variances are not pooled (Welch; pingouin's own default
    pools them). With 3 seeds per group its power is low: 'not equivalent' is weak evidence.
    """
    import pingouin

    a = _as_series(values_a, "values_a", 2)
    b = _as_series(values_b, "values_b", 2)
    bound = _check_positive(bound, "bound")
    res = pingouin.tost(a, b, bound=bound, paired=False, correction=True)
    p = float(res["pval"].iloc[0])
    return {"bound": bound, "dof": float(res["dof"].iloc[0]), "p_value": p, "equivalent": p < 0.05}
