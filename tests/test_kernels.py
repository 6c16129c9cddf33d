"""The top-k kernels against one contract (a stable sort of order-preserving keys): the C++ kernel of the
CPU path and the Triton kernel of the CUDA path, which runs here on CPU tensors through Triton's interpreter
where no GPU is (conftest.py sets TRITON_INTERPRET). Then the C++ cross-entropy against F.cross_entropy in
fp64, the C++ router decision against torch's operators in fp64, and the fallbacks."""
import functools
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from moe_core import cpu_kernels
from moe_core.config import ConfigError
from moe_core.model import token_cross_entropy
from moe_core.routing import select_top_k, select_top_k_torch, switch_balance_loss, top_k_indices
from oracles import reference_top_k

try:  # the Triton kernel, where Triton is installed (requirements.txt pins it for the interpreter on Linux x86-64)
    from moe_core import kernels as triton_kernels
except ImportError:
    triton_kernels = None

needs_triton = pytest.mark.skipif(triton_kernels is None, reason="Triton is not installed here")
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # "cpu": the interpreter, about 30 ms per program
needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="the C++ kernels did not build here "
                                  "(no compiler, or MOE_CORE_CPU_KERNELS=0); CI sets MOE_CORE_CPU_KERNELS=1")


@needs_kernel
@pytest.mark.parametrize("rows", [1, 7, 8, 9, 300, 1031])
@pytest.mark.parametrize("cols,k", [(1, 1), (5, 2), (16, 4), (32, 4), (48, 12), (64, 12), (64, 64), (128, 12), (300, 7)])
def test_kernel_picks_what_torch_topk_picks(rows, cols, k):
    """Random scores: every compile-time row length, the generic one, short row groups. The values are
    torch.topk's; the ids too, but where randn repeats a value (it does) the kernel takes the lower column."""
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols + k))
    got = cpu_kernels.topk_indices(scores, k)
    assert torch.equal(scores.gather(-1, got), scores.topk(k, dim=-1).values)
    assert torch.equal(got, reference_top_k(scores, k))


@needs_kernel
def test_kernel_ties_nan_and_extremes_follow_the_reference():
    g = torch.Generator().manual_seed(0)
    for scale in (1e-30, 1e-3, 1.0, 1e30):
        scores = torch.randn(257, 64, generator=g) * scale
        scores[torch.rand(scores.shape, generator=g) < 0.3] = 0.25 * scale  # many exact ties
        scores[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("inf")])
        scores[1, :] = 1.0  # one row that is all ties
        scores[2, 5] = -float("nan")
        for k in (1, 4, 12, 64):
            got = cpu_kernels.topk_indices(scores, k)
            assert torch.equal(got, reference_top_k(scores, k))
            assert (got.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct columns per row
    assert cpu_kernels.topk_indices(scores, 3)[1].tolist() == [0, 1, 2]
    assert cpu_kernels.topk_indices(scores, 1)[0].item() == 2  # NaN first, as in torch.topk
    assert cpu_kernels.topk_indices(scores, 1)[2].item() == 5  # of either sign


@needs_triton
@pytest.mark.parametrize("rows,cols,k", [(77, 1000, 12), (1000, 64, 12), (64, 1024, 4), (5, 17, 17), (300, 8192, 1),
                                         (33, 3, 2)])
def test_triton_kernel_picks_what_torch_topk_picks(rows, cols, k):
    """Row lengths that fill a power of two and that do not, row groups cut short, k = 1 and k = all."""
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows * cols + k)).to(TRITON_DEVICE)
    got = triton_kernels.topk_indices(scores, k)
    assert got.device == scores.device and got.dtype == torch.int64
    assert torch.equal(scores.gather(-1, got), scores.topk(k, dim=-1).values)
    assert torch.equal(got, reference_top_k(scores, k))


@needs_triton
def test_triton_kernel_ties_nan_and_extremes_follow_the_reference():
    """The same rows as the C++ kernel's test: both kernels rank by the same keys."""
    g = torch.Generator().manual_seed(0)
    for scale in (1e-30, 1.0, 1e30):
        scores = torch.randn(100, 64, generator=g) * scale
        scores[torch.rand(scores.shape, generator=g) < 0.3] = 0.25 * scale
        scores[0, :4] = torch.tensor([float("inf"), -float("inf"), float("nan"), -float("inf")])
        scores[1, :] = 1.0
        scores[2, 5] = -float("nan")
        scores[3, :] = -float("inf")  # k distinct columns even when every score is -inf
        scores = scores.to(TRITON_DEVICE)
        for k in (1, 4, 64):
            got = triton_kernels.topk_indices(scores, k)
            assert torch.equal(got, reference_top_k(scores, k))
            assert (got.sort(-1).values.diff(dim=-1) > 0).all()
    assert got[1, :3].tolist() == [0, 1, 2] and got[0, 0].item() == 2 and got[2, 0].item() == 5


