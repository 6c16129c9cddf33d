"""The model and the multi-hop trajectory: equivalences, interventions, parameter counts."""
import dataclasses

import pytest
import torch

from moe_core.config import ConfigError
from moe_core.model import MoETransformer
from moe_core.params import count_parameters
from moe_core.trajectory import Interventions
from moe_core.variants import resolve, variants

TOKENS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))


def build(variant, **changes):
    cfg = dataclasses.replace(resolve(variant, "tiny").model, **changes)
    torch.manual_seed(0)
    return MoETransformer(cfg).eval()


def test_one_hop_trajectory_is_a_plain_top_k_moe():
    """H = 1 multi-hop equals wide: route x once, apply the experts, add to the residual."""
    model = build("deep", hops=(1,))
    layer, router = model.blocks[0].ffn, model.router_for_layer(0)
    x = torch.randn(2, 16, model.cfg.d_model)
    out, events, hops = layer(x, router, TOKENS, None, Interventions())
    flat = x.reshape(-1, x.shape[-1])
    r = router.decide(flat, 0, 0)
    expected = layer.experts.forward_loop(flat, r.idx, r.weights).reshape(x.shape)
    torch.testing.assert_close(out, expected)
    assert len(events) == 1 and (hops == 1).all()


def test_multi_hop_re_routes_from_the_updated_state():
    model = build("deep")
    layer, router = model.blocks[0].ffn, model.router_for_layer(0)
    x = torch.randn(2, 16, model.cfg.d_model)
    flat = x.reshape(-1, x.shape[-1])
    h_accum = torch.zeros_like(flat)
    for hop in range(3):  # Algorithm 1 written out, with the reference expert loop
        r = router.decide(flat + h_accum, 0, hop)
        h_accum = h_accum + layer.experts.forward_loop(flat + h_accum, r.idx, r.weights)
    out, events, _ = layer(x, router, TOKENS, None, Interventions())
    torch.testing.assert_close(out, h_accum.reshape(x.shape))
    assert [e.hop for e in events] == [0, 1, 2]


@pytest.mark.parametrize("profile", ["tiny", "smoke", "paper"])
def test_wide_is_deep_with_one_hop_of_three_times_the_top_k(profile):
    """Wide 1x12 is Deep 3x4 folded into one hop (12 = 3 x 4 at the paper scale, scaled alike at the others);
    the two variants differ in nothing else. The one-hop trajectory itself is tested above."""
    deep, wide = resolve("deep", profile).model, resolve("wide", profile).model
    assert dataclasses.replace(deep, hops=(1,), top_k=wide.top_k) == wide and wide.top_k == 3 * deep.top_k


def test_halting_stops_each_token_on_its_own_ratio():
    """Against the trajectory written out for one token at a time: hop, add, stop once ||dh|| / ||x + h||
    falls below eps. eps is the median of the hop-0 ratios, so about half the tokens stop after one hop."""
    model = build("deep")
    layer, router = model.blocks[0].ffn, model.router_for_layer(0)
    x = torch.randn(2, 16, model.cfg.d_model, generator=torch.Generator().manual_seed(1))
    flat = x.reshape(-1, x.shape[-1])

    def one_token(row, eps):
        h, hops = torch.zeros_like(row), 0
        for hop in range(3):
            r = router.decide(row + h, 0, hop)
            dh = layer.experts.forward_loop(row + h, r.idx, r.weights)
            h, hops = h + dh, hops + 1
            if dh.norm() / ((row + h).norm() + 1e-6) < eps:
                break
        return h, hops

    with torch.no_grad():
        r = router.decide(flat, 0, 0)
        dh = layer.experts.forward_loop(flat, r.idx, r.weights)
        eps = (dh.norm(dim=-1) / ((flat + dh).norm(dim=-1) + 1e-6)).median().item()
        out, _, hops = layer(x, router, TOKENS, None, Interventions(halt_eps=eps))
        want = [one_token(flat[t:t + 1], eps) for t in range(flat.shape[0])]
    torch.testing.assert_close(out.reshape(flat.shape), torch.cat([h for h, _ in want]))
    assert hops.flatten().tolist() == [n for _, n in want]
    assert 1 in hops and hops.max() > 1  # some tokens stopped early, some went on


def test_halting_counts_executed_hops():
    model = build("deep")
    never = model(TOKENS, iv=Interventions(halt_eps=1e-12))
    torch.testing.assert_close(never.logits, model(TOKENS).logits)
    always = model(TOKENS, iv=Interventions(halt_eps=1e9))  # every token stops after its first hop
    assert (always.hops == 1).all()
    one_hop = build("deep", hops=(1,))
    torch.testing.assert_close(always.logits, one_hop(TOKENS).logits)


