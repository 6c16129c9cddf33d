"""Every vectorised expert path equals the slow per-expert reference loop, forward and backward."""
import pytest
import torch

from moe_core.experts import RankExperts, StaticExperts, SwiGLUExperts, grouped_mm_supported, take_rows
from moe_core.routing import select_top_k


def routed_inputs(n, d, m, k, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    logits = torch.randn(n, m, generator=g, requires_grad=True)
    return h, logits, k


def outputs_and_grads(bank, path, h, logits, k, autocast: torch.dtype | None = None):
    """Route, run one path (under autocast to `autocast`, if given) with a fixed random cotangent; return
    output and every gradient."""
    for p in [h, logits, *bank.parameters()]:
        p.grad = None
    with torch.autocast(h.device.type, dtype=autocast, enabled=autocast is not None):
        r = select_top_k(logits, k)
        out = getattr(bank, path)(h, r.idx, r.weights)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    (out.float() * cotangent).sum().backward()
    return [out.detach(), h.grad.clone(), logits.grad.clone()] + [p.grad.clone() for p in bank.parameters()]


def assert_matches_loop(bank, path, n, d, m, k):
    inputs = routed_inputs(n, d, m, k, seed=m)
    if path == "forward_grouped":  # the grouped GEMM itself, not its fallback (torch >= 2.9 has it on the CPU)
        assert grouped_mm_supported(inputs[0].dtype, inputs[0].device, bank.w_gate, bank.w_out)
    fast = outputs_and_grads(bank, path, *inputs)
    slow = outputs_and_grads(bank, "forward_loop", *inputs)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", ["forward_gather", "forward_masked"])
@pytest.mark.parametrize("n,d,m,rank,k", [(50, 16, 12, 1, 4), (37, 24, 64, 1, 12), (20, 8, 9, 3, 2), (64, 32, 16, 16, 4)])
def test_rank_experts_fast_paths_match_loop(path, n, d, m, rank, k):
    torch.manual_seed(n)
    assert_matches_loop(RankExperts(m, d, rank, n_layers=2), path, n, d, m, k)


@pytest.mark.parametrize("path", ["forward_grouped", "forward_sorted", "forward_masked"])
@pytest.mark.parametrize("n,d,e,f,k", [(40, 16, 8, 12, 2), (33, 8, 16, 4, 4), (5, 8, 32, 8, 3), (64, 32, 32, 16, 4)])
def test_swiglu_fast_paths_match_loop(path, n, d, e, f, k):
    torch.manual_seed(n)
    assert_matches_loop(SwiGLUExperts(e, d, f, n_layers=2), path, n, d, e, k)


@pytest.mark.parametrize("n,d,m,k", [(30, 8, 16, 4), (7, 4, 64, 12)])
def test_static_experts_gather_matches_loop(n, d, m, k):
    torch.manual_seed(n)
    bank = StaticExperts(m, d, n_layers=2)
    h, logits, k = routed_inputs(n, d, m, k, seed=m)
    results = []
    for path in ("forward_gather", "forward_loop"):  # h gets no gradient: the update ignores it
        logits.grad, bank.vectors.grad = None, None
        r = select_top_k(logits, k)
        out = getattr(bank, path)(h, r.idx, r.weights)
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
        results.append([out.detach(), logits.grad.clone(), bank.vectors.grad.clone()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_static_expert_update_ignores_the_input_beyond_routing():
    bank = StaticExperts(5, 3, n_layers=1)
    idx, w = torch.tensor([[1, 4]]), torch.tensor([[0.25, 0.75]])
    expected = 0.25 * bank.vectors[1] + 0.75 * bank.vectors[4]
    for h in (torch.zeros(1, 3), torch.randn(1, 3)):
        torch.testing.assert_close(bank(h, idx, w)[0], expected)


def test_auto_backend_picks_a_tested_path():
    bank = RankExperts(16, 8, 1, n_layers=1)
    h, logits, k = routed_inputs(10, 8, 16, 4, seed=0)
    r = select_top_k(logits, k)
    torch.testing.assert_close(bank(h, r.idx, r.weights), bank.forward_loop(h, r.idx, r.weights))


@pytest.mark.parametrize("device,n_experts,k,backend", [
    ("cpu", 64, 12, "masked"), ("cpu", 64, 4, "masked"), ("cpu", 64, 1, "masked"),  # smoke Wide, Deep, Top-1
    ("cpu", 1024, 12, "gather"), ("cpu", 1024, 4, "gather"), ("cpu", 768, 12, "masked"),  # paper widths on CPU
    ("cpu", 256, 4, "masked"), ("cpu", 257, 4, "gather"),  # the boundary, M = 64 k
    ("cuda", 1024, 12, "masked"), ("cuda", 1024, 1, "masked"),  # GPUs: masked always
])
def test_auto_backend_follows_the_measured_crossover(device, n_experts, k, backend):
    assert RankExperts.auto_backend(torch.device(device), n_experts, k) == backend


def test_rank1_expert_is_one_read_and_one_write_direction():
    bank = RankExperts(4, 6, 1, n_layers=1)
    h = torch.randn(3, 6)
    idx = torch.tensor([[2], [0], [2]])
    w = torch.ones(3, 1)
    expected = torch.stack([torch.nn.functional.silu(h[i] @ bank.w_down[j, 0]) * bank.w_up[j, 0]
                            for i, j in enumerate([2, 0, 2])])
    torch.testing.assert_close(bank(h, idx, w), expected)


@pytest.mark.parametrize("table_shape,ids_shape", [((50,), (200,)), ((16, 7), (4096,)), ((64, 1, 24), (300, 12)),
                                                     ((9, 3, 8), (20, 2)), ((1024, 64), (4096,)), ((5,), ())])
def test_take_rows_is_advanced_indexing_with_a_thread_independent_backward(table_shape, ids_shape):
    """Forward: table[ids] exactly. Backward (ids repeat, so rows are summed): the bits of advanced indexing's
    on one thread, and the same bits on two threads, where advanced indexing's own differ at the larger
    shapes here ((64, 1, 24) by (300, 12) and the grouped path's (1,024, 64) by 4,096)."""
    g = torch.Generator().manual_seed(sum(table_shape) + sum(ids_shape))
    table = torch.randn(table_shape, generator=g, requires_grad=True)
    ids = torch.randint(0, table_shape[0], ids_shape, generator=g)
    cotangent = torch.randn(ids_shape + table_shape[1:], generator=g)
    threads, grads = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            rows = take_rows(table, ids)
            assert torch.equal(rows, table[ids])
            grads.append(torch.autograd.grad(rows, table, cotangent)[0])
            if n == 1:
                assert torch.equal(grads[0], torch.autograd.grad(table[ids], table, cotangent)[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(grads[0], grads[1])


def test_grouped_falls_back_to_sorted_on_unaligned_widths():
    bank = SwiGLUExperts(8, 8, 3, n_layers=1)  # d_ff = 3 floats = 12 bytes: not 16-byte aligned
    h, logits, k = routed_inputs(12, 8, 8, 2, seed=3)
    r = select_top_k(logits, k)
    assert not grouped_mm_supported(h.dtype, h.device, bank.w_gate, bank.w_out)
    torch.testing.assert_close(bank.forward_grouped(h, r.idx, r.weights), bank.forward_loop(h, r.idx, r.weights))


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def assert_close_to_scale(fast, slow):
    """bf16 parity, element by element: within 2% of the reference plus 1% of its largest magnitude (bf16
    keeps 8 bits; an absolute tolerance fixed in advance would dwarf outputs of size 1e-3)."""
    slow = slow.float()
    torch.testing.assert_close(fast.float(), slow, rtol=2e-2, atol=1e-2 * slow.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind,backend", [("swiglu", "grouped"), ("swiglu", "sorted"), ("swiglu", "masked"),
                                          ("rank", "masked"), ("rank", "gather")])
def test_dispatch_matches_loop_under_bf16_autocast(device, kind, backend):
    """Forward and backward: the gradients of the input, the routing logits and every expert weight."""
    torch.manual_seed(0)
    n_experts, k = (32, 4) if kind == "swiglu" else (256, 12)
    bank = SwiGLUExperts(32, 64, 32, n_layers=2) if kind == "swiglu" else RankExperts(256, 64, 1, n_layers=2)
    bank = bank.to(device)
    h = torch.randn(512, 64, device=device, requires_grad=True)
    logits = torch.randn(512, n_experts, device=device, requires_grad=True)
    if backend == "grouped" and not grouped_mm_supported(torch.bfloat16, h.device, bank.w_gate, bank.w_out):
        assert device == "cuda", "torch >= 2.9 has a grouped GEMM on the CPU"
        pytest.skip("torch's grouped GEMM on CUDA needs a Hopper-class GPU")
    (fast, *fast_grads), (slow, *slow_grads) = (outputs_and_grads(bank, path, h, logits, k, autocast=torch.bfloat16)
                                                for path in (f"forward_{backend}", "forward_loop"))
    assert fast.dtype == torch.bfloat16 or backend == "sorted"  # the matmuls ran in bf16 (sorted sums into fp32)
    assert_close_to_scale(fast, slow)
    for got, expected in zip(fast_grads, slow_grads, strict=True):
        assert_close_to_scale(got, expected)