@needs_triton
def test_triton_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="k=0"):
        triton_kernels.topk_indices(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match=f"columns={triton_kernels.MAX_COLUMNS + 1}"):
        triton_kernels.topk_indices(torch.randn(2, triton_kernels.MAX_COLUMNS + 1), 3)
    with pytest.raises(ValueError, match="contiguous rows"):
        triton_kernels.topk_indices(torch.randn(8, 4).t(), 2)


@needs_kernel
def test_top_k_indices_and_the_router_take_the_kernels_on_cpu_for_any_layout(monkeypatch):
    """The answers alone cannot tell a kernel from the fallback (both are torch.topk's): count the calls."""
    calls, topk, route = [], cpu_kernels.topk_indices, cpu_kernels.route
    monkeypatch.setattr(cpu_kernels, "topk_indices", lambda s, k: calls.append(("topk", tuple(s.shape), k)) or topk(s, k))
    monkeypatch.setattr(cpu_kernels, "route", lambda s, k, r: calls.append(("route", tuple(s.shape), k)) or route(s, k, r))
    scores = torch.randn(3, 50, 40).transpose(1, 2)  # [3, 40, 50], not contiguous
    assert torch.equal(top_k_indices(scores, 6), scores.topk(6, dim=-1).indices)
    r = select_top_k(scores, 6)
    assert calls == [("topk", (120, 50), 6), ("route", (120, 50), 6)]
    assert r.idx.shape == r.weights.shape == (3, 40, 6) and r.probs.shape == r.logits.shape == (3, 40, 50)
    assert torch.equal(r.idx, scores.topk(6, dim=-1).indices)


def test_fallback_without_the_kernel_picks_what_torch_topk_picks(monkeypatch):
    """Without the kernel the CPU ranks int32 keys with torch.topk: its ids and order, ties included."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    g = torch.Generator().manual_seed(0)
    for scale in (1e-30, 1.0, 1e30):
        scores = torch.randn(500, 64, generator=g) * scale
        scores[torch.rand(scores.shape, generator=g) < 0.2] = 0.25 * scale
        scores[0, :3] = torch.tensor([float("inf"), -float("inf"), -0.0])
        for k in (1, 12, 64):
            assert torch.equal(top_k_indices(scores, k), scores.topk(k, dim=-1).indices)


@needs_kernel
@pytest.mark.parametrize("renormalize", [True, False])
def test_routing_is_the_same_with_and_without_the_kernels(monkeypatch, renormalize):
    """Distinct scores: the kernels change which code ranks and weighs them, not the experts; the weights,
    the probabilities and the logits' gradient agree to float rounding."""
    logits = (torch.randperm(200 * 64).float().reshape(200, 64) / 1000).requires_grad_()
    cotangent = torch.randn(200, 12, generator=torch.Generator().manual_seed(0))

    def decide(select):
        r = select(logits, 12, renormalize)
        loss = (r.weights * cotangent).sum() + switch_balance_loss([r], 64)
        return r, torch.autograd.grad(loss, logits)[0]
    fast, fast_grad = decide(select_top_k)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)  # top_k_indices falls back to torch.topk too
    slow, slow_grad = decide(select_top_k_torch)
    assert torch.equal(fast.idx, slow.idx)
    torch.testing.assert_close(fast.weights, slow.weights, rtol=2e-6, atol=0)
    torch.testing.assert_close(fast.probs, slow.probs, rtol=2e-6, atol=0)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-5, atol=1e-7)