def test_asymmetric_depth_runs_its_per_layer_hops():
    model = build("asymmetric")
    out = model(TOKENS)
    expected = model.cfg.hops_per_layer()
    assert [int(h.max()) for h in out.hops] == list(expected)
    assert len(out.events) == sum(expected)


def test_frozen_routing_reuses_hop_zero_experts():
    model = build("deep")
    out = model(TOKENS, iv=Interventions(freeze_routing=True))
    by_layer = {}
    for e in out.events:
        by_layer.setdefault(e.layer, []).append(e.routing.idx)
    assert all(torch.equal(ids[0], ids[h]) for ids in by_layer.values() for h in range(3))
    normal = model(TOKENS)
    assert not torch.allclose(normal.logits, out.logits)


def test_magnitude_alpha_scales_the_moe_update():
    model = build("magnitude")
    assert model.alpha is not None and model.alpha.item() == 3.0
    x = torch.randn(2, 16, model.cfg.d_model)
    layer, router = model.blocks[0].ffn, model.router_for_layer(0)
    scaled, _, _ = layer(x, router, TOKENS, model.alpha[0], Interventions())
    plain, _, _ = layer(x, router, TOKENS, None, Interventions())
    torch.testing.assert_close(scaled, 3.0 * plain)


def test_literal_residual_adds_the_layer_input():
    accum = build("wide")
    literal = build("wide", residual="literal")
    literal.load_state_dict(accum.state_dict())
    x = torch.randn(2, 16, accum.cfg.d_model)
    a, _, _ = accum.blocks[0].ffn(x, accum.router_for_layer(0), TOKENS, None, Interventions())
    b, _, _ = literal.blocks[0].ffn(x, literal.router_for_layer(0), TOKENS, None, Interventions())
    torch.testing.assert_close(b, x + a)


def test_zeroing_the_moe_leaves_attention_only():
    model = build("wide")
    out = model(TOKENS, iv=Interventions(zero_moe=True, trace=True))
    assert all((n == 0).all() for n in out.ffn_norms)
    assert all((n > 0).all() for n in out.attn_norms)


def test_trace_keeps_hop_updates():
    out = build("deep")(TOKENS, iv=Interventions(trace=True))
    assert all(e.update is not None and e.update.shape == (32, 32) for e in out.events)


def test_tied_embeddings_and_causality():
    model = build("wide")
    vocab_sized = [n for n, p in model.named_parameters() if p.shape == (512, model.cfg.d_model)]
    assert vocab_sized == ["embed.weight"]  # the LM head reuses the embedding
    changed = TOKENS.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 512
    a, b = model(TOKENS).logits, model(changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])  # the future never leaks into the past
    assert not torch.allclose(a[:, 10:], b[:, 10:])


# The paper's counts (Table 3 / section 1.6 of the spec): ours must reproduce the routing
# counts exactly; the total is 2,048 short of the paper's 84,742,144 (unknown backbone term).
PAPER_COUNTS = {
    "wide": (84_740_096, 1_572_864),
    "deep": (84_740_096, 1_572_864),
    "decoupled": (85_264_384, 2_097_152),
    "random_fixed": (84_215_808, 1_048_576),
    "top1": (84_215_808, 1_048_576),
    "hash": (83_167_232, 0),
    "linear": (91_555_840, 8_388_608),
    "cosine_iso341": (91_547_648, 8_380_416),
    "rank16_wide": (83_462_144, 327_680),
    "dense_iso_param": (84_740_096, 0),
}


@pytest.mark.parametrize("variant", list(PAPER_COUNTS))
def test_paper_scale_parameter_counts(variant):
    counts = count_parameters(resolve(variant, "paper").model)
    assert (counts["total"], counts["routing"]) == PAPER_COUNTS[variant]


def test_paper_scale_derived_widths():
    assert resolve("dense_iso_param", "paper").model.d_ff == 1120
    assert resolve("dense_iso_flop", "paper").model.d_ff == 12
    assert resolve("cosine_iso341", "paper").model.d_space == 341
    linear = count_parameters(resolve("linear", "paper").model)["routing"]
    cosine = count_parameters(resolve("wide", "paper").model)["routing"]
    assert round(linear / cosine, 2) == 5.33  # the paper's "5.3x" / "80% fewer"


@pytest.mark.parametrize("overrides", [{"data": {"vocab_size": 400}}, {"model": {"n_layers": 2}},
                                       {"model": {"d_model": 96, "n_heads": 3}}])
def test_derived_widths_follow_the_overrides(overrides):
    """The iso baselines match the Wide model built with the same overrides, not the profile's plain Wide."""
    wide = resolve("wide", "smoke", overrides=overrides).model
    dense = resolve("dense_iso_param", "smoke", overrides=overrides).model
    one_neuron = 2 * dense.d_model * dense.n_layers  # d_ff is whole neurons: the closest total is this near
    assert abs(count_parameters(dense)["total"] - count_parameters(wide)["total"]) <= one_neuron / 2
    assert resolve("dense_iso_flop", "smoke", overrides=overrides).model.d_ff == wide.active_neurons
    top4 = {**overrides, "model": {**overrides.get("model", {}), "top_k": 4}}  # a Wide setting: the baseline follows
    assert resolve("dense_iso_flop", "smoke", overrides=top4).model.d_ff == 4


