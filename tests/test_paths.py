"""Path analyses (PathMoE spec 4.1-4.6) on hand-built routing tables with known answers and on a tiny model."""
import math

import pytest
import torch

from moe_core.analysis.paths import (
    aligned_labels,
    block_path_entropy, consecutive_agreement, consecutive_correlation, consecutive_jaccard, consecutive_pairs,
    expert_loads,
    expert_permutations, expert_usage_entropy, pair_within_block, path_class_alignment, path_statistics,
    record_summary, router_noise_robustness,
    routing_record, run_length_histogram, shuffle_robustness, single_layer_shuffle, split_by_block,
    sustained_engagement, token_class, token_fraction_shuffle, token_permutations, token_routing_entropy,
    top_path_labels, top_tokens_per_path, unique_paths_curve,
)
from moe_core.analysis.utilisation import ranked_loads
from moe_core.model import MoETransformer
from moe_core.variants import resolve

CPU = torch.device("cpu")
_g = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, 512, (2, 32), generator=_g)
BATCHES = [(torch.randint(0, 512, (2, 32), generator=_g), torch.randint(0, 512, (2, 32), generator=_g))
           for _ in range(2)]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: faster on one thread, far faster on a busy machine


def build(variant="path_b4", seed=0):
    torch.manual_seed(seed)
    return MoETransformer(resolve(variant, "tiny").model).eval()


def random_top1(n, n_layers, n_experts, seed=0):
    return torch.randint(0, n_experts, (n, n_layers), generator=torch.Generator().manual_seed(seed))


