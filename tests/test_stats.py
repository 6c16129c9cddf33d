"""Equivalence statistics (App. B): paired bootstrap, block bootstrap, TOST, seed-level TOST, summaries."""
import math

import numpy as np
import pandas as pd
import pytest

from moe_core.experiments import loss_spikes, step_losses, summarise
from moe_core.stats import (bootstrap_means, equivalence_counts, outside_counts, paired_bootstrap, paired_differences,
                            pairwise_equivalence, pct_change, ppl_gap_in_ce, seed_interval, seed_tost, tost)

N = 50  # validation batches, as in the paper
R = 2000  # resamples: enough for stable CIs, fast on a shared CPU


def noise(seed, scale=0.01, n=N):
    return scale * np.random.default_rng(seed).standard_normal(n)


def test_paired_differences():
    d = paired_differences(np.array([3.0, 3.5, 4.0], dtype=np.float32), [2.5, 3.5, 4.25])
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, [0.5, 0.0, -0.25])


def test_deterministic_per_seed():
    d = noise(0)
    np.testing.assert_array_equal(bootstrap_means(d, R, seed=42), bootstrap_means(d, R, seed=42))
    assert not np.array_equal(bootstrap_means(d, R, seed=42), bootstrap_means(d, R, seed=43))
    assert paired_bootstrap(d, R, seed=7) == paired_bootstrap(d, R, seed=7)
    assert paired_bootstrap(d, R, seed=7)["lo"] != paired_bootstrap(d, R, seed=8)["lo"]


def test_hand_computed_small_case():
    """Length-3 diffs: the ordinary bootstrap is rng.integers(0, n, (R, n)) followed by row means."""
    d, r, seed = np.array([1.0, 2.0, 4.0]), 6, 123
    idx = np.random.default_rng(seed).integers(0, 3, size=(r, 3))
    expected = [sum(d[j] for j in row) / 3 for row in idx]
    got = bootstrap_means(d, r, seed=seed)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    # every resampled mean is (a + b + c) / 3 for a, b, c drawn from {1, 2, 4}
    assert set(np.round(got * 3).astype(int)) <= {a + b + c for a in (1, 2, 4) for b in (1, 2, 4) for c in (1, 2, 4)}


def test_block_bootstrap_matches_loop_reimplementation():
    """Moving blocks: ceil(n/b) starts in 0..n-b, contiguous blocks concatenated, truncated to n."""
    d, r, b, seed = noise(1, n=23), 50, 5, 9
    starts = np.random.default_rng(seed).integers(0, 23 - b + 1, size=(r, math.ceil(23 / b)))
    expected = [np.concatenate([d[s:s + b] for s in row])[:23].mean() for row in starts]
    np.testing.assert_allclose(bootstrap_means(d, r, seed=seed, block=b), expected, rtol=0, atol=1e-15)


def test_block_one_is_ordinary_bootstrap():
    d = noise(2)
    idx = np.random.default_rng(42).integers(0, N, size=(R, N))
    np.testing.assert_allclose(bootstrap_means(d, R, block=1), d[idx].mean(axis=1), rtol=0, atol=1e-15)


def test_block_bootstrap_widens_ci_on_autocorrelated_diffs():
    d = 0.01 * np.sin(np.linspace(0, 2 * np.pi, N)) + noise(3, scale=0.002)
    width = {b: paired_bootstrap(d, R, block=b)["hi"] - paired_bootstrap(d, R, block=b)["lo"] for b in (1, 5, 10)}
    assert width[5] > 1.5 * width[1]
    assert width[10] > width[5]


def test_constant_diffs_collapse_ci():
    res = paired_bootstrap(np.full(N, 0.02), R)
    assert res["lo"] == pytest.approx(0.02) and res["hi"] == pytest.approx(0.02)
    assert res["mean"] == pytest.approx(0.02) and not res["zero_in_ci"]
    assert res["n"] == N and res["block"] == 1


def test_zero_in_ci():
    centred = noise(4) - noise(4).mean()
    assert paired_bootstrap(centred, R)["zero_in_ci"]
    shifted = paired_bootstrap(centred + 0.02, R)
    assert not shifted["zero_in_ci"] and shifted["lo"] > 0


def test_tost_inside_and_outside_margin():
    d = 0.001 + noise(5, scale=0.005)
    inside = tost(d, delta=0.03, n_resamples=R)
    assert inside["equivalent"] and inside["p_value"] < 0.05
    assert -0.03 <= inside["lo"] < inside["hi"] <= 0.03
    outside = tost(d - d.mean() + 0.06, delta=0.03, n_resamples=R)
    assert not outside["equivalent"] and outside["p_value"] > 0.95
    assert tost(-(d - d.mean() + 0.06), delta=0.03, n_resamples=R)["equivalent"] is False