def test_expert_permutation_relabels_the_routing():
    model = build("path_b4")
    n = model.cfg.n_experts
    identity = [torch.arange(n)] * model.cfg.n_layers
    torch.testing.assert_close(model(TOKENS, iv=Interventions(expert_permutation=identity)).logits, model(TOKENS).logits)
    reverse = [torch.arange(n).flip(0)] * model.cfg.n_layers
    scrambled = model(TOKENS, iv=Interventions(expert_permutation=reverse))
    plain = model(TOKENS)
    assert torch.equal(scrambled.events[0].routing.idx, n - 1 - plain.events[0].routing.idx)
    assert not torch.allclose(scrambled.logits, plain.logits)


def test_per_token_expert_permutation():
    model = build("path_b4")
    n, n_tokens, layers = model.cfg.n_experts, TOKENS.numel(), model.cfg.n_layers
    reverse = torch.arange(n).flip(0)
    every_token = [reverse.expand(n_tokens, -1)] * layers
    torch.testing.assert_close(model(TOKENS, iv=Interventions(expert_permutation=every_token)).logits,
                               model(TOKENS, iv=Interventions(expert_permutation=[reverse] * layers)).logits)
    first_token_only = reverse.expand(n_tokens, -1).clone()
    first_token_only[1:] = torch.arange(n)
    routed = model(TOKENS, iv=Interventions(expert_permutation=[first_token_only] * layers)).events[0].routing.idx
    plain = model(TOKENS).events[0].routing.idx
    assert torch.equal(routed[0], n - 1 - plain[0]) and torch.equal(routed[1:], plain[1:])
    with pytest.raises(ValueError, match="rows"):
        model(TOKENS, iv=Interventions(expert_permutation=[first_token_only[:5]] * layers))


def test_router_noise_perturbs_only_the_routing():
    model = build("path_b4")
    torch.testing.assert_close(model(TOKENS, iv=Interventions(router_noise=0.0)).logits, model(TOKENS).logits)
    torch.manual_seed(1)
    noisy = model(TOKENS, iv=Interventions(router_noise=5.0))
    torch.manual_seed(1)
    again = model(TOKENS, iv=Interventions(router_noise=5.0))
    assert torch.equal(noisy.logits, again.logits)  # the noise comes from torch's generator
    assert not torch.equal(noisy.events[0].routing.idx, model(TOKENS).events[0].routing.idx)
    hashed = build("hash")  # a router that never reads h: the experts still see the clean input
    torch.testing.assert_close(hashed(TOKENS, iv=Interventions(router_noise=5.0)).logits, hashed(TOKENS).logits)


def test_monob_reuses_the_first_layers_decision_with_its_own_experts():
    model = build("monob4")
    assert model.cfg.router_decision_block == model.cfg.n_layers == 4
    events = model(TOKENS).events
    first = events[0].routing
    assert [e.layer for e in events] == [0, 1, 2, 3]
    assert all(torch.equal(e.routing.idx, first.idx) for e in events)
    assert all(torch.equal(e.routing.weights, first.weights) for e in events)
    experts = [dict(block.ffn.experts.named_parameters()) for block in model.blocks]
    for name, weight in experts[0].items():
        assert all(not torch.equal(weight, other[name]) for other in experts[1:])
    assert len(model.routers) == 1  # one router per block, called once per forward pass


def test_monob_blocks_decide_separately_and_relabel_per_layer():
    model = build("indep_nolbl", router_decision_block=2)
    idx = [e.routing.idx for e in model(TOKENS).events]
    assert torch.equal(idx[0], idx[1]) and torch.equal(idx[2], idx[3])
    assert not torch.equal(idx[1], idx[2])
    n = model.cfg.n_experts
    reverse_second = [torch.arange(n), torch.arange(n).flip(0), torch.arange(n), torch.arange(n)]
    shuffled = [e.routing.idx for e in model(TOKENS, iv=Interventions(expert_permutation=reverse_second)).events]
    assert torch.equal(shuffled[0], idx[0]) and torch.equal(shuffled[1], n - 1 - idx[0])  # only layer 1 relabelled


def test_decision_block_is_validated():
    with pytest.raises(ConfigError, match="choose one of 1, 2, 4") as err:
        resolve("path_b4", "tiny", overrides={"model": {"router_decision_block": 3}})
    assert err.value.key == "model.router_decision_block"
    with pytest.raises(ConfigError, match="hops=1"):
        resolve("deep", "tiny", overrides={"model": {"router_decision_block": 2}})
    assert resolve("monob_L", "smoke").model.router_decision_block == resolve("monob_L", "smoke").model.n_layers


