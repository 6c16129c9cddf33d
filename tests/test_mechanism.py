"""Mechanism analyses (spec 4.3-4.8) on tiny models and on hand-built cases with known answers."""
import copy
import dataclasses

import pytest
import torch

from moe_core.analysis.mechanism import (
    cosine, cost_at_saving, expert_zeroing, frozen_routing, halting_sweep, hop_collinearity, hop_jaccard,
    identity_cosine, jaccard_matrix, moe_attention_norm_ratio, set_jaccard, vocab_projection_jaccard,
    weight_alignment_cosine,
)
from moe_core.evaluate import evaluate
from moe_core.model import MoETransformer
from moe_core.trajectory import Interventions
from moe_core.variants import resolve

CPU = torch.device("cpu")
_g = torch.Generator().manual_seed(0)
TOKENS = torch.randint(0, 512, (4, 32), generator=_g)
BATCHES = [(torch.randint(0, 512, (4, 32), generator=_g), torch.randint(0, 512, (4, 32), generator=_g))
           for _ in range(2)]


def build(variant, seed=0, **changes):
    cfg = dataclasses.replace(resolve(variant, "tiny").model, **changes)
    torch.manual_seed(seed)
    return MoETransformer(cfg).eval()


def set_experts(model, w_down, w_up):
    """Give every expert of every layer the same read and write rows."""
    with torch.no_grad():
        for block in model.blocks:
            block.ffn.experts.w_down.copy_(w_down.expand_as(block.ffn.experts.w_down))
            block.ffn.experts.w_up.copy_(w_up.expand_as(block.ffn.experts.w_up))
    return model


def traced_hops(model, tokens, **interventions):
    """layer -> that layer's hop events, straight from the model's forward pass."""
    with torch.no_grad():
        events = model(tokens, iv=Interventions(trace=True, **interventions)).events
    layers = {}
    for ev in events:
        layers.setdefault(ev.layer, []).append(ev)
    return layers


def orthogonal_pair(d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=g))
    return q[:, 0], q[:, 1]


# --- small helpers


def test_cosine_of_zero_rows_is_zero_not_nan():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [1.0, 1.0], [-1.0, -1.0]])
    torch.testing.assert_close(cosine(a, b), torch.tensor([1.0, 0.0, -1.0]))


def test_set_jaccard_and_jaccard_matrix():
    a, b = torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]]), torch.tensor([[2, 3, 4, 5], [8, 7, 6, 5]])
    torch.testing.assert_close(set_jaccard(a, b), torch.tensor([2 / 6, 1.0]))
    m = jaccard_matrix(a, b, vocab_size=10)
    torch.testing.assert_close(m, torch.tensor([[2 / 6, 0.0], [1 / 7, 1.0]]))


# --- echo chamber


def test_collinearity_is_the_mean_cosine_of_each_tokens_first_two_updates():
    """Decoupled per-hop projections give hops that point different ways (the untrained tiny Deep's hops
    are near-identical, which would let a comparison of hop 0 with itself pass): recomputed here from
    the traced updates, token by token."""
    model = build("decoupled")
    r = hop_collinearity(model, TOKENS)
    want = [torch.nn.functional.cosine_similarity(ev[0].update, ev[1].update, dim=-1).mean().item()
            for _, ev in sorted(traced_hops(model, TOKENS).items())]
    assert r["layers"] == [0, 1, 2, 3]
    assert r["per_layer"] == pytest.approx(want, abs=1e-6)
    assert r["mean"] == pytest.approx(sum(want) / 4)
    assert max(abs(v) for v in want) < 0.5  # far from the value a hop compared with itself gives


def test_collinearity_is_one_when_every_hop_writes_the_same_direction():
    """All experts read d and write u with u orthogonal to d: every hop adds SiLU(<x, d>) u."""
    d, u = orthogonal_pair(32)
    model = set_experts(build("deep"), d, u)
    assert hop_collinearity(model, TOKENS)["mean"] == pytest.approx(1.0, abs=1e-5)