def test_tost_ninety_percent_ci_is_narrower_than_ninety_five():
    d = noise(6)
    ci95, ci90 = paired_bootstrap(d, R), tost(d, 1.0, R)
    assert ci95["lo"] < ci90["lo"] < ci90["hi"] < ci95["hi"]


@pytest.mark.parametrize("delta,n", [(0.03, 10), (0.05, 3), (0.05, 50), (0.1, 3)])
def test_tost_closed_interval(delta, n):
    """CI bounds equal to the margin count as inside, even where the float mean rounds just past it."""
    for sign in (1, -1):
        res = tost(np.full(n, sign * delta), delta, n_resamples=100)
        assert res["equivalent"] and res["p_value"] == 0.0
        assert res["lo"] == pytest.approx(sign * delta, rel=1e-12)


def test_pairwise_equivalence_table():
    base = 3.5 + noise(10, scale=0.2)  # shared batch difficulty, cancelled by pairing
    losses = {"wide": base, "deep": base + 0.025 + noise(11, 0.005), "decoupled": base + 0.004 + noise(12, 0.005)}
    deltas, blocks = (0.02, 0.03, 0.05), (1, 5, 10)
    table = pairwise_equivalence(losses, deltas, blocks, n_resamples=R)
    assert list(zip(table["first"], table["second"])) == [("wide", "deep"), ("wide", "decoupled"),
                                                            ("deep", "decoupled")]
    expected = ["first", "second", "mean", "ci95_lo", "ci95_hi", "zero_in_ci"]
    expected += [f"{k}_b{b}" for b in blocks for k in ("ci90_lo", "ci90_hi")]
    expected += [f"tost_{d}_b{b}" for b in blocks for d in deltas]
    assert set(table.columns) == set(expected)
    # rows agree with the single-pair functions
    row = table.iloc[0]
    diffs = paired_differences(losses["wide"], losses["deep"])
    boot = paired_bootstrap(diffs, R)
    assert (row["mean"], row["ci95_lo"], row["ci95_hi"]) == (boot["mean"], boot["lo"], boot["hi"])
    t5 = tost(diffs, 0.03, R, block=5)
    assert (row["ci90_lo_b5"], row["ci90_hi_b5"], row["tost_0.03_b5"]) == (t5["lo"], t5["hi"], t5["equivalent"])
    # wide-deep (~0.025) and deep-decoupled (~0.021) differ significantly and fail the 0.02 margin only
    assert not row["zero_in_ci"] and row["mean"] < -0.02
    for b in blocks:
        counts = equivalence_counts(table, deltas, block=b)
        assert counts == {d: int(table[f"tost_{d}_b{b}"].sum()) for d in deltas}
        assert counts[0.02] <= counts[0.03] <= counts[0.05] == 3
        assert counts[0.02] == 1 and counts[0.03] == 3
    with pytest.raises(ValueError, match="block=7"):
        equivalence_counts(table, deltas, block=7)
    # wide-deep's interval lies beyond 0.02 on the negative side; nothing lies beyond 0.03
    assert outside_counts(table, deltas) == {0.02: 1, 0.03: 0, 0.05: 0}
    assert outside_counts(table, [0.02]) == {0.02: int((table["ci90_hi_b1"] < -0.02).sum())}
    with pytest.raises(ValueError, match="block=7"):
        outside_counts(table, deltas, block=7)


def test_an_interval_on_the_margin_is_inside_and_not_outside():
    edge = pd.DataFrame({"ci90_lo_b1": [-0.03 * (1 + 1e-12)], "ci90_hi_b1": [-0.03]})
    assert outside_counts(edge, [0.03]) == {0.03: 0}
    beyond = pd.DataFrame({"ci90_lo_b1": [-0.05], "ci90_hi_b1": [-0.0301]})
    assert outside_counts(beyond, [0.03]) == {0.03: 1}


def welch_tost_by_hand(a, b, bound):
    """The larger of the two one-sided Welch t-test p-values for |mean(a) - mean(b)| < bound, and the
    Welch-Satterthwaite degrees of freedom."""
    from scipy import stats as scipy_stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se, diff = np.sqrt(va + vb), a.mean() - b.mean()
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return max(scipy_stats.t.sf((diff + bound) / se, dof), scipy_stats.t.cdf((diff - bound) / se, dof)), dof