@needs_kernel
def test_compiled_code_calls_the_kernel_without_a_graph_break():
    def pick(s):
        return s.gather(-1, top_k_indices(s, 3))

    scores = torch.randn(10, 16)
    compiled = torch.compile(pick, fullgraph=True)  # fullgraph: breaks raise
    assert torch.equal(compiled(scores), scores.topk(3, dim=-1).values)
    targets = []

    def record(graph, example_inputs):  # a backend that keeps the traced graph's operators
        targets.extend(str(node.target) for node in graph.graph.nodes if node.op == "call_function")
        return graph.forward
    torch._dynamo.reset()
    torch.compile(pick, backend=record, fullgraph=True)(scores)
    assert any(t.startswith("moe_core.cpu_topk_indices") for t in targets), targets
    assert not any(t.endswith("topk") for t in targets), targets


def test_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="k=0"):
        cpu_kernels.topk_indices(torch.randn(4, 8), 0)
    with pytest.raises(ValueError, match="k=9"):
        cpu_kernels.topk_indices(torch.randn(4, 8), 9)
    with pytest.raises(ValueError, match="float64"):
        cpu_kernels.topk_indices(torch.randn(4, 8, dtype=torch.float64), 2)


def test_switch_values(monkeypatch):
    """0 turns the kernel off; anything but 0, 1 or unset is refused by name. (A fresh cache: the
    process's real answer stays as it was.)"""
    for value, expected in (("0", False), ("yes", "MOE_CORE_CPU_KERNELS='yes'")):
        monkeypatch.setattr(cpu_kernels, "_loaded", functools.cache(cpu_kernels._loaded.__wrapped__))
        monkeypatch.setenv(cpu_kernels.ENV_SWITCH, value)
        if expected is False:
            assert not cpu_kernels.available()
        else:
            with pytest.raises(ConfigError, match=expected):
                cpu_kernels.available()


def test_a_failed_build_warns_and_falls_back_or_raises_when_required(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_is_built", lambda _: True)  # no "compiling ..." message
    monkeypatch.setattr(cpu_kernels, "_loaded", functools.cache(cpu_kernels._loaded.__wrapped__))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    with pytest.warns(UserWarning, match="c\\+\\+: not found.*torch.topk, torch's softmax and F.cross_entropy run instead"):
        assert not cpu_kernels.available()
    monkeypatch.setattr(cpu_kernels, "_loaded", functools.cache(cpu_kernels._loaded.__wrapped__))
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    with pytest.raises(RuntimeError, match="MOE_CORE_CPU_KERNELS=1 but the CPU kernels did not build"):
        cpu_kernels.available()


def test_a_compiler_without_openmp_gets_a_build_without_it(monkeypatch, capsys, tmp_path):
    """On Linux the library is built with -fopenmp (its row loops then use torch's threads); where that
    build fails, a second one without it follows, stderr quotes the compiler's error, and later processes
    do not ask the compiler again."""
    calls = []

    def load(cpp_extension, openmp):
        calls.append(openmp)
        if openmp:
            raise RuntimeError("Error building extension 'x': [1/3] c++ -fopenmp ...\n"
                               "clang: error: unsupported option '-fopenmp'\nninja: build stopped")
    cache = types.SimpleNamespace(_get_build_directory=lambda name, verbose: tmp_path)  # torch's extension cache
    monkeypatch.setattr(cpu_kernels, "_load", load)
    monkeypatch.setattr(cpu_kernels, "_OPENMP", ["-fopenmp"])
    assert cpu_kernels._build(cache) == "plain" and calls == [["-fopenmp"], []]
    assert "did not build with OpenMP (clang: error: unsupported option '-fopenmp')" in capsys.readouterr().err
    calls.clear()
    assert cpu_kernels._build(cache) == "plain" and calls == [[]]  # remembered
    (tmp_path / "openmp_refused").unlink()
    calls.clear()
    monkeypatch.setattr(cpu_kernels, "_load", lambda cpp_extension, openmp: calls.append(openmp))
    assert cpu_kernels._build(cache) == "openmp" and calls == [["-fopenmp"]]
    calls.clear()
    monkeypatch.setattr(cpu_kernels, "_OPENMP", [])  # elsewhere (macOS): one build, without
    assert cpu_kernels._build(cache) == "plain" and calls == [[]]


@needs_kernel
def test_kernels_give_the_same_bits_on_any_thread_count():
    """Rows are split over threads, each row computed whole by one: one thread or two, the same answer."""
    g = torch.Generator().manual_seed(0)
    scores, logits = torch.randn(4096, 64, generator=g), torch.randn(700, 2048, generator=g)
    targets = torch.randint(0, 2048, (700,), generator=g)
    cotangents = torch.randn(4096, 64, generator=g), torch.randn(4096, 12, generator=g)
    threads, answers = torch.get_num_threads(), []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            x = logits.clone().requires_grad_()
            loss = cpu_kernels.cross_entropy(x, targets)
            loss.backward()
            s = scores.clone().requires_grad_()
            probs, idx, weights = cpu_kernels.route(s, 12, True)
            ((probs * cotangents[0]).sum() + (weights * cotangents[1]).sum()).backward()
            answers.append((cpu_kernels.topk_indices(scores, 12), loss.detach(), x.grad, probs, idx, weights, s.grad))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*answers))
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():  # then two threads really ran
        assert cpu_kernels.threaded()