def test_collinearity_of_zero_updates_is_zero_and_skips_one_hop_layers():
    model = set_experts(build("asymmetric", hops=(1, 2, 1, 3)), torch.zeros(32), torch.randn(32))
    r = hop_collinearity(model, TOKENS)  # w_down = 0: SiLU(0) = 0, every update is zero
    assert r["layers"] == [1, 3] and r["per_layer"] == [0.0, 0.0] and r["mean"] == 0.0


def test_jaccard_is_one_with_frozen_routing_and_the_set_overlap_of_consecutive_hops_otherwise():
    model = build("decoupled")
    frozen = hop_jaccard(model, TOKENS, freeze_routing=True)
    assert frozen["per_layer"] == [1.0] * 4 and frozen["mean"] == 1.0
    normal = hop_jaccard(model, TOKENS)
    want = []
    for _, ev in sorted(traced_hops(model, TOKENS).items()):  # Python sets, token by token, pair by pair
        pairs = [[len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(a.routing.idx.tolist(), b.routing.idx.tolist())]
                 for a, b in zip(ev, ev[1:])]
        want.append(sum(sum(p) / len(p) for p in pairs) / len(pairs))
    assert normal["per_layer"] == pytest.approx(want, abs=1e-6)
    assert max(want) < 0.5  # the hops of this model do re-route


def test_jaccard_is_one_when_experts_do_nothing():
    """Zero updates leave the state, hence the re-routed position, unchanged at every hop."""
    model = set_experts(build("deep"), torch.randn(32), torch.zeros(32))
    assert hop_jaccard(model, TOKENS)["mean"] == 1.0


def test_one_hop_models_have_no_hop_pairs():
    with pytest.raises(ValueError, match="at least 2 hops"):
        hop_collinearity(build("wide"), TOKENS)
    with pytest.raises(ValueError, match="at least 2 hops"):
        hop_jaccard(build("wide"), TOKENS)


def test_frozen_routing_reports_both_perplexities():
    model = build("decoupled")  # its hops re-route, so freezing the routing changes the perplexity
    r = frozen_routing(model, BATCHES, CPU)
    assert r["normal_ppl"] == pytest.approx(evaluate(model, BATCHES, CPU)["val_ppl"])
    assert r["frozen_ppl"] == pytest.approx(evaluate(model, BATCHES, CPU, iv=Interventions(freeze_routing=True))["val_ppl"])
    assert r["frozen_ppl"] != r["normal_ppl"]
    assert r["delta_ppl_pct"] == pytest.approx(100 * (r["frozen_ppl"] / r["normal_ppl"] - 1))
    assert r["jaccard"] == pytest.approx(hop_jaccard(model, BATCHES[0][0])["mean"])


def test_analyses_restore_training_mode():
    model = build("deep").train()
    hop_collinearity(model, TOKENS)
    frozen_routing(model, BATCHES, CPU)
    assert model.training


# --- halting


def test_halting_sweep_baseline_and_full_halt():
    model = build("deep")
    rows = halting_sweep(model, BATCHES, CPU)
    assert [r["eps"] for r in rows] == [0.0, 0.02, 0.05, 0.10, 0.15]
    assert rows[0]["mean_hops"] == 3.0 and rows[0]["flop_saving"] == 0.0 and rows[0]["delta_ppl_pct"] == 0.0
    full = halting_sweep(model, BATCHES, CPU, eps=(1e9,))[1]
    assert full["mean_hops"] == 1.0 and full["flop_saving"] == pytest.approx(1 - 1 / 3)


