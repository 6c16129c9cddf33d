"""Routers: output contracts, parameter sharing and freezing, the balance loss."""
import pytest
import torch

from moe_core.model import MoETransformer
from moe_core.routing import (CosineRouter, CosineScores, HashRouter, LinearRouter, LowRankRouter, RecurrentRouter, Routing,
                              hash_scores, router_z_loss, select_top_k, switch_balance_loss, unit_columns)
from moe_core.variants import resolve

D, M, K, N = 32, 24, 5, 64


def routers():
    torch.manual_seed(0)
    return {
        "cosine": CosineRouter(D, 8, M, K, tau=30.0),
        "cosine_learned_tau": CosineRouter(D, 8, M, K, tau=10.0, learn_tau=True),
        "decoupled": CosineRouter(D, 8, M, K, tau=30.0, n_proj=3),
        "linear": LinearRouter(D, M, K),
        "lowrank": LowRankRouter(D, M, K, n_layers=4, rank=2),
        "hash": HashRouter(M, K),
        "recurrent": RecurrentRouter(D, M, K, n_layers=4, hidden=8),
    }


@pytest.mark.parametrize("name", list(routers()))
def test_router_contract(name):
    router = routers()[name]
    h = torch.randn(N, D)
    keys = torch.randint(0, 1000, (N,))
    for hop in range(3):
        r = router.decide(h, layer=1, hop=hop, keys=keys)
        assert r.idx.shape == (N, K) and r.weights.shape == (N, K)
        assert r.idx.dtype == torch.int64 and r.weights.dtype == torch.float32
        assert ((r.idx >= 0) & (r.idx < M)).all()
        assert all(len(set(row.tolist())) == K for row in r.idx), "experts must be distinct per token"
        torch.testing.assert_close(r.weights.sum(-1), torch.ones(N))
        assert (r.weights > 0).all()
        if r.probs is not None:
            torch.testing.assert_close(r.probs.sum(-1), torch.ones(N))
            # the kept weights are the top-k probabilities, renormalised
            kept = r.probs.gather(1, r.idx)
            torch.testing.assert_close(r.weights, kept / kept.sum(-1, keepdim=True))
            assert (kept.min(-1).values >= r.probs.topk(K, -1).values[:, -1] - 1e-7).all()


def test_cosine_scores_bounded_by_tau():
    router = CosineRouter(D, 8, M, K, tau=30.0)
    logits = router.logits(torch.randn(N, D) * 50, layer=0, hop=0)
    assert logits.abs().max() <= 30.0 + 1e-4
    # scale invariance: cosine routing ignores the norm of the token state
    h = torch.randn(N, D)
    torch.testing.assert_close(router.logits(h, 0, 0), router.logits(3 * h, 0, 0))


def test_cosine_scores_backward_passes_gradcheck():
    """The hand-written backward of CosineScores against finite differences, fp64, all four inputs."""
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(12, 10, generator=g), torch.randn(4, 10, generator=g), torch.randn(7, 4, generator=g),
              torch.tensor(1.3))
    assert torch.autograd.gradcheck(CosineScores.apply, tuple(x.double().requires_grad_() for x in inputs))