@pytest.mark.parametrize("a,b,bound", [([33.93, 34.35, 34.37], [34.62, 34.67, 34.67], 1.0),  # the paper's seeds
                                       ([33.93, 34.35, 34.37], [34.62, 34.67, 34.67, 34.1], 0.8),
                                       ([1.0, 2.0], [1.5, 2.6, 3.1], 2.0)])
def test_seed_tost_is_welchs_tost(a, b, bound):
    """Written out from the t distribution: unequal variances are not pooled, whatever the group sizes."""
    pytest.importorskip("pingouin")
    bound = np.float32(bound)  # a numpy scalar comes back as a float
    res = seed_tost(a, b, bound)
    p, dof = welch_tost_by_hand(a, b, float(bound))
    assert res["p_value"] == pytest.approx(p, rel=1e-9) and res["dof"] == pytest.approx(dof, rel=1e-9)
    assert type(res["bound"]) is float and res["equivalent"] == (res["p_value"] < 0.05)


def test_seed_tost_is_not_equivalent_at_a_tight_margin_and_refuses_one_seed():
    pytest.importorskip("pingouin")
    wide, deep = [33.93, 34.35, 34.37], [34.62, 34.67, 34.67]
    assert not seed_tost(wide, deep, 0.1)["equivalent"]
    with pytest.raises(ValueError, match="values_b.*at least 2"):
        seed_tost(wide, [34.62], 1.0)


def test_summarise_follows_table3s_convention():
    """Mean and sample std (ddof = 1) per label, as the paper's 'mean ± std' over seeds; nan for one seed."""
    table = pd.DataFrame({"label": ["wide"] * 3 + ["deep"] * 3 + ["hash"],
                          "val_ppl": [33.93, 34.35, 34.37, 34.62, 34.67, 34.67, 34.0]})
    summary = summarise(table).round(2)
    assert summary.loc["wide"].tolist()[:2] == [34.22, 0.25] and summary.loc["deep"].tolist()[:2] == [34.65, 0.03]
    assert summary.index.tolist() == ["wide", "deep", "hash"] and summary.n_seeds.tolist() == [3, 3, 1]
    assert summary.mean_ppl["hash"] == 34.0 and math.isnan(summary.std_ppl["hash"])