def test_halting_sweep_halts_part_of_the_tokens_more_as_eps_grows():
    """An untrained model's updates are tiny next to its state (every eps above 0.002 stops every token after
    one hop), so these thresholds are small: each one halts some tokens and not others."""
    model = build("deep")
    rows = halting_sweep(model, BATCHES, CPU, eps=(1e-4, 1.8e-4, 3.2e-4, 5.6e-4))[1:]
    hops = [r["mean_hops"] for r in rows]
    assert all(1 < h < 3 for h in hops) and all(a > b for a, b in zip(hops, hops[1:])), hops
    for r in rows:  # each row is the model's own count of executed hops under that threshold
        with torch.no_grad():
            direct = [model(x, iv=Interventions(halt_eps=r["eps"])).hops.float().mean() for x, _ in BATCHES]
        assert r["mean_hops"] == pytest.approx(torch.stack(direct).mean().item())
        assert r["flop_saving"] == pytest.approx(1 - r["mean_hops"] / 3)


def test_halting_sweep_counts_per_layer_hop_slots():
    model = build("asymmetric", hops=(2, 1, 3, 4))
    base, full = halting_sweep(model, BATCHES, CPU, eps=(1e9,))
    assert base["hops_per_layer"] == [2.0, 1.0, 3.0, 4.0] and base["flop_saving"] == 0.0
    assert full["hops_per_layer"] == [1.0] * 4 and full["flop_saving"] == pytest.approx(1 - 4 / 10)


def test_halting_sweep_rejects_non_positive_eps():
    with pytest.raises(ValueError, match="> 0"):
        halting_sweep(build("deep"), BATCHES, CPU, eps=(0.0, 0.1))
    with pytest.raises(ValueError, match="> 0"):
        halting_sweep(build("deep"), BATCHES, CPU, eps=(float("nan"),))


def test_cost_at_saving_interpolates_between_sweep_rows():
    rows = [{"flop_saving": 0.0, "delta_ppl_pct": 0.0}, {"flop_saving": 0.4, "delta_ppl_pct": 2.0},
            {"flop_saving": 0.1, "delta_ppl_pct": 1.0}]  # out of order, as no sweep promises its order
    assert cost_at_saving(rows, 0.25) == pytest.approx(1.5)  # halfway between 0.1 (1.0) and 0.4 (2.0)
    assert cost_at_saving(rows, 0.1) == pytest.approx(1.0)
    assert cost_at_saving(rows, 0.5) is None  # never saved that much: no extrapolation


# --- expert contribution


def test_expert_zeroing_equals_experts_that_write_nothing():
    model = build("wide")
    r = expert_zeroing(model, BATCHES, CPU)
    silent = set_experts(copy.deepcopy(model), torch.zeros(32), torch.zeros(32))
    assert r["zeroed_ppl"] == pytest.approx(evaluate(silent, BATCHES, CPU)["val_ppl"], rel=1e-6)
    assert r["zeroed_ppl"] != r["normal_ppl"]
    assert r["ratio"] == pytest.approx(r["zeroed_ppl"] / r["normal_ppl"])


def test_expert_zeroing_is_a_no_op_when_experts_write_nothing():
    model = set_experts(build("wide"), torch.randn(32), torch.zeros(32))
    r = expert_zeroing(model, BATCHES, CPU)
    assert r["zeroed_ppl"] == pytest.approx(r["normal_ppl"], rel=1e-6)


def test_moe_attention_norm_ratio():
    r = moe_attention_norm_ratio(build("deep"), TOKENS)
    assert len(r["per_layer"]) == 4 and all(v > 0 for v in r["per_layer"])
    silent = set_experts(build("deep"), torch.randn(32), torch.zeros(32))
    assert moe_attention_norm_ratio(silent, TOKENS)["per_layer"] == [0.0] * 4


def test_moe_attention_norm_ratio_scales_with_magnitude_alpha():
    """Layer 0 sees the same input either way, so doubling alpha doubles its ratio exactly."""
    one, two = build("magnitude"), build("magnitude")
    with torch.no_grad():
        one.alpha.fill_(1.0)
        two.alpha.fill_(2.0)
    r1, r2 = moe_attention_norm_ratio(one, TOKENS), moe_attention_norm_ratio(two, TOKENS)
    assert r2["per_layer"][0] == pytest.approx(2 * r1["per_layer"][0], rel=1e-5)