def distinct_paths(n, n_layers, n_experts):
    """n tokens, each on its own path: the base-E digits of 0..n-1."""
    t = torch.arange(n).unsqueeze(1)
    return (t // n_experts ** torch.arange(n_layers)) % n_experts

# ---------------------------------------------------------------------------------------------
# path concentration


def test_one_shared_path():
    top1 = torch.tensor([[3, 1, 4, 1]]).repeat(50, 1)
    s = path_statistics(top1)
    assert s["tokens"] == 50 and s["unique_paths"] == 1
    assert s["path_entropy_bits"] == 0.0 and s["effective_paths"] == 1.0
    assert s["singleton_fraction"] == 0.0
    assert s["coverage"] == {10: 1.0, 100: 1.0, 1000: 1.0}


def test_all_distinct_paths():
    top1 = distinct_paths(64, 4, 8)
    s = path_statistics(top1)
    assert s["unique_paths"] == 64
    assert s["path_entropy_bits"] == pytest.approx(6.0) == pytest.approx(s["entropy_bound_bits"])
    assert s["effective_paths"] == pytest.approx(64.0)
    assert s["singleton_fraction"] == 1.0
    assert s["coverage"][10] == pytest.approx(10 / 64) and s["coverage"][100] == 1.0
    assert s["path_entropy_mm_bits"] > s["path_entropy_bits"]


def test_path_counts_and_coverage_of_a_skewed_table():
    # path A x6, path B x3, path C x1 (C differs from A only in the last layer)
    a, b, c = [0, 1, 2], [2, 1, 0], [0, 1, 3]
    s = path_statistics(torch.tensor([a] * 6 + [b] * 3 + [c]), coverage=(1, 2, 5))
    assert s["unique_paths"] == 3 and s["singleton_fraction"] == pytest.approx(1 / 3)
    h = -sum(p * math.log2(p) for p in (0.6, 0.3, 0.1))
    assert s["path_entropy_bits"] == pytest.approx(h)
    assert s["coverage"] == pytest.approx({1: 0.6, 2: 0.9, 5: 1.0})


def test_paths_do_not_overflow_with_many_layers_and_experts():
    top1 = random_top1(500, 16, 16)  # 16^16 paths do not fit in int64
    top1[250:] = top1[:250]
    assert path_statistics(top1)["unique_paths"] == 250


def test_unique_paths_curve():
    top1 = random_top1(2000, 4, 4)
    curve = unique_paths_curve(top1, [0, 1, 10, 100, 1000, 2000])
    counts = [c for _, c in curve]
    assert curve[0] == (0, 0) and curve[1] == (1, 1)
    assert counts == sorted(counts)
    assert counts[-1] == path_statistics(top1)["unique_paths"]
    for n, c in curve:
        assert c == path_statistics(top1[:n])["unique_paths"] if n else c == 0
    with pytest.raises(ValueError, match=r"points must lie in \[0, 2000\], got \[2001\]"):
        unique_paths_curve(top1, [2001])


def test_block_path_entropy():
    top1 = random_top1(3000, 4, 8)
    assert block_path_entropy(top1, 4) == [pytest.approx(path_statistics(top1)["path_entropy_bits"])]
    per_layer = block_path_entropy(top1, 1)
    assert per_layer == pytest.approx(expert_usage_entropy(top1, 8))
    constant_block = top1.clone()
    constant_block[:, 2:] = 5
    assert block_path_entropy(constant_block, 2)[1] == 0.0
    with pytest.raises(ValueError, match="block=3 does not divide the 4 layers"):
        block_path_entropy(top1, 3)

# ---------------------------------------------------------------------------------------------
# routing entropy and load


def test_expert_usage_entropy_and_loads():
    uniform = torch.arange(8).repeat(10).unsqueeze(1)  # every expert 10 times
    collapsed = torch.full((80, 1), 3)
    top1 = torch.cat([uniform, collapsed], dim=1)
    assert expert_usage_entropy(top1, 8) == [pytest.approx(3.0), 0.0]
    loads = expert_loads(top1, 8)
    assert loads[0] == pytest.approx([1 / 8] * 8)
    assert loads[1] == [0, 0, 0, 1.0, 0, 0, 0, 0]
    topk = [torch.tensor([[0, 1], [0, 2]]), torch.tensor([[3, 2], [2, 1]])]
    assert expert_loads(topk, 4) == [[0.5, 0.25, 0.25, 0.0], [0.0, 0.25, 0.5, 0.25]]
    with pytest.raises(ValueError, match="expert id 7 is out of range for n_experts=2"):
        expert_loads(top1, 2)


def test_token_routing_entropy():
    one_hot = torch.eye(8)[torch.tensor([0, 3, 7, 7])]
    uniform = torch.full((4, 8), 1 / 8)
    half = torch.tensor([[0.5, 0.5, 0, 0]])
    assert token_routing_entropy([one_hot, uniform, half]) == [0.0, pytest.approx(3.0), pytest.approx(1.0)]
    with pytest.raises(ValueError, match="layer 0 has no router probabilities"):
        token_routing_entropy([None])

# ---------------------------------------------------------------------------------------------
# cross-layer consistency


def test_identical_consecutive_layers():
    col = random_top1(1000, 1, 8)
    rows = consecutive_agreement(col.repeat(1, 3), 8)
    assert [r["layers"] for r in rows] == [(0, 1), (1, 2)]
    for r in rows:
        assert r["agreement"] == 1.0 and r["nmi"] == pytest.approx(1.0) and r["aligned_agreement"] == 1.0


def test_relabelled_layer_is_seen_through_by_invariant_measures():
    col = random_top1(1000, 1, 8)[:, 0]
    perm = torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])  # no fixed point
    (r,) = consecutive_agreement(torch.stack([col, perm[col]], dim=1), 8)
    assert r["agreement"] == 0.0
    assert r["nmi"] == pytest.approx(1.0) and r["aligned_agreement"] == 1.0


def test_constant_layers_and_independent_layers():
    (r,) = consecutive_agreement(torch.full((20, 2), 2), 8)
    assert r["nmi"] == 1.0 and r["agreement"] == 1.0
    (r,) = consecutive_agreement(torch.tensor([[2, 0], [2, 1], [2, 2], [2, 3]]), 4)  # one constant layer
    assert r["nmi"] == 0.0
    (r,) = consecutive_agreement(random_top1(20000, 2, 8), 8)
    assert r["nmi"] < 0.01
    assert r["agreement"] == pytest.approx(1 / 8, abs=0.02)
    assert 1 / 8 <= r["aligned_agreement"] < 0.16