@pytest.mark.parametrize("call,match", [
    (lambda: paired_differences([1.0, 2.0, 3.0], [1.0, 2.0]), "lengths 3 and 2"),
    (lambda: paired_differences([1.0, float("nan")], [1.0, 2.0]), "nan at index 1"),
    (lambda: paired_differences([1.0], [2.0]), "at least 2"),
    (lambda: bootstrap_means([0.1, 0.2, 0.3], n_resamples=0), "n_resamples.*>= 1.*0"),
    (lambda: bootstrap_means([0.1, 0.2, 0.3], block=4), r"block.*\[1, 3\].*4"),
    (lambda: bootstrap_means([0.1, 0.2, 0.3], block=0), r"block.*\[1, 3\].*0"),
    (lambda: bootstrap_means([0.1, np.inf, 0.3]), "inf at index 1"),
    (lambda: tost([0.1, 0.2, 0.3], delta=0.0), "delta.*> 0.*0.0"),
    (lambda: tost([0.1, 0.2, 0.3], delta=-0.03), "delta.*-0.03"),
    (lambda: tost([0.1, 0.2, 0.3], delta=0.03, alpha=0.5), r"alpha.*\(0, 0.5\).*0.5"),
    (lambda: paired_bootstrap([0.1, 0.2, 0.3], ci=1.5), "ci.*1.5"),
    (lambda: pairwise_equivalence({"a": [1.0, 2.0]}), "at least 2 models"),
    (lambda: pairwise_equivalence({"a": [1.0, 2.0], "b": [1.0, 2.0]}, deltas=(0.0,)), "delta.*0.0"),
    (lambda: pairwise_equivalence({"a": [1.0, 2.0], "b": [1.0, 2.0]}, blocks=(3,)), r"block.*\[1, 2\].*3"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_seed_interval_is_students_t_over_the_seeds():
    """Per-seed means 1, 2, 3: mean 2, std 1, t(0.975, 2) = 4.3027, so the 95% interval is 2 +- 4.3027 / sqrt(3)."""
    got = seed_interval([1.0, 2.0, 3.0])
    half = 4.302652729911275 / np.sqrt(3)
    assert got == pytest.approx({"mean": 2.0, "lo": 2.0 - half, "hi": 2.0 + half, "n_seeds": 3})
    assert seed_interval([1.0, 2.0, 3.0], ci=0.9)["hi"] < got["hi"]
    with pytest.raises(ValueError, match="seed_means.*at least 2"):
        seed_interval([1.0])


def test_ppl_gap_in_ce_on_the_papers_replication():
    gap, noise = ppl_gap_in_ce(34.25, 0.20, 34.22, 0.02)
    assert gap == pytest.approx(np.log(34.25 / 34.22)) and noise == pytest.approx((0.20 / 34.25 + 0.02 / 34.22) / 2)


def test_paired_gap_pairs_each_seed_and_takes_the_seeds_as_units(monkeypatch):
    from moe_core import experiments

    per_seed = {1: np.array([0.1, 0.3]), 2: np.array([0.2, 0.4]), 3: np.array([0.6, 0.8])}
    monkeypatch.setattr(experiments, "loss_differences", lambda first, second, profile: per_seed[first.seed])
    several = experiments.paired_gap("a", "b", [1, 2, 3], "tiny")
    assert several["mean"] == pytest.approx(0.4) and several["n_seeds"] == 3 and "3 seeds" in several["basis"]
    assert several == pytest.approx({**seed_interval([0.2, 0.3, 0.7]), "basis": several["basis"]})
    one = experiments.paired_gap("a", "b", [2], "tiny")
    assert one["mean"] == pytest.approx(0.3) and one["basis"].startswith("seed 2, bootstrap")


def test_paired_gap_minus_a_second_pair_is_the_interaction_per_seed(monkeypatch):
    from moe_core import experiments

    losses = {("a", 1): 0.5, ("b", 1): 0.1, ("c", 1): 0.2, ("d", 1): 0.1,
              ("a", 2): 0.9, ("b", 2): 0.2, ("c", 2): 0.3, ("d", 2): 0.4}
    monkeypatch.setattr(experiments, "loss_differences", lambda first, second, profile: np.array(
        [losses[first.variant, first.seed] - losses[second.variant, second.seed]] * 2))
    gap = experiments.paired_gap("a", "b", [1, 2], "tiny", minus=("c", "d"))  # seed 1: 0.4 - 0.1; seed 2: 0.7 + 0.1
    assert gap == pytest.approx({**seed_interval([0.3, 0.8]), "basis": gap["basis"]})
    one = experiments.paired_gap("a", "b", [2], "tiny", minus=("c", "d"))
    assert one["mean"] == pytest.approx(0.8)


def test_loss_spikes_count_events_not_points():
    loss = pd.Series([5.0, 4.0, 4.5, 4.6, 3.9, 3.8, 4.3, 3.7, 3.6])  # 4.5-4.6: one event; 4.3: another
    assert loss_spikes(loss) == 2 and loss_spikes(loss, ratio=1.2) == 0
    assert loss_spikes(pd.Series([3.0, 2.0, 1.0])) == 0


def test_step_losses_unpack_each_lines_steps_and_read_older_lines_as_one_step():
    log = pd.DataFrame({"step": [2, 3, 6], "loss": [4.0, 3.5, 3.0],
                        "step_losses": [None, [3.5], [3.2, 9.0, 3.0]]})  # the first line predates the field
    every = step_losses(log)
    assert every.index.tolist() == [2, 3, 4, 5, 6] and every.tolist() == [4.0, 3.5, 3.2, 9.0, 3.0]
    assert loss_spikes(every) == 1 and loss_spikes(log["loss"]) == 0  # the spike lies between two lines
    old = step_losses(log.drop(columns="step_losses"))
    assert old.index.tolist() == [2, 3, 6] and old.tolist() == [4.0, 3.5, 3.0]
    resumed = pd.DataFrame({"step": [4, 8], "loss": [3.0, 2.5], "step_losses": [[3.1, 3.0], [2.6, 2.5]]})
    assert step_losses(resumed).index.tolist() == [3, 4, 7, 8]  # steps a window lacks stay absent, not shifted
    assert step_losses(pd.DataFrame({"step": [5], "loss": [2.0], "step_losses": [[]]})).tolist() == [2.0]
    assert step_losses(pd.DataFrame()).empty


def test_pct_change_is_the_papers_delta_ppl():
    assert pct_change(37.26, 34.62) == pytest.approx(7.6257, abs=1e-4)  # Table 4: frozen routing, +7.6%
    assert list(pct_change(pd.Series([110.0, 90.0]), 100.0)) == pytest.approx([10.0, -10.0])