# --- identity and cross-seed alignment


def test_identity_cosine_known_answers():
    v = torch.randn(32)
    same = identity_cosine(set_experts(build("deep"), v, v))
    assert same["mean"] == pytest.approx(1.0) and same["frac_abs_above_0.8"] == 1.0
    assert same["frac_abs_below_0.2"] == 0.0 and len(same["values"]) == 4 * 32
    flipped = identity_cosine(set_experts(build("deep"), v, -v))
    assert flipped["mean"] == pytest.approx(-1.0) and flipped["mean_abs"] == pytest.approx(1.0)
    d, u = orthogonal_pair(32)
    orth = identity_cosine(set_experts(build("deep"), d, u))
    assert orth["mean_abs"] == pytest.approx(0.0, abs=1e-6) and orth["frac_abs_below_0.2"] == 1.0


def test_identity_cosine_has_one_value_per_rank_row():
    r = identity_cosine(build("rank2"))
    assert len(r["values"]) == 4 * 32 * 2 and all(-1.0 <= v <= 1.0 for v in r["values"])


def permuted(model, seed=1, sign=1.0):
    """A copy whose experts are shuffled within each layer (and write vectors optionally negated)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in other.blocks:
            order = torch.randperm(block.ffn.experts.w_up.shape[0], generator=g)
            block.ffn.experts.w_up.copy_(sign * block.ffn.experts.w_up[order])
    return other


def test_vocab_projection_jaccard_self_and_permuted_match_perfectly():
    model = build("wide")
    same = vocab_projection_jaccard(model, model)
    assert same["per_layer"] == [1.0] * 4 and same["mean"] == 1.0
    assert same["random_baseline"] < 0.3 and same["random_pair_mean"] < same["random_baseline"]
    assert vocab_projection_jaccard(model, permuted(model))["mean"] == 1.0


def test_vocab_projection_jaccard_across_seeds_and_baseline_is_deterministic():
    a, b = build("wide", seed=0), build("wide", seed=1)
    r1, r2 = vocab_projection_jaccard(a, b), vocab_projection_jaccard(a, b)
    assert r1 == r2 and 0.0 < r1["mean"] < 1.0
    assert vocab_projection_jaccard(a, b, seed=1)["random_baseline"] != r1["random_baseline"]


def test_vocab_projection_jaccard_needs_rank_one():
    with pytest.raises(ValueError, match="rank-1"):
        vocab_projection_jaccard(build("rank2"), build("rank2"))


def test_weight_alignment_cosine():
    model = build("deep")
    same = weight_alignment_cosine(model, model)
    assert same["mean"] == pytest.approx(1.0) and same["per_layer"] == pytest.approx([1.0] * 4)
    assert weight_alignment_cosine(model, permuted(model, sign=-1.0))["mean"] == pytest.approx(1.0)
    other = weight_alignment_cosine(model, build("deep", seed=1))
    assert other == weight_alignment_cosine(model, build("deep", seed=1))  # seeded baseline
    assert 0.0 < other["random_baseline"] < 1.0 and other["mean"] < 1.0


# --- dense models have no experts or routing


@pytest.mark.parametrize("analysis", [
    lambda m: hop_collinearity(m, TOKENS),
    lambda m: hop_jaccard(m, TOKENS),
    lambda m: frozen_routing(m, BATCHES, CPU),
    lambda m: halting_sweep(m, BATCHES, CPU),
    lambda m: expert_zeroing(m, BATCHES, CPU),
    lambda m: identity_cosine(m),
    lambda m: vocab_projection_jaccard(m, m),
    lambda m: weight_alignment_cosine(m, m),
])
def test_dense_models_raise(analysis):
    with pytest.raises(ValueError, match="needs an MoE model"):
        analysis(build("dense_iso_flop"))