# ------------------------------------------------------------------ cross-entropy


def fp64_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, upstream: float) -> tuple[torch.Tensor, torch.Tensor]:
    """F.cross_entropy in fp64: (upstream * loss, its gradient in the logits)."""
    x = logits.double().requires_grad_()
    loss = upstream * F.cross_entropy(x, targets)
    loss.backward()
    return loss.detach(), x.grad


@needs_kernel
@pytest.mark.parametrize("rows,classes", [(1, 1), (3, 7), (64, 8), (9, 1000), (100, 2048)])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0])
def test_cross_entropy_kernel_matches_torch_in_fp64(rows, classes, scale):
    """Loss and gradient within fp32 rounding of F.cross_entropy in fp64; class counts that do and do not
    fill whole vectors, logits from nearly flat to spread far beyond e^-87."""
    g = torch.Generator().manual_seed(rows * classes)
    logits = torch.randn(rows, classes, generator=g) * scale
    targets = torch.randint(0, classes, (rows,), generator=g)
    x = logits.clone().requires_grad_()
    loss = 2.5 * cpu_kernels.cross_entropy(x, targets)
    loss.backward()
    want_loss, want_grad = fp64_cross_entropy(logits, targets, 2.5)
    torch.testing.assert_close(loss.double(), want_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-5, atol=1e-8)


@needs_kernel
def test_cross_entropy_kernel_exponentials_are_accurate():
    """One row spanning e^0 .. e^-87: every probability in fp32's normal range within 4e-7 relative of fp64
    (about 3 ulp), and exponentials below 2^-126 flushed to 0."""
    row = torch.cat([torch.zeros(1), -torch.linspace(0.001, 87.0, 4095), torch.tensor([-88.0, -100.0])])
    x = row[None].clone().requires_grad_()
    cpu_kernels.cross_entropy(x, torch.zeros(1, dtype=torch.long)).backward()
    probs = x.grad[0].double()  # the gradient is p - one_hot(target): p itself away from the target
    want = torch.softmax(row.double(), -1)
    normal = want[1:-2] > 1e-37
    assert normal[:3000].all()
    assert ((probs[1:-2] - want[1:-2]).abs() / want[1:-2])[normal].max() < 4e-7
    assert probs[-2:].tolist() == [0.0, 0.0]


