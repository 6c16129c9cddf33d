"""Routers: they map token states to (expert ids, weights) and know nothing of experts.

Every router answers `decide(h, layer, hop, keys) -> Routing`. Score-based routers produce
logits; `select_top_k` keeps the k highest-scoring experts, weights them by the softmax over all
M experts (fp32), renormalised over the k by default, and keeps that softmax for the balance loss.
The model owns the routers, so sharing one across a block of layers (PathMoE) or factorising one
across layers (LowRank-MoE) is a matter of which router a layer is handed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from . import cpu_kernels
from .config import ModelConfig

try:  # the Triton top-k, where Triton is installed (it ships with CUDA builds of torch)
    from .kernels import MAX_COLUMNS, topk_indices as _triton_topk_indices
except ImportError:
    _triton_topk_indices = None


@dataclass
class Routing:
    """One routing decision for N tokens."""

    idx: torch.Tensor  # [N, k] int64 expert ids, distinct per token
    weights: torch.Tensor  # [N, k] fp32 combination weights
    probs: torch.Tensor | None  # [N, M] fp32 softmax over all experts (None: no probabilities)
    logits: torch.Tensor | None  # [N, M] fp32 scores before the softmax


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest scores along the last dimension, largest first: a Triton kernel on CUDA
    (torch.topk took 13% of Wide's compiled H100 step), a C++ kernel for fp32 on CPU (10x torch.topk at
    1,024 x 64, k = 12, where torch.topk was the largest piece of Wide's smoke step), torch.topk
    elsewhere. Both kernels break ties toward the lower column. Without a C++ compiler the CPU falls
    back to torch.topk of `ordered_int32` keys (3/4 of its time on the floats; torch.topk's own ids
    and order for finite scores, save -0.0 against +0.0)."""
    if scores.is_cuda and _triton_topk_indices is not None and scores.shape[-1] <= MAX_COLUMNS:
        flat = scores.reshape(-1, scores.shape[-1]).contiguous()
        return _triton_topk_indices(flat, k).view(*scores.shape[:-1], k)
    if scores.device.type == "cpu" and scores.dtype == torch.float32:
        if cpu_kernels.available():
            return cpu_kernels.topk_indices(scores.reshape(-1, scores.shape[-1]), k).view(*scores.shape[:-1], k)
        return ordered_int32(scores).topk(k, dim=-1).indices
    return scores.topk(k, dim=-1).indices


def ordered_int32(x: torch.Tensor) -> torch.Tensor:
    """fp32 values as int32 keys that order as the floats do: the bits of a non-negative float already
    do; a negative float's magnitude bits are flipped so that larger magnitudes come lower. Differences
    from float order: -0.0 ranks below +0.0, and a NaN ranks by its sign bit (a NaN score means a
    diverged run, which the trainer stops). The Triton and C++ kernels (kernels.py, csrc/topk.cpp) build
    the same keys, but rank every NaN first."""
    bits = x.view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


def select_top_k(logits: torch.Tensor, k: int, renormalize: bool = True) -> Routing:
    """The k highest-scoring experts, weighted by the fp32 softmax over all M, optionally renormalised.

    Eager CPU code computes it in one C++ pass each way (cpu_kernels.route: at smoke shapes the torch
    operators' passes and autograd nodes cost more than their arithmetic); elsewhere `select_top_k_torch`.
    """
    logits = logits.float()
    if not (cpu_kernels.eager_cpu(logits) and cpu_kernels.available()):
        return select_top_k_torch(logits, k, renormalize)
    probs, idx, weights = cpu_kernels.route(logits.reshape(-1, logits.shape[-1]), k, renormalize)
    chosen = (*logits.shape[:-1], k)
    return Routing(idx=idx.view(chosen), weights=weights.view(chosen), probs=probs.view(logits.shape), logits=logits)


def select_top_k_torch(logits: torch.Tensor, k: int, renormalize: bool = True) -> Routing:
    """`select_top_k` in torch operators, which torch.compile fuses. The selection reads the logits (the softmax is
    monotone) and the renormalised weights are the softmax over the k selected logits, which equals
    p_i / sum of the k selected p_j; so neither waits for the full softmax, which only the balance loss and
    the analyses read."""
    logits = logits.float()
    probs = logits.softmax(dim=-1)
    idx = top_k_indices(logits, k)
    weights = logits.gather(-1, idx).softmax(dim=-1) if renormalize else probs.gather(-1, idx)
    return Routing(idx=idx, weights=weights, probs=probs, logits=logits)


