"""Path analyses (PathMoE spec 4.1-4.6) on hand-built routing tables with known answers and on a tiny model."""
import math

import pytest
import torch

from moe_core.analysis.paths import (
    block_path_entropy, consecutive_agreement, consecutive_jaccard, expert_loads, expert_permutations,
    expert_usage_entropy, path_statistics, routing_record, shuffle_robustness, token_routing_entropy,
    unique_paths_curve,
)
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
    with pytest.raises(ValueError):
        unique_paths_curve(top1, [2001])


def test_block_path_entropy():
    top1 = random_top1(3000, 4, 8)
    assert block_path_entropy(top1, 4) == [pytest.approx(path_statistics(top1)["path_entropy_bits"])]
    per_layer = block_path_entropy(top1, 1)
    assert per_layer == pytest.approx(expert_usage_entropy(top1, 8))
    constant_block = top1.clone()
    constant_block[:, 2:] = 5
    assert block_path_entropy(constant_block, 2)[1] == 0.0
    with pytest.raises(ValueError):
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
    with pytest.raises(ValueError):
        expert_loads(top1, 2)


def test_token_routing_entropy():
    one_hot = torch.eye(8)[torch.tensor([0, 3, 7, 7])]
    uniform = torch.full((4, 8), 1 / 8)
    half = torch.tensor([[0.5, 0.5, 0, 0]])
    assert token_routing_entropy([one_hot, uniform, half]) == [0.0, pytest.approx(3.0), pytest.approx(1.0)]
    with pytest.raises(ValueError):
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


def random_set_jaccard(n, k):
    """Exact mean Jaccard of two uniformly random k-subsets of n (the overlap is hypergeometric).

    0.158 for n=16, k=4: spec 4.4's k / (2n - k) = 0.143 is the ratio of the expectations.
    """
    return sum(math.comb(k, i) * math.comb(n - k, k - i) * i / (2 * k - i) for i in range(k + 1)) / math.comb(n, k)

# ---------------------------------------------------------------------------------------------
# on a tiny model


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


def test_dense_models_are_rejected():
    model = build("dense_iso_flop")
    with pytest.raises(ValueError, match="MoE"):
        routing_record(model, TOKENS)
    with pytest.raises(ValueError, match="MoE"):
        shuffle_robustness(model, BATCHES, CPU)
