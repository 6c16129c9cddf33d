"""The C++ top-k kernel of the CPU path against torch.topk and a stable sort, and its fallback."""
import functools

import pytest
import torch

from moe_core import cpu_kernels
from moe_core.routing import ordered_int32, select_top_k, top_k_indices

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="the C++ kernel did not build here "
                                  "(no compiler, or MOE_CORE_CPU_KERNELS=0); CI sets MOE_CORE_CPU_KERNELS=1")


def reference_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The kernel's contract, spelled out: rank by the int32 keys (NaN above all), largest first, ties to
    the lower column (a stable sort keeps column order among equal keys)."""
    keys = ordered_int32(scores).masked_fill(scores.isnan(), torch.iinfo(torch.int32).max)
    return keys.sort(dim=-1, descending=True, stable=True).indices[..., :k]


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
            assert got.unique(dim=-1).shape[-1] == k  # k distinct columns per row
    assert cpu_kernels.topk_indices(scores, 3)[1].tolist() == [0, 1, 2]
    assert cpu_kernels.topk_indices(scores, 1)[0].item() == 2  # NaN first, as in torch.topk
    assert cpu_kernels.topk_indices(scores, 1)[2].item() == 5  # of either sign


@needs_kernel
def test_top_k_indices_takes_the_kernel_on_cpu_for_any_layout():
    scores = torch.randn(3, 50, 40).transpose(1, 2)  # [3, 40, 50], not contiguous
    assert torch.equal(top_k_indices(scores, 6), scores.topk(6, dim=-1).indices)


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
def test_routing_is_the_same_with_and_without_the_kernel(monkeypatch):
    """Distinct scores: the kernel changes which code ranks them, not the routing."""
    logits = torch.randperm(200 * 64).float().reshape(200, 64) / 1000
    fast = select_top_k(logits, 12)
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    slow = select_top_k(logits, 12)
    assert torch.equal(fast.idx, slow.idx) and torch.equal(fast.weights, slow.weights)


@needs_kernel
def test_compiled_code_calls_the_kernel_without_a_graph_break():
    compiled = torch.compile(lambda s: s.gather(-1, top_k_indices(s, 3)), fullgraph=True)  # fullgraph: breaks raise
    scores = torch.randn(10, 16)
    assert torch.equal(compiled(scores), scores.topk(3, dim=-1).values)


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
            with pytest.raises(ValueError, match=expected):
                cpu_kernels.available()


def test_a_failed_build_warns_and_falls_back_or_raises_when_required(monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: not found")
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    monkeypatch.setattr(cpu_kernels, "_is_built", lambda _: True)  # no "compiling ..." message
    monkeypatch.setattr(cpu_kernels, "_loaded", functools.cache(cpu_kernels._loaded.__wrapped__))
    monkeypatch.delenv(cpu_kernels.ENV_SWITCH, raising=False)
    with pytest.warns(UserWarning, match="c\\+\\+: not found.*routing uses torch.topk"):
        assert not cpu_kernels.available()
    monkeypatch.setattr(cpu_kernels, "_loaded", functools.cache(cpu_kernels._loaded.__wrapped__))
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "1")
    with pytest.raises(RuntimeError, match="MOE_CORE_CPU_KERNELS=1 but the CPU top-k kernel did not build"):
        cpu_kernels.available()