def test_consecutive_jaccard():
    a = torch.tensor([[0, 1], [2, 3]])
    assert consecutive_jaccard([a, a.flip(1), torch.tensor([[4, 5], [6, 7]]), torch.tensor([[4, 0], [6, 7]])]) \
        == [1.0, 0.0, pytest.approx((1 / 3 + 1) / 2)]
    g = torch.Generator().manual_seed(0)
    random_sets = [torch.rand(20000, 16, generator=g).topk(4, dim=-1).indices for _ in range(2)]
    assert consecutive_jaccard(random_sets)[0] == pytest.approx(random_set_jaccard(16, 4), abs=0.005)


def test_consecutive_correlation():
    peaked, other_peak = torch.tensor([[0.7, 0.1, 0.1, 0.1]]), torch.tensor([[0.1, 0.7, 0.1, 0.1]])
    uniform = torch.full((1, 4), 0.25)
    # centred: (0.45, -0.15, -0.15, -0.15) and (-0.15, 0.45, -0.15, -0.15): r = -0.09 / 0.27
    assert consecutive_correlation([peaked, peaked, other_peak, uniform]) \
        == [pytest.approx(1.0), pytest.approx(-1 / 3), 0.0]
    two_tokens = [torch.cat([peaked, peaked]), torch.cat([peaked, other_peak])]
    assert consecutive_correlation(two_tokens) == [pytest.approx((1 - 1 / 3) / 2)]
    with pytest.raises(ValueError, match="no router probabilities"):
        consecutive_correlation([peaked, None])


def test_split_by_block():
    per_pair = [1.0, 0.0, 3.0]  # pairs (0, 1), (1, 2), (2, 3) of 4 layers
    assert split_by_block(per_pair, 2) == {"within_block": 2.0, "across_blocks": 0.0}
    ones, whole = split_by_block(per_pair, 1), split_by_block(per_pair, 4)
    assert math.isnan(ones["within_block"]) and ones["across_blocks"] == pytest.approx(4 / 3)
    assert whole["within_block"] == pytest.approx(4 / 3) and math.isnan(whole["across_blocks"])
    with pytest.raises(ValueError, match="block=3 does not divide the 4 layers"):
        split_by_block(per_pair, 3)


def test_run_lengths_and_sustained_engagement():
    top1 = torch.tensor([[3, 3, 5, 5, 5],   # runs of 2 and 3
                         [1, 1, 1, 1, 1],   # one run of 5
                         [0, 1, 0, 1, 0]])  # five runs of 1
    hist = run_length_histogram(top1)
    assert hist == [5, 1, 1, 0, 1]
    assert sum((i + 1) * h for i, h in enumerate(hist)) == top1.numel()
    assert sustained_engagement(top1) == pytest.approx(1 / 3)
    assert sustained_engagement(top1, min_run=3) == pytest.approx(2 / 3)
    assert sustained_engagement(top1, min_run=1) == 1.0

# ---------------------------------------------------------------------------------------------
# paths and linguistic function


def test_token_class():
    cases = {",": "punctuation", " .": "punctuation", "\n": "punctuation", "": "punctuation",
             " 1984": "digit", "2nd": "digit", " The": "function", "of": "function",
             " Paris": "capitalised", "ing": "word", " house": "word"}
    assert {text: token_class(text) for text in cases} == cases


# path A x5, B x4, C x1; with m = 2, C is the "rest"
PATH_A, PATH_B, PATH_C = [0, 1, 2], [2, 1, 0], [0, 0, 0]
LING_TOP1 = torch.tensor([PATH_A] * 5 + [PATH_B] * 4 + [PATH_C])
LING_TOKENS = torch.tensor([5, 5, 5, 7, 9] + [1, 1, 1, 2] + [3])
LING_CLASSES = ["p", "p", "p", "p", "d"] + ["d"] * 4 + ["w"]


def entropy(*ps):
    return -sum(p * math.log2(p) for p in ps)