@pytest.mark.parametrize("kind", ["plain", "learned_tau", "per_hop", "frozen"])
def test_cosine_router_cpu_node_equals_the_traced_scores(kind):
    """On CPU the router's logits come from CosineScores: the traced formula's fp32 forward bit for bit, and
    its gradients (in fp64, where rounding does not blur them) for the inputs that need them: a fixed or
    learned temperature, per-hop projections, a frozen router."""
    torch.manual_seed(0)
    router = CosineRouter(D, 8, M, K, tau=10.0, learn_tau=kind == "learned_tau", n_proj=3 if kind == "per_hop" else 1,
                          frozen=kind == "frozen")
    h = torch.randn(N, D, requires_grad=True)
    for hop in range(2):
        fast = router.logits(h, layer=0, hop=hop)
        assert fast.grad_fn.name().startswith("CosineScores")
        assert torch.equal(fast, traced_cosine_scores(router, h, hop))
    # gradients in fp64 (the router computes in fp32), for the inputs that need them
    h = h.detach().double().requires_grad_()
    proj, centroids, log_tau = (t.detach().double().requires_grad_(t.requires_grad)
                                for t in (router.proj_in[0], router.centroids, router.log_tau))
    inputs = [t for t in (h, proj, centroids, log_tau) if t.requires_grad]
    upstream = torch.randn(N, M, dtype=torch.float64)
    traced = unit_columns(proj @ h.T).T @ (log_tau.exp() * unit_columns(centroids.T)).contiguous()
    want = torch.autograd.grad((traced * upstream).sum(), inputs)
    got = torch.autograd.grad((CosineScores.apply(h, proj, centroids, log_tau) * upstream).sum(), inputs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def traced_cosine_scores(router: CosineRouter, h: torch.Tensor, hop: int) -> torch.Tensor:
    """The cosine router's scores as plain autograd-traced operations (its path on GPUs and under compile)."""
    return router.position(h, hop) @ (router.tau * unit_columns(router.centroids.T)).contiguous()


def test_decoupled_router_uses_a_projection_per_hop():
    router = CosineRouter(D, 8, M, K, tau=30.0, n_proj=3)
    h = torch.randn(N, D)
    assert not torch.allclose(router.logits(h, 0, 0), router.logits(h, 0, 1))
    shared = CosineRouter(D, 8, M, K, tau=30.0)
    torch.testing.assert_close(shared.logits(h, 0, 0), shared.logits(h, 0, 2))


def test_select_top_k_without_renormalisation():
    logits = torch.randn(N, M)
    r = select_top_k(logits, K, renormalize=False)
    torch.testing.assert_close(r.weights, logits.softmax(-1).topk(K, -1).values)


def test_renormalised_weights_are_the_full_softmax_renormalised_gradients_included():
    """select_top_k takes the softmax of the k selected logits; it must equal p_i / sum of the k p_j."""
    logits = torch.randn(N, M, requires_grad=True)
    cotangent = torch.randn(N, K)
    r = select_top_k(logits, K)
    (grad,) = torch.autograd.grad((r.weights * cotangent).sum(), logits)
    kept = logits.softmax(-1).gather(1, r.idx)
    (ref_grad,) = torch.autograd.grad((kept / kept.sum(-1, keepdim=True) * cotangent).sum(), logits)
    torch.testing.assert_close(r.weights, (kept / kept.sum(-1, keepdim=True)).detach())
    torch.testing.assert_close(grad, ref_grad)
    assert torch.equal(r.idx, logits.softmax(-1).topk(K, -1).indices)


def test_hash_router_is_deterministic_and_parameter_free():
    router = HashRouter(M, K)
    assert sum(p.numel() for p in router.parameters()) == 0
    keys = torch.arange(500)
    a = router.decide(torch.randn(500, D), 0, 0, keys)
    b = HashRouter(M, K).decide(torch.randn(500, D), 0, 0, keys)  # different states, fresh router
    assert torch.equal(a.idx, b.idx)
    assert torch.equal(a.weights, torch.full((500, K), 1 / K))
    # layers and hops hash differently, and the load is roughly uniform
    assert not torch.equal(a.idx, router.decide(torch.randn(500, D), 1, 0, keys).idx)
    assert not torch.equal(a.idx, router.decide(torch.randn(500, D), 0, 1, keys).idx)
    load = torch.bincount(a.idx.flatten(), minlength=M).float()
    assert load.min() > 0.5 * load.mean() and load.max() < 1.5 * load.mean()
    with pytest.raises(ValueError, match="token ids"):
        router.decide(torch.randn(3, D), 0, 0, None)


def test_hash_scores_stay_in_range():
    scores = hash_scores(torch.tensor([0, 1, 2**31 - 2, 10**9]), 7, salt=3)
    assert scores.dtype == torch.int64 and (scores >= 0).all() and (scores < 2**31).all()


def test_random_fixed_router_has_no_trainable_parameters():
    model = MoETransformer(resolve("random_fixed", "tiny").model)
    router_params = list(model.routers.parameters())
    assert router_params and not any(p.requires_grad for p in router_params)
    model_rand = MoETransformer(resolve("rand", "tiny").model)
    assert not any(p.requires_grad for p in model_rand.routers.parameters())


@pytest.mark.parametrize("variant,block", [("path_b2", 2), ("path_b4", 4), ("path_bL", 4), ("indep", 1)])
def test_block_shared_routers_are_one_object(variant, block):
    cfg = resolve(variant, "tiny").model
    model = MoETransformer(cfg)
    assert len(model.routers) == cfg.n_layers // block
    for layer in range(cfg.n_layers):
        first = (layer // block) * block
        assert model.router_for_layer(layer) is model.router_for_layer(first)
        assert model.router_for_layer(layer).weight is model.router_for_layer(first).weight
    if block < cfg.n_layers:
        assert model.router_for_layer(0) is not model.router_for_layer(block)


def test_shared_router_gets_gradient_from_every_layer_of_its_block():
    model = MoETransformer(resolve("path_bL", "tiny").model)
    tokens = torch.randint(0, 512, (2, 16))
    grads = []
    for keep in range(model.cfg.n_layers):  # backprop through one layer's routing at a time
        model.zero_grad()
        out = model(tokens)
        events = [e for e in out.events if e.layer == keep]
        sum((e.routing.probs ** 2).sum() for e in events).backward()
        grads.append(model.routers[0].weight.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads)


def test_lowrank_router_starts_as_the_shared_base():
    router = LowRankRouter(D, M, K, n_layers=4, rank=2)
    h = torch.randn(N, D)
    torch.testing.assert_close(router.logits(h, 0, 0), router.logits(h, 3, 0))
    with torch.no_grad():
        router.lora_a.normal_()
    assert not torch.allclose(router.logits(h, 0, 0), router.logits(h, 3, 0))


def test_switch_balance_loss_is_one_when_balanced():
    # every expert chosen equally often with uniform probabilities -> M * sum(1/M * 1/M) = 1
    idx = torch.arange(M).reshape(-1, 1).repeat(1, 2)[:, :1]
    probs = torch.full((M, M), 1 / M)
    r = Routing(idx=idx, weights=torch.ones(M, 1), probs=probs, logits=probs.log())
    torch.testing.assert_close(switch_balance_loss([r], M), torch.tensor(1.0))
    # collapsed routing: everything to expert 0 with probability 1 -> M
    collapsed = Routing(idx=torch.zeros(M, 1, dtype=torch.long), weights=torch.ones(M, 1),
                        probs=torch.eye(M)[[0] * M], logits=None)
    torch.testing.assert_close(switch_balance_loss([collapsed], M), torch.tensor(float(M)))
    # "tokens" normalisation counts each token once per selection: k times larger for top-k
    r2 = select_top_k(torch.randn(N, M), 3)
    torch.testing.assert_close(switch_balance_loss([r2], M, "tokens"), 3 * switch_balance_loss([r2], M))


def test_balance_loss_per_micro_batch():
    r = select_top_k(torch.randn(3 * N, M), K)
    parts = [Routing(r.idx[i * N:(i + 1) * N], r.weights[i * N:(i + 1) * N], r.probs[i * N:(i + 1) * N], None)
             for i in range(3)]
    each = torch.stack([switch_balance_loss([p], M) for p in parts]).mean()
    torch.testing.assert_close(switch_balance_loss([r], M, groups=3), each)
    counts = torch.bincount(r.idx.reshape(-1), minlength=M).float()  # groups=1: the textbook formula
    probs = r.probs.clone().requires_grad_()
    ours = switch_balance_loss([Routing(r.idx, r.weights, probs, None)], M)
    textbook = M * (counts / r.idx.numel() * probs.mean(0)).sum()
    torch.testing.assert_close(ours, textbook)
    torch.testing.assert_close(torch.autograd.grad(ours, probs)[0], torch.autograd.grad(textbook, probs)[0])


def test_router_z_loss_and_layer_pooled_balance():
    logits = torch.randn(N, M)
    r = select_top_k(logits, K)
    torch.testing.assert_close(router_z_loss(r), (logits.logsumexp(-1) ** 2).mean())
    # pooling two hops into one event equals the loss of their concatenation
    r2 = select_top_k(torch.randn(N, M), K)
    both = Routing(idx=torch.cat([r.idx, r2.idx]), weights=torch.cat([r.weights, r2.weights]),
                   probs=torch.cat([r.probs, r2.probs]), logits=None)
    torch.testing.assert_close(switch_balance_loss([r, r2], M), switch_balance_loss([both], M))


def test_recurrent_router_carries_state_across_layers_and_resets_per_forward():
    router = RecurrentRouter(D, M, K, n_layers=3, hidden=8)
    h = torch.randn(N, D)
    first = router.logits(h, 0, 0)
    second = router.logits(h, 1, 0)  # same input, next layer: depends on the carried state
    router.reset()
    torch.testing.assert_close(router.logits(h, 0, 0), first)
    fresh = RecurrentRouter(D, M, K, n_layers=3, hidden=8)
    fresh.load_state_dict(router.state_dict())
    fresh.reset()
    fresh.logits(torch.zeros(N, D), 0, 0)  # a different layer-0 input changes layer 1's routing
    assert not torch.allclose(fresh.logits(h, 1, 0), second)
    model = MoETransformer(resolve("recurrent", "tiny").model).eval()
    tokens = torch.randint(0, 512, (2, 16))
    torch.testing.assert_close(model(tokens).logits, model(tokens).logits)  # no state leaks between passes


def test_xmoe_variant_is_low_dimensional_cosine_routing_with_learned_temperature():
    cfg = resolve("xmoe", "tiny").model
    model = MoETransformer(cfg)
    router = model.router_for_layer(0)
    assert isinstance(router, CosineRouter) and router.log_tau.requires_grad
    assert router.proj_in.shape[1] == cfg.d_space < cfg.d_model
    shared = MoETransformer(resolve("path_b4_xmoe", "tiny").model)
    assert len(shared.routers) == 1 and shared.router_for_layer(3) is shared.router_for_layer(0)


def test_expert_counts_both_ways_match_a_count_by_hand():
    """CPU counts with bincount, other devices with `scatter_counts`: both must count every id."""
    from moe_core.routing import expert_counts, scatter_counts
    idx = torch.randint(0, 7, (50, 3), generator=torch.Generator().manual_seed(0))
    by_hand = [sum(int(i) == e for i in idx.flatten()) for e in range(9)]
    assert by_hand[7:] == [0, 0]
    assert expert_counts(idx, 9).tolist() == by_hand
    assert scatter_counts(idx.flatten(), 9).tolist() == by_hand
    assert expert_counts(idx, 9).dtype == scatter_counts(idx.flatten(), 9).dtype == torch.int64


def test_ordered_int32_keys_order_as_the_floats():
    from moe_core.routing import ordered_int32
    values = torch.tensor([-float("inf"), -3.5, -1e-40, 0.0, 1e-40, 2.0, 3.5e38, float("inf")])
    assert ordered_int32(values).argsort().tolist() == list(range(len(values)))