class ScoreRouter(nn.Module):
    """A router that scores every expert; subclasses implement `logits`."""

    def __init__(self, top_k: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize

    def logits(self, h: torch.Tensor, layer: int, hop: int) -> torch.Tensor:
        raise NotImplementedError

    def decide(self, h: torch.Tensor, layer: int, hop: int, keys: torch.Tensor | None = None) -> Routing:
        with torch.autocast(h.device.type, enabled=False):  # router math stays in fp32 under bf16
            return select_top_k(self.logits(h.float(), layer, hop), self.top_k, self.renormalize)


class CosineRouter(ScoreRouter):
    """ST-MoE geometric router: s_i = tau * <normalize(proj_in h), normalize(c_i)> in a d_space space.

    `n_proj` > 1 gives one projection per hop (decoupled routing). Centroids are re-normalised at
    every use. With `kinematic` the paper's navigation vectors (one d_space vector per expert) are
    allocated so parameter counts match the paper's 1.57M; semantic re-routing never reads them.
    """

    def __init__(self, d_model: int, d_space: int, n_experts: int, top_k: int, tau: float,
                 learn_tau: bool = False, n_proj: int = 1, frozen: bool = False,
                 kinematic: bool = False, renormalize: bool = True):
        super().__init__(top_k, renormalize)
        self.proj_in = nn.Parameter(torch.empty(n_proj, d_space, d_model))
        self.centroids = nn.Parameter(torch.empty(n_experts, d_space))
        self.kinematic = nn.Parameter(torch.zeros(n_experts, d_space)) if kinematic else None
        log_tau = torch.tensor(math.log(tau))
        if learn_tau:
            self.log_tau = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_tau", log_tau)
        nn.init.normal_(self.proj_in, std=0.02)
        nn.init.normal_(self.centroids)
        if frozen:
            self.proj_in.requires_grad_(False)
            self.centroids.requires_grad_(False)

    @property
    def tau(self) -> torch.Tensor:
        return self.log_tau.exp()

    def projection(self, hop: int) -> torch.Tensor:
        """proj_in of this hop, [d_space, d_model] fp32 (the last one serves later hops)."""
        return self.proj_in[min(hop, self.proj_in.shape[0] - 1)].float()

    def position(self, h: torch.Tensor, hop: int) -> torch.Tensor:
        """The token's unit-norm position in routing space (hop selects the projection)."""
        return unit_columns(self.projection(hop) @ h.T).T  # [d_space, N] products: see `logits`

    def logits(self, h, layer, hop):
        """tau * cosine to every centroid. The operands are laid out so that every product, backward
        included, has the long token dimension last or in the middle: with a d_space = 4 column
        dimension, CPU BLAS ran [N, M] x [M, 4] and [M, N] x [N, 4] 2.7-6x slower than the same
        products transposed (docs/architecture.md, "The CPU step"). Eager CPU runs take the same
        forward with a hand-written backward (`CosineScores`)."""
        if cpu_kernels.eager_cpu(h):
            return CosineScores.apply(h, self.projection(hop), self.centroids.float(), self.log_tau)
        centroids = unit_columns(self.centroids.float().T)  # [d_space, M]
        return self.position(h, hop) @ (self.tau * centroids).contiguous()


def inverse_column_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / the norm of every column of x [d, n], as the root of a sum of squares, which CPU torch reduces over
    a short leading dimension far faster than a norm (7 against 109 us at d = 4, n = 1,024)."""
    return (x * x).sum(0).clamp_min(1e-24).rsqrt()


def unit_columns(x: torch.Tensor) -> torch.Tensor:
    """x [d, n] with every column scaled to unit norm: F.normalize(x, dim=0) up to rounding."""
    return x * inverse_column_norms(x)


class CosineScores(torch.autograd.Function):
    """`CosineRouter.logits` as one autograd node: the same forward operations, and a backward written out.

    On CPU the cosine router's dozen small operations cost more in autograd's bookkeeping than in
    arithmetic: forward and backward at 1,024 tokens x 64 experts took 0.56-0.58 ms traced and
    0.47-0.48 ms as this node (benchmarks/RESULTS.md). tests/test_routing.py checks it against the
    traced version. With u = unit(P h) and v = tau unit(c), scores = u^T v; a column scaled to unit
    norm, u = z / |z|, passes its gradient back as (du - u <u, du>) / |z|.
    """

    @staticmethod
    def forward(ctx, h, proj, centroids, log_tau):
        """h [N, d_model], proj [d_space, d_model], centroids [M, d_space], log_tau [] -> scores [N, M]."""
        z = proj @ h.T  # [d_space, N]
        a = inverse_column_norms(z)
        u = z * a
        c = centroids.T  # [d_space, M]
        b = inverse_column_norms(c)
        c_unit = c * b
        tau = log_tau.exp()
        v = (tau * c_unit).contiguous()
        ctx.save_for_backward(h, proj, u, a, c_unit, b, tau, v)
        return u.T @ v

    @staticmethod
    def backward(ctx, grad):
        h, proj, u, a, c_unit, b, tau, v = ctx.saved_tensors
        need_h, need_proj, need_centroids, need_tau = ctx.needs_input_grad
        grad_h = grad_proj = grad_centroids = grad_log_tau = None
        if need_h or need_proj:
            du = v @ grad.T  # [d_space, N]
            dz = a * (du - u * (u * du).sum(0))
            grad_h = dz.T @ proj if need_h else None
            grad_proj = dz @ h if need_proj else None
        if need_centroids or need_tau:
            dv = u @ grad  # [d_space, M]
            if need_centroids:
                dc_unit = tau * dv
                grad_centroids = (b * (dc_unit - c_unit * (c_unit * dc_unit).sum(0))).T
            if need_tau:
                grad_log_tau = (dv * c_unit).sum() * tau
        return grad_h, grad_proj, grad_centroids, grad_log_tau


class LinearRouter(ScoreRouter):
    """The standard gate: logits = W h, no bias (Switch/Mixtral; PathMoE's Indep-MoE)."""

    def __init__(self, d_model: int, n_experts: int, top_k: int, frozen: bool = False, renormalize: bool = True):
        super().__init__(top_k, renormalize)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.weight.requires_grad_(not frozen)

    def logits(self, h, layer, hop):
        return h @ self.weight.float().T


class LowRankRouter(ScoreRouter):
    """LowRank-MoE: one router for all layers, W_l = W_base + A_l B_l.

    A_l starts at zero (LoRA-style), so training starts from a fully shared router.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, n_layers: int, rank: int, renormalize: bool = True):
        super().__init__(top_k, renormalize)
        self.weight = nn.Parameter(torch.empty(n_experts, d_model))
        self.lora_a = nn.Parameter(torch.zeros(n_layers, n_experts, rank))
        self.lora_b = nn.Parameter(torch.empty(n_layers, rank, d_model))
        nn.init.normal_(self.weight, std=0.02)
        nn.init.normal_(self.lora_b, std=0.02)

    def logits(self, h, layer, hop):
        return h @ self.weight.float().T + (h @ self.lora_b[layer].float().T) @ self.lora_a[layer].float().T


class RecurrentRouter(ScoreRouter):
    """Recurrent-MoE (RMoE, Qiu et al. 2024): a GRU over depth carries a routing state across layers.

    Layer l projects its state h_l to x_l = W1_l h_l, updates r_l = GRU(x_l, r_{l-1}) with r = 0 before
    the first routing call of a forward pass, and scores experts with z_l = W2_l r_l. The state lives on
    the router for the duration of one forward pass: the model calls `reset()` first, then the layers
    route in order.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, n_layers: int, hidden: int, renormalize: bool = True):
        super().__init__(top_k, renormalize)
        self.w_in = nn.Parameter(torch.empty(n_layers, hidden, d_model))
        self.w_out = nn.Parameter(torch.empty(n_layers, n_experts, hidden))
        self.gru = nn.GRUCell(hidden, hidden)
        nn.init.normal_(self.w_in, std=0.02)
        nn.init.normal_(self.w_out, std=0.02)
        self.state: torch.Tensor | None = None

    def reset(self) -> None:
        self.state = None

    def logits(self, h, layer, hop):  # called by decide(), outside autocast
        self.state = self.gru(h @ self.w_in[layer].float().T, self.state)
        return self.state @ self.w_out[layer].float().T


_HASH_P = 2_147_483_647  # the Mersenne prime 2^31 - 1: products of two residues fit in int64


def hash_scores(keys: torch.Tensor, n_experts: int, salt: int) -> torch.Tensor:
    """A fixed pseudo-random integer score for every (key, expert) pair, [N, M] int64.

    Ranking experts by this score gives each key its own pseudo-random permutation of the
    experts, so top-k always yields k distinct experts. Two rounds of squaring modulo a prime
    make the ranking non-linear in the expert index.
    """
    key = keys.long().reshape(-1, 1) % _HASH_P
    expert = torch.arange(n_experts, device=keys.device).reshape(1, -1)
    x = (key * 1_103_515_245 + salt) % _HASH_P
    x = (x + expert * 506_952_114 % _HASH_P) % _HASH_P  # 2_654_435_761 mod P: Triton rejects literals >= 2^31
    x = (x * x + 12_345) % _HASH_P
    x = (x * 1_597_334_677 % _HASH_P + key) % _HASH_P
    return (x * x) % _HASH_P


class HashRouter(nn.Module):
    """Parameter-free hash routing: each token id (or position) gets k fixed experts, weight 1/k.

    The hash mixes in the layer and hop, so layers and hops use different assignments.
    """

    def __init__(self, n_experts: int, top_k: int):
        super().__init__()
        self.n_experts, self.top_k = n_experts, top_k

    def decide(self, h: torch.Tensor, layer: int, hop: int, keys: torch.Tensor | None = None) -> Routing:
        if keys is None:
            raise ValueError("the hash router needs the token ids (or positions) of the tokens it routes")
        idx = hash_scores(keys, self.n_experts, salt=1 + 1009 * layer + 17 * hop).topk(self.top_k, dim=-1).indices
        weights = torch.full(idx.shape, 1.0 / self.top_k, device=idx.device)
        return Routing(idx=idx, weights=weights, probs=None, logits=None)


def build_routers(cfg: ModelConfig) -> tuple[nn.ModuleList, list[int]]:
    """The model's routers and, for every layer, the index of the router it uses."""
    L, B = cfg.n_layers, cfg.router_block
    hops = cfg.hops_per_layer()
    if cfg.router == "hash":
        return nn.ModuleList([HashRouter(cfg.n_experts, cfg.top_k)]), [0] * L
    if cfg.router_lowrank:
        router = LowRankRouter(cfg.d_model, cfg.n_experts, cfg.top_k, L, cfg.router_lowrank, cfg.renormalize)
        return nn.ModuleList([router]), [0] * L
    if cfg.router == "recurrent":
        router = RecurrentRouter(cfg.d_model, cfg.n_experts, cfg.top_k, L, cfg.router_hidden, cfg.renormalize)
        return nn.ModuleList([router]), [0] * L
    routers = []
    for block in range(L // B):
        if cfg.router == "cosine":
            n_proj = max(hops[block * B:(block + 1) * B]) if cfg.router_per_hop else 1
            routers.append(CosineRouter(cfg.d_model, cfg.d_space, cfg.n_experts, cfg.top_k, cfg.tau,
                                        cfg.learn_tau, n_proj, cfg.router_frozen, cfg.kinematic_vectors,
                                        cfg.renormalize))
        else:
            routers.append(LinearRouter(cfg.d_model, cfg.n_experts, cfg.top_k, cfg.router_frozen, cfg.renormalize))
    return nn.ModuleList(routers), [layer // B for layer in range(L)]


def expert_counts(idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many selections each expert got, [n_experts] int64, without a host sync: bincount on eager CPU
    (one op), `scatter_counts` elsewhere (CUDA's bincount reads the largest index back to size its
    output; torch.compile breaks the graph at bincount, whose output shape depends on the data)."""
    flat = idx.reshape(-1)
    if cpu_kernels.eager_cpu(flat):
        return torch.bincount(flat, minlength=n_experts)
    return scatter_counts(flat, n_experts)


def scatter_counts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Counts of the ids in `flat` by a scatter-add, which compiles to atomic adds on CUDA (index_add
    compiled to a sort: 1 ms of Wide's 59 ms H100 step)."""
    counts = torch.zeros(n_experts, dtype=torch.int32, device=flat.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32)).long()


def _pool(tensors: list[torch.Tensor]) -> torch.Tensor:
    """The tensors joined along dim 1; a single one as it is (a copy costs time on CPU)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, dim=1)


def switch_balance_loss(routings: list[Routing], n_experts: int, per: str = "tokens_k", groups: int = 1) -> torch.Tensor:
    """Switch-Transformer balance loss M * sum_i f_i P_i for one routing event.

    Several routings (e.g. all hops of a layer) are pooled into one event. f_i is the share of
    selections that went to expert i, divided by tokens*k (`per="tokens_k"`, sums to 1) or by
    tokens (`per="tokens"`, sums to k); P_i is the mean router probability of expert i. With
    `groups` > 1 the tokens are `groups` consecutive micro-batches: one loss each, averaged.
    """
    idx = _pool([r.idx.reshape(groups, -1) for r in routings])  # [G, selections per group]
    probs = _pool([r.probs.reshape(groups, -1, n_experts) for r in routings])  # [G, tokens, M]
    if groups > 1:  # count each group's selections in its own range of ids
        idx = idx + n_experts * torch.arange(groups, device=idx.device).unsqueeze(1)
    # M * mean_g sum_i f_gi P_gi as one dot product of [G * M] vectors, the scale and P's 1 / tokens folded
    # into f: fewer small ops forward and backward than the formula written out (Wide's 8 events: 1.64 ms,
    # not 2.50), and a sum's backward is a broadcast where a mean's divides ([1,024, 64]: 62 against 149 us)
    per_group = idx.shape[1] if per == "tokens_k" else probs.shape[1]
    f = expert_counts(idx, groups * n_experts) * (n_experts / (groups * per_group * probs.shape[1]))
    return probs.sum(dim=1).flatten() @ f


def router_z_loss(routing: Routing) -> torch.Tensor:
    """ST-MoE (Zoph et al.) z-loss: mean squared log-partition of the router logits."""
    return routing.logits.logsumexp(dim=-1).square().mean()