def test_top_path_labels():
    assert top_path_labels(LING_TOP1, 2).tolist() == [0] * 5 + [1] * 4 + [2]
    assert top_path_labels(LING_TOP1, 5).tolist() == [0] * 5 + [1] * 4 + [2]  # fewer paths than m: no rest


def test_path_class_alignment():
    # contingency: path A (p 4, d 1), path B (d 4), rest (w 1)
    a = path_class_alignment(LING_TOP1, LING_CLASSES, 2)
    h_path, h_class, h_joint = entropy(0.5, 0.4, 0.1), entropy(0.4, 0.5, 0.1), entropy(0.4, 0.1, 0.4, 0.1)
    assert a["purity"] == pytest.approx(0.9)
    assert a["nmi"] == pytest.approx(2 * (h_path + h_class - h_joint) / (h_path + h_class))
    assert a["majority_class"] == 0.5 and a["rest_fraction"] == pytest.approx(0.1)
    aligned = random_top1(5000, 2, 4)
    classes = [str(path) for path in aligned.tolist()]  # the class is the path itself
    b = path_class_alignment(aligned, classes, 16)
    assert b["purity"] == 1.0 and b["nmi"] == pytest.approx(1.0) and b["rest_fraction"] == 0.0
    assert b["nmi_shuffled"] < 0.05


def test_top_tokens_per_path():
    rows = top_tokens_per_path(LING_TOP1, LING_TOKENS, 2, n_top=2)
    assert rows == [{"path": tuple(PATH_A), "tokens": 5, "top": [(5, 3), (7, 1)]},
                    {"path": tuple(PATH_B), "tokens": 4, "top": [(1, 3), (2, 1)]}]
    assert len(top_tokens_per_path(LING_TOP1, LING_TOKENS, 10)) == 3

# ---------------------------------------------------------------------------------------------
# robustness tables


def test_token_permutations():
    tables = token_permutations(10, 3, 8, rho=0.3, seed=1)
    perms = expert_permutations(3, 8, seed=1)
    identity = torch.arange(8)
    moved = [{t for t in range(10) if not torch.equal(table[t], identity)} for table in tables]
    assert len(moved[0]) == 3 and moved[0] == moved[1] == moved[2]  # the same tokens at every layer
    for table, perm, rows in zip(tables, perms, moved):
        assert all(torch.equal(table[t], perm) for t in rows)
    assert all(torch.equal(t, perm.expand(10, -1)) for t, perm in zip(token_permutations(10, 3, 8, 1.0, seed=1), perms))
    assert all(torch.equal(t, identity.expand(10, -1)) for t in token_permutations(10, 3, 8, 0.0, seed=1))
    for rho in (-0.1, 1.5, float("nan")):  # a slice would quietly turn -0.1 into 90% of the tokens
        with pytest.raises(ValueError, match="must lie in"):
            token_permutations(10, 3, 8, rho, seed=1)


def random_set_jaccard(n, k):
    """Exact mean Jaccard of two uniformly random k-subsets of n (the overlap is hypergeometric).

    0.158 for n=16, k=4: spec 4.4's k / (2n - k) = 0.143 is the ratio of the expectations.
    """
    return sum(math.comb(k, i) * math.comb(n - k, k - i) * i / (2 * k - i) for i in range(k + 1)) / math.comb(n, k)

# ---------------------------------------------------------------------------------------------
# on a tiny model


def test_pairs_within_a_block_are_those_split_by_block_counts_inside():
    assert [pair_within_block(layer, 4) for layer in range(7)] == [True, True, True, False, True, True, True]
    assert [pair_within_block(layer, 1) for layer in range(3)] == [False] * 3