@needs_kernel
def test_cross_entropy_kernel_non_finite_logits():
    """-inf is a class of probability 0; NaN or +inf in a row makes the loss NaN, as in torch."""
    targets = torch.tensor([0, 1])
    logits = torch.tensor([[2.0, -float("inf"), 0.5], [1.0, 0.0, -1.0]])
    torch.testing.assert_close(cpu_kernels.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    for bad in (float("nan"), float("inf")):
        poisoned = logits.clone()
        poisoned[1, 2] = bad
        assert cpu_kernels.cross_entropy(poisoned, targets).isnan()
        assert F.cross_entropy(poisoned, targets).isnan()


@needs_kernel
def test_model_loss_takes_the_kernel_and_agrees_with_the_fallback(monkeypatch):
    """token_cross_entropy: [B, T, V] logits, the kernel on CPU; F.cross_entropy without it."""
    logits = torch.randn(4, 16, 50, requires_grad=True)
    targets = torch.randint(0, 50, (4, 16))
    fast = token_cross_entropy(logits, targets)
    (fast_grad,) = torch.autograd.grad(fast, logits)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    slow = token_cross_entropy(logits, targets)
    (slow_grad,) = torch.autograd.grad(slow, logits)
    assert (fast.grad_fn.name(), slow.grad_fn.name()) == ("MeanBackward0", "NllLossBackward0")  # both paths ran
    torch.testing.assert_close(fast, slow)
    torch.testing.assert_close(fast_grad, slow_grad)


@needs_kernel
def test_cross_entropy_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="float64"):
        cpu_kernels.cross_entropy(torch.randn(4, 8, dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"torch.int64 \(3,\) for 4 rows"):
        cpu_kernels.cross_entropy(torch.randn(4, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"target 8 of row 2 is not a class in \[0, 8\)"):
        cpu_kernels.cross_entropy(torch.randn(4, 8), torch.tensor([0, 1, 8, 2]))


# ------------------------------------------------------------------ the router's decision


def fp64_decision(logits: torch.Tensor, idx: torch.Tensor, renormalize: bool, cotangents) -> tuple:
    """select_top_k's torch operators in fp64 at the given expert ids: (probs, weights, d logits of
    <probs, cotangent_p> + <weights, cotangent_w>), a cotangent of None contributing nothing."""
    x = logits.double().requires_grad_()
    probs = x.softmax(-1)
    weights = x.gather(-1, idx).softmax(-1) if renormalize else probs.gather(-1, idx)
    gp, gw = cotangents
    loss = sum((t * c.double()).sum() for t, c in ((probs, gp), (weights, gw)) if c is not None)
    return probs.detach(), weights.detach(), torch.autograd.grad(loss, x)[0]


@needs_kernel
@pytest.mark.parametrize("rows,cols,k", [(1, 1, 1), (9, 16, 4), (300, 64, 12), (257, 64, 64), (40, 300, 7)])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("reaches", ["probs", "weights", "both"])
def test_route_kernel_matches_torch_in_fp64(rows, cols, k, renormalize, reaches):
    """The kernel's ids are the top-k kernel's; its probabilities, weights and logits' gradient are within fp32
    rounding of torch's operators in fp64, whichever outputs the gradient comes through (the balance loss
    reads the probabilities, the experts the weights)."""
    g = torch.Generator().manual_seed(rows * cols + k)
    logits = torch.randn(rows, cols, generator=g) * 3
    gp = torch.randn(rows, cols, generator=g) if reaches != "weights" else None
    gw = torch.randn(rows, k, generator=g) if reaches != "probs" else None
    x = logits.clone().requires_grad_()
    probs, idx, weights = cpu_kernels.route(x, k, renormalize)
    assert not idx.requires_grad and torch.equal(idx, reference_top_k(logits, k))
    loss = sum((t * c).sum() for t, c in ((probs, gp), (weights, gw)) if c is not None)
    loss.backward()
    want_probs, want_weights, want_grad = fp64_decision(logits, idx, renormalize, (gp, gw))
    torch.testing.assert_close(probs.double(), want_probs, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(weights.double(), want_weights, rtol=1e-6, atol=1e-9)
    # a gradient entry is a difference of O(1) terms (w_s (gw_s - <w, gw>)): fp32 rounding is absolute there
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@needs_kernel
def test_route_kernel_takes_a_broadcast_gradient_and_minus_infinity():
    """The balance loss's gradient reaches the probabilities broadcast over tokens (stride 0); an expert at -inf
    gets probability and weight 0 and no gradient."""
    logits = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    logits[:, 3] = -float("inf")
    x = logits.clone().requires_grad_()
    probs, idx, weights = cpu_kernels.route(x, 16, True)
    per_expert = torch.linspace(-1, 1, 16)
    (probs.sum(0) @ per_expert).backward()  # sum's backward hands the kernel per_expert.expand(50, 16)
    want_probs, want_weights, want_grad = fp64_decision(logits, idx, True, (per_expert.expand(50, 16), None))
    torch.testing.assert_close(x.grad.double(), want_grad, rtol=1e-5, atol=1e-7)
    assert probs[:, 3].eq(0).all() and x.grad[:, 3].eq(0).all()
    assert weights.gather(-1, (idx == 3).float().argmax(-1, keepdim=True)).eq(0).all()


@needs_kernel
def test_route_kernel_rejects_bad_input():
    with pytest.raises(ValueError, match="float64"):
        cpu_kernels.route(torch.randn(4, 8, dtype=torch.float64), 2, True)
    with pytest.raises(ValueError, match=r"\(2, 4, 8\)"):
        cpu_kernels.route(torch.randn(2, 4, 8), 2, True)
    for k in (0, 9):
        with pytest.raises(ValueError, match=f"k={k}, columns=8"):
            cpu_kernels.route(torch.randn(4, 8), k, True)