@pytest.mark.parametrize("variant", sorted(variants()))
def test_every_variant_trains_one_step_at_tiny(variant):
    """Each named variant builds, runs forward and backward with a finite loss, and gives every trainable
    parameter a gradient (routers and experts included: nothing is silently cut from the graph)."""
    from moe_core.train import Objective
    cfg = resolve(variant, "tiny")
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, _ = Objective(model, cfg)(x, x)
    loss.backward()
    assert torch.isfinite(loss)
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None and "kinematic" not in n]
    assert not unused, f"{variant}: parameters without gradient: {unused}"
    # the balance loss alone reaches the routers; the language-modelling loss must too, through the gate
    # weights (except top-1, whose one renormalised weight is 1, and LoRA's B beside its zero-initialised A)
    model.zero_grad()
    model(x, x).loss.backward()
    routers = {n: p for n, p in model.named_parameters()
               if n.startswith("routers.") and p.requires_grad and "kinematic" not in n}  # the paper's unused vectors
    silent = [n for n, p in routers.items() if (p.grad is None or not p.grad.any()) and not n.endswith("lora_b")]
    assert not silent or cfg.model.top_k == 1, f"{variant}: routers without a language-modelling gradient: {silent}"
    assert bool(routers) == (cfg.model.ffn == "moe" and cfg.model.router != "hash" and not cfg.model.router_frozen)


@pytest.mark.parametrize("head_dim", [8, 32])
def test_complex_rope_is_the_real_rotation(head_dim):
    """CPU fp32 rotates by one complex product; values and gradients equal the real arithmetic to the
    last bit (exactly, where torch vectorises the product)."""
    from moe_core.model import apply_rope, rope_tables, rotate_pairs
    cos, sin = rope_tables(16, head_dim, 10_000.0)
    qkv = torch.randn(3, 16, 3, 2, head_dim, requires_grad=True)  # [B, T, q/k/v, heads, head_dim], as Attention has it
    grad = torch.randn(3, 16, 2, 2, head_dim)
    fast = apply_rope(qkv[:, :, :2], cos[:, None, None], sin[:, None, None])
    slow = rotate_pairs(qkv[:, :, :2], cos[:, None, None], sin[:, None, None])
    one_ulp = dict(rtol=1.2e-7, atol=1e-7)
    torch.testing.assert_close(fast, slow, **one_ulp)
    torch.testing.assert_close(torch.autograd.grad(fast, qkv, grad)[0], torch.autograd.grad(slow, qkv, grad)[0], **one_ulp)


def test_rope_scores_depend_only_on_relative_position():
    """<R_m q, R_n k> is a function of m - n: shifting both positions leaves the score unchanged."""
    from moe_core.model import apply_rope, rope_tables
    cos, sin = rope_tables(32, 8, 10_000.0)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    rotated = lambda x, pos: apply_rope(x, cos[pos].double(), sin[pos].double())  # noqa: E731
    scores = [rotated(q, m) @ rotated(k, m - 3) for m in (3, 10, 31)]
    torch.testing.assert_close(torch.stack(scores), scores[0].expand(3), rtol=1e-5, atol=1e-5)  # fp32 angle tables
    assert torch.allclose(rotated(q, 5).norm(), q.norm())  # a rotation


def test_ambiguity_options_change_what_they_name():
    """The paper-ambiguity switches no shipped variant uses still do what they say."""
    per_layer = build("magnitude", magnitude_scope="layer")
    assert per_layer.alpha.shape == (per_layer.cfg.n_layers,) and build("magnitude").alpha.shape == (1,)
    with torch.no_grad():
        per_layer.alpha[1:] = 0.0  # only the first layer's MoE contributes now
    zeroed_after_first = per_layer(TOKENS).logits
    manual = build("magnitude", magnitude_scope="layer")
    assert not torch.allclose(zeroed_after_first, manual(TOKENS).logits)

    by_position = build("hash", hash_key="position")
    ids = by_position(TOKENS).events[0].routing.idx  # [tokens, k]: the same position routes alike in every row
    per_row = ids.reshape(TOKENS.shape[0], TOKENS.shape[1], -1)
    assert torch.equal(per_row[0], per_row[1]) and not torch.equal(build("hash")(TOKENS).events[0].routing.idx, ids)

    raw = build("wide", renormalize=False, top_k=2)(TOKENS).events[0].routing.weights  # softmax over all M, kept
    renormalised = build("wide", top_k=2)(TOKENS).events[0].routing.weights
    assert (raw.sum(-1) < 1).all() and torch.allclose(renormalised, raw / raw.sum(-1, keepdim=True))