def test_record_summary_and_consecutive_pairs_agree_with_the_single_measures():
    rec = routing_record(build(), TOKENS)  # PathB4 at tiny: 4 layers, 8 experts, one block of 4 by default
    summary = record_summary(rec, 8, block=2)
    stats = path_statistics(rec["top1"])
    assert summary["path_entropy_bits"] == stats["path_entropy_bits"] and summary["unique_paths"] == stats["unique_paths"]
    assert summary["block_path_entropy_bits"] == pytest.approx(sum(block_path_entropy(rec["top1"], 2)) / 2)
    assert summary["nmi"] == pytest.approx(sum(a["nmi"] for a in consecutive_agreement(rec["top1"], 8)) / 3)
    pairs = consecutive_pairs(rec, 8, block=2)
    assert [(p["pair"], p["within_block"]) for p in pairs] == [("0-1", True), ("1-2", False), ("2-3", True)]
    assert [p["jaccard"] for p in pairs] == consecutive_jaccard(rec["topk"])
    assert summary["jaccard"] == pytest.approx(sum(p["jaccard"] for p in pairs) / 3)
    with pytest.raises(ValueError, match="block=3"):
        consecutive_pairs(rec, 8, block=3)


def test_routing_record_shapes():
    model = build().train()
    rec = routing_record(model, TOKENS)
    assert model.training  # the caller's mode is restored
    n = TOKENS.numel()
    assert rec["top1"].shape == (n, 4) and rec["top1"].dtype == torch.long
    assert len(rec["topk"]) == 4 and all(t.shape == (n, 2) for t in rec["topk"])
    assert len(rec["probs"]) == 4 and all(p.shape == (n, 8) for p in rec["probs"])
    assert torch.equal(rec["top1"][:, 2], rec["topk"][2][:, 0])
    assert torch.equal(rec["top1"][:, 1], rec["probs"][1].argmax(dim=-1))
    assert torch.allclose(rec["probs"][0].sum(dim=-1), torch.ones(n))
    assert torch.equal(rec["tokens"], TOKENS.reshape(-1))
    # PathB4 shares one router across the 4 layers: the metrics all run on the record
    assert path_statistics(rec["top1"])["tokens"] == n
    assert len(consecutive_agreement(rec["top1"], 8)) == 3 and len(consecutive_jaccard(rec["topk"])) == 3
    assert all(-1.0 <= r <= 1.0 for r in consecutive_correlation(rec["probs"]))
    assert sum((i + 1) * h for i, h in enumerate(run_length_histogram(rec["top1"]))) == 4 * n  # runs cover every layer once
    assert all(0.0 <= h <= 3.0 for h in token_routing_entropy(rec["probs"]))


def test_expert_permutations():
    perms = expert_permutations(4, 8, seed=1)
    assert all(sorted(p.tolist()) == list(range(8)) for p in perms)
    assert any(not torch.equal(p, torch.arange(8)) for p in perms)
    some = expert_permutations(4, 8, seed=1, layers=[2])
    assert torch.equal(some[2], perms[2])
    assert all(torch.equal(some[layer], torch.arange(8)) for layer in (0, 1, 3))


def test_shuffle_robustness():
    model = build()
    identity = shuffle_robustness(model, BATCHES, CPU, layers=[])
    assert identity["increase_pct"] == 0.0 and identity["clean_ppl"] == identity["shuffled_ppl"]
    shuffled = shuffle_robustness(model, BATCHES, CPU, seed=0)
    assert shuffled["layers"] == [0, 1, 2, 3]
    assert shuffled["clean_ppl"] == identity["clean_ppl"]
    assert shuffled["shuffled_ppl"] != shuffled["clean_ppl"]
    assert shuffled["increase_pct"] == pytest.approx(100 * (shuffled["shuffled_ppl"] / shuffled["clean_ppl"] - 1))
    assert math.isnan(shuffled["increase_std"])


def test_shuffle_robustness_averages_draws_of_consecutive_seeds():
    model = build()
    single = [shuffle_robustness(model, BATCHES, CPU, seed=s)["increase_pct"] for s in (5, 6, 7)]
    drawn = shuffle_robustness(model, BATCHES, CPU, seed=5, draws=3)
    assert drawn["increase_pct"] == pytest.approx(sum(single) / 3)
    assert drawn["increase_std"] == pytest.approx(torch.tensor(single, dtype=torch.float64).std().item())
    assert drawn["increase_std"] > 0
    with pytest.raises(ValueError, match="draws=0"):
        shuffle_robustness(model, BATCHES, CPU, draws=0)


