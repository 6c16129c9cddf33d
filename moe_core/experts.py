"""Expert banks: they take (h, expert ids, weights) and know nothing of routing.

Each bank has vectorised fast paths (rank experts: "gather", "masked"; FFN experts: "grouped",
"sorted", "masked"; static experts: "gather") and a slow reference loop over experts (`backend="loop"`) that the tests
compare them with, forward and backward. The reference is the obviously-correct version: for
each expert, find its tokens, apply it, add the weighted result back.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ModelConfig
from .routing import expert_counts

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_supported(dtype: torch.dtype, device: torch.device, *weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM can multiply `dtype` operands by these weights on `device`: torch >= 2.9,
    rows 16-byte aligned, and on CUDA a Hopper-class GPU (sm90+) with bf16 operands."""
    if _GROUPED_MM is None:
        return False
    size = dtype.itemsize
    if any((w.shape[-1] * size) % 16 or (w.shape[-2] * size) % 16 for w in weights):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device)[0] >= 9
    # torch.compile's shape propagation for it accepts bf16 only (torch 2.13), though eager CPU takes fp32
    return device.type == "cpu" and (dtype == torch.bfloat16 or not torch.compiler.is_compiling())


def compute_dtype(h: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on h run in: autocast's where it is on (bf16 on CUDA), else h's own."""
    return torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype


def loop_over_experts(h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, n_experts: int, weighted_expert) -> torch.Tensor:
    """The reference dispatch: for each expert e, the tokens that chose it, `weighted_expert(e, their h,
    their routing weights [n, 1])`, added back at their rows. (Each bank applies the weight where its
    fast paths do, so the reference rounds as they do.)"""
    out = torch.zeros_like(h)
    for e in range(n_experts):
        rows, slot = (idx == e).nonzero(as_tuple=True)
        if rows.numel():
            y = weighted_expert(e, h[rows], weights[rows, slot].to(h.dtype).unsqueeze(-1))
            out = out.index_add(0, rows, y.to(out.dtype))  # autocast: the product may be bf16
    return out


def take_rows(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """table[ids] for non-negative int64 (or int32) ids of any shape: [*ids.shape, *table.shape[1:]].

    On CPU by index_select, whose backward (index_add) adds the rows of a repeated id in order: the same
    bits on any thread count, advanced indexing's on one, and forward and backward together 2.7x faster
    than advanced indexing (index_put with accumulation) for 4,096 rows of 64 (benchmarks/RESULTS.md). Elsewhere
    by advanced indexing, whose CUDA backward sorts where index_add would add atomically, in no fixed order.
    """
    if table.device.type != "cpu":
        return table[ids]
    return table.index_select(0, ids.reshape(-1)).view(ids.shape + table.shape[1:])


def dense_gate(idx: torch.Tensor, weights: torch.Tensor, n_experts: int, dtype: torch.dtype) -> torch.Tensor:
    """[N, E] routing weights: each token's k weights at its experts' columns, zero elsewhere (masked paths)."""
    return torch.zeros(idx.shape[0], n_experts, dtype=dtype, device=idx.device).scatter(1, idx, weights.to(dtype))


def add_back_weighted(ys: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, token: torch.Tensor,
                      shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """Scale the outputs of the expert-sorted (token, slot) pairs (`sort_by_expert`) by their routing weights
    and add each back at its token's row of a zero [N, d] output (sorted paths)."""
    ys = ys * take_rows(weights.reshape(-1), order).to(dtype).unsqueeze(-1)
    return torch.zeros(shape, dtype=dtype, device=ys.device).index_add(0, token, ys)


def sort_by_expert(idx: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(order of the flattened (token, slot) pairs grouped by expert, their tokens, tokens per expert)."""
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    return order, order // idx.shape[1], expert_counts(idx, n_experts)


class RankExperts(nn.Module):
    """M rank-r SiLU experts (ST-MoE): expert i adds sum_j u_ij * SiLU(<h, d_ij>), no biases.

    For r = 1 each expert is one read direction d_i and one write direction u_i. Both are stored
    as [M, r, d_model] so one gather fetches an expert's rows.
    """

    def __init__(self, n_experts: int, d_model: int, rank: int, n_layers: int, backend: str = "auto"):
        super().__init__()
        self.w_down = nn.Parameter(torch.empty(n_experts, rank, d_model))
        self.w_up = nn.Parameter(torch.empty(n_experts, rank, d_model))
        self.backend = backend
        nn.init.normal_(self.w_down, std=0.02)
        nn.init.normal_(self.w_up, std=0.02 / math.sqrt(2 * n_layers))  # GPT-2 residual scaling

    def forward(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        backend = self.backend
        if backend == "auto":
            backend = self.auto_backend(h.device, self.w_down.shape[0], idx.shape[1])
        return getattr(self, f"forward_{backend}")(h, idx, weights)

    @staticmethod
    def auto_backend(device: torch.device, n_experts: int, k: int) -> str:
        """The faster backend as measured (benchmarks/RESULTS.md): `masked` on GPUs (on an H100 at M = 1024
        gathered rows ran as small batched matmuls, 46% of Deep's step); on CPU `masked` while M <= 64 k,
        `gather` above. With benchmarks/rank_crossover.py (k = 1, 4, 12; M = 16-1,024) it picked the faster
        one in 26 of 27 cases at d_model 64; at d_model 1,024, in 16 of 21: there `gather` already wins at
        about M > 32 k (by up to 1.7x at k = 12, M = 768); only the small and paper profiles, GPU ones,
        are that wide."""
        return "masked" if device.type == "cuda" or n_experts <= 64 * k else "gather"

    def forward_masked(self, h, idx, weights):
        """Activate every expert with two dense matmuls, zeroing the unselected ones.

        Costs N*M*r*d multiply-adds (dense-FFN arithmetic) but runs at matmul speed, which beats
        gathering rows when M is not much larger than k (and at M*r ~ d_model in general).
        """
        n_experts, rank, d_model = self.w_down.shape
        act = F.silu(h @ self.w_down.reshape(n_experts * rank, d_model).T).view(-1, n_experts, rank)
        gate = dense_gate(idx, weights, n_experts, act.dtype)
        return (act * gate.unsqueeze(-1)).reshape(-1, n_experts * rank) @ self.w_up.reshape(n_experts * rank, d_model)

    def forward_gather(self, h, idx, weights):
        """Gather the k selected experts' rows per token and contract in batched einsums."""
        act = F.silu(torch.einsum("nd,nkrd->nkr", h, take_rows(self.w_down, idx)))
        act = act * weights.to(act.dtype).unsqueeze(-1)
        return torch.einsum("nkr,nkrd->nd", act, take_rows(self.w_up, idx))

    def forward_loop(self, h, idx, weights):
        """Reference: one expert at a time."""
        expert = lambda e, x, w: (F.silu(x @ self.w_down[e].T) * w) @ self.w_up[e]  # noqa: E731
        return loop_over_experts(h, idx, weights, self.w_down.shape[0], expert)


class SwiGLUExperts(nn.Module):
    """E SwiGLU FFN experts (PathMoE): FFN_e(h) = (SiLU(h W_gate) * (h W_in)) W_out, no biases."""

    def __init__(self, n_experts: int, d_model: int, d_ff: int, n_layers: int, backend: str = "auto"):
        super().__init__()
        self.w_gate = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_in = nn.Parameter(torch.empty(n_experts, d_model, d_ff))
        self.w_out = nn.Parameter(torch.empty(n_experts, d_ff, d_model))
        self.backend = backend
        nn.init.normal_(self.w_gate, std=0.02)
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02 / math.sqrt(2 * n_layers))

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return (F.silu(x @ self.w_gate[e]) * (x @ self.w_in[e])) @ self.w_out[e]

    def forward(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        backend = self.pick_backend(h, idx.shape[1]) if self.backend == "auto" else self.backend
        return getattr(self, f"forward_{backend}")(h, idx, weights)

    def pick_backend(self, h: torch.Tensor, k: int) -> str:
        """Grouped GEMMs where torch has them (4x the masked path at E = 16, top-4 on CPU, benchmarks/run.py);
        else every expert on every token while the experts are few per selection (E <= 4k), else sorted."""
        if grouped_mm_supported(compute_dtype(h), h.device, self.w_gate, self.w_out):
            return "grouped"
        return "masked" if self.w_gate.shape[0] <= 4 * k else "sorted"

    def forward_masked(self, h, idx, weights):
        """Run every expert on every token in three batched einsums and weight by a sparse gate.

        E/k times the routed arithmetic, but no sorting, no host sync and matmul-sized work.
        """
        act = F.silu(torch.einsum("nd,edf->enf", h, self.w_gate)) * torch.einsum("nd,edf->enf", h, self.w_in)
        out = torch.einsum("enf,efd->end", act, self.w_out)
        gate = dense_gate(idx, weights, self.w_gate.shape[0], out.dtype)
        return torch.einsum("end,ne->nd", out, gate)

    def forward_grouped(self, h, idx, weights):
        """Sort the (token, slot) pairs by expert and run every expert in three grouped GEMMs.

        No host sync at all: the group boundaries stay on the device. Falls back to `sorted` where
        torch's grouped GEMM cannot run (old torch, unaligned widths, pre-Hopper GPUs).
        """
        dtype = compute_dtype(h)
        if not grouped_mm_supported(dtype, h.device, self.w_gate, self.w_out):
            return self.forward_sorted(h, idx, weights)
        order, token, counts = sort_by_expert(idx, self.w_gate.shape[0])
        offsets = counts.cumsum(0).to(torch.int32)
        xs = take_rows(h, token).to(dtype)
        act = F.silu(_GROUPED_MM(xs, self.w_gate.to(dtype), offs=offsets)) * _GROUPED_MM(xs, self.w_in.to(dtype), offs=offsets)
        ys = _GROUPED_MM(act, self.w_out.to(dtype), offs=offsets)
        return add_back_weighted(ys, weights, order, token, h.shape, dtype)

    def forward_sorted(self, h, idx, weights):
        """Sort the (token, slot) pairs by expert, run each expert on one contiguous slice.

        One host sync (the per-expert counts) per call, not one per expert.
        """
        order, token, counts = sort_by_expert(idx, self.w_gate.shape[0])
        xs = take_rows(h, token)
        outs, start = [], 0
        for e, n in enumerate(counts.tolist()):
            if n:
                outs.append(self.expert(e, xs[start:start + n]))
            start += n
        return add_back_weighted(torch.cat(outs), weights, order, token, h.shape, h.dtype)

    def forward_loop(self, h, idx, weights):
        """Reference: one expert at a time."""
        return loop_over_experts(h, idx, weights, self.w_gate.shape[0], lambda e, x, w: self.expert(e, x) * w)


class StaticExperts(nn.Module):
    """M static experts (the paper's original V_sem design): expert i adds its own vector V_i, so a
    hop's update sum_i w_i V_i depends on the input only through the routing (the "linear trap")."""

    def __init__(self, n_experts: int, d_model: int, n_layers: int, backend: str = "auto"):
        super().__init__()
        self.vectors = nn.Parameter(torch.empty(n_experts, d_model))
        self.backend = backend
        nn.init.normal_(self.vectors, std=0.02 / math.sqrt(2 * n_layers))

    def forward(self, h: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if self.backend == "loop":
            return self.forward_loop(h, idx, weights)
        return self.forward_gather(h, idx, weights)

    def forward_gather(self, h, idx, weights):
        """The weighted sum of the k selected vectors, one batched gather."""
        return torch.einsum("nk,nkd->nd", weights.to(self.vectors.dtype), take_rows(self.vectors, idx)).to(h.dtype)

    def forward_loop(self, h, idx, weights):
        """Reference: one expert at a time."""
        expert = lambda e, x, w: w * self.vectors[e].to(x.dtype)  # noqa: E731
        return loop_over_experts(h, idx, weights, self.vectors.shape[0], expert)


def build_experts(cfg: ModelConfig) -> nn.Module:
    if cfg.expert == "static":
        return StaticExperts(cfg.n_experts, cfg.d_model, cfg.n_layers, cfg.expert_backend)
    if cfg.expert == "rank":
        return RankExperts(cfg.n_experts, cfg.d_model, cfg.expert_rank, cfg.n_layers, cfg.expert_backend)
    return SwiGLUExperts(cfg.n_experts, cfg.d_model, cfg.expert_d_ff, cfg.n_layers, cfg.expert_backend)