def test_single_layer_shuffle():
    model = build()
    result = single_layer_shuffle(model, BATCHES, CPU, seed=3)
    assert len(result["per_layer_pct"]) == 4
    assert result["increase_pct"] == pytest.approx(sum(result["per_layer_pct"]) / 4)
    only_layer_2 = shuffle_robustness(model, BATCHES, CPU, seed=3, layers=[2])
    assert result["per_layer_pct"][2] == pytest.approx(only_layer_2["increase_pct"])


def test_token_fraction_shuffle():
    model = build()
    none, everyone = token_fraction_shuffle(model, BATCHES, CPU, [0.0, 1.0], seed=0)
    assert none["increase_pct"] == 0.0 and none["rho"] == 0.0
    assert everyone["ppl"] == pytest.approx(shuffle_robustness(model, BATCHES, CPU, seed=0)["shuffled_ppl"])


def test_router_noise_robustness():
    model = build()
    state = torch.get_rng_state()
    quiet, loud = router_noise_robustness(model, BATCHES, CPU, [0.0, 3.0], seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # torch's global generator is left alone
    assert quiet["jaccard"] == 1.0 and quiet["increase_pct"] == 0.0
    assert loud["jaccard"] < 1.0 and loud["sigma"] == 3.0
    assert router_noise_robustness(model, BATCHES, CPU, [3.0], seed=0) == [loud]


def test_dense_models_are_rejected():
    model = build("dense_iso_flop")
    with pytest.raises(ValueError, match="MoE"):
        routing_record(model, TOKENS)
    with pytest.raises(ValueError, match="MoE"):
        shuffle_robustness(model, BATCHES, CPU)


def test_load_statistics_of_balanced_skewed_and_collapsed_routers():
    from moe_core.analysis.utilisation import load_statistics, selection_shares

    balanced = load_statistics(selection_shares(torch.arange(8).repeat(4), 8), 8)
    assert balanced == {"cv": 0.0, "max_over_mean": 1.0, "dead_frac": 0.0, "entropy_bits": 3.0, "entropy_norm": 1.0}
    collapsed = load_statistics(selection_shares(torch.zeros(10, 2, dtype=torch.long), 4), 4)
    assert collapsed["max_over_mean"] == 4.0 and collapsed["dead_frac"] == 0.75 and collapsed["entropy_bits"] == 0.0
    assert collapsed["cv"] == pytest.approx(3 ** 0.5)  # loads (1, 0, 0, 0): std sqrt(3)/4 over mean 1/4
    skewed = load_statistics([0.5, 0.25, 0.25, 0.0], 4)
    assert skewed["entropy_bits"] == pytest.approx(1.5) and skewed["entropy_norm"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="expert id 4 is out of range for n_experts=4"):
        selection_shares([0, 4], 4)


def test_aligned_labels_undo_each_layers_renaming():
    """Four layers routing every token alike, each layer's experts renamed at random: index runs see noise,
    the relabelled ones see every token keep its expert through all four layers."""
    g = torch.Generator().manual_seed(0)
    first = torch.randint(0, 8, (500,), generator=g)
    top1 = torch.stack([torch.randperm(8, generator=g)[first] for _ in range(4)], dim=1)
    aligned = aligned_labels(top1, 8)
    assert (aligned == aligned[:, :1]).all() and (aligned[:, 0] == top1[:, 0].numpy()).all()  # layer 0 keeps its ids
    assert sustained_engagement(aligned) == 1.0 > sustained_engagement(top1)


def test_ranked_loads_sort_each_event_before_averaging():
    """Two layers with the same skewed profile under different expert ids: averaging by id would flatten it."""
    skewed = [0.7, 0.2, 0.1, 0.0]
    profile = ranked_loads([skewed, skewed[::-1]])
    assert profile.tolist() == pytest.approx(skewed)
