"""Model FLOPs and a measured matmul peak: the two halves of model FLOP utilisation (MFU).

MFU = tokens/s * training FLOPs per token / the peak FLOP/s of a large matmul measured on the
same device in the same dtype. Training FLOPs count the model's matmuls only (PaLM's convention):
6 FLOPs per multiply-add of a weight per token (forward, and twice that backward) plus causal
attention's 12 * layers * d_model * seq_len. A MoE counts only what a token activates: the
router's projections at every routing decision and its top-k experts, never the masked-out
arithmetic a dense dispatch backend may spend.
"""
from __future__ import annotations

import functools
import time

import torch

from .config import ModelConfig


def router_macs(cfg: ModelConfig) -> int:
    """Multiply-adds of one routing decision for one token."""
    d, m = cfg.d_model, cfg.n_experts
    if cfg.router == "hash":
        return 0
    if cfg.router == "cosine":
        return cfg.d_space * d + m * cfg.d_space
    if cfg.router == "recurrent":  # input projection, GRU cell (3 gates, input and state), output
        p = cfg.router_hidden
        return p * d + 6 * p * p + m * p
    return m * d + (cfg.router_lowrank * (d + m) if cfg.router_lowrank else 0)  # linear, low-rank


def ffn_macs(cfg: ModelConfig, layer: int) -> int:
    """Multiply-adds of one layer's FFN for one token: dense, or routing plus active experts per hop
    (under decision forcing only the first layer of a block routes)."""
    d = cfg.d_model
    if cfg.ffn == "dense":
        return 2 * d * cfg.d_ff
    per_expert = {"rank": 2 * cfg.expert_rank * d, "swiglu": 3 * d * cfg.expert_d_ff, "static": d}[cfg.expert]
    routes = layer % cfg.router_decision_block == 0
    return cfg.hops_per_layer()[layer] * (routes * router_macs(cfg) + cfg.top_k * per_expert)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs (forward + backward) of one token at context length seq_len."""
    d = cfg.d_model
    macs = sum(4 * d * d + ffn_macs(cfg, layer) for layer in range(cfg.n_layers)) + d * cfg.vocab_size
    return 6 * macs + 12 * cfg.n_layers * d * seq_len


def _peak_sizes(device: torch.device) -> tuple[int, ...]:
    return (4096, 8192) if device.type == "cuda" else (512, 1024, 2048)


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, threads: int = 0, repeats: int = 5,
                      budget_s: float = 0.5) -> float:
    """The best FLOP/s of square matmuls on `device` in `dtype`, measured now, once per process and
    thread count (`threads` is the caller's torch.get_num_threads(), part of the cache key only).
    A first timed product (after the warm-up) slower than budget_s ends the search, in any dtype: bf16 on
    a CPU without bf16 instructions took minutes over the 2,048-wide products (fp32 here: 0.2 s each)."""
    dev = torch.device(device)
    best = 0.0
    for n in _peak_sizes(dev):
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        a @ b  # warm-up: thread pools, cuBLAS handles
        for i in range(repeats):
            sync(dev)
            start = time.perf_counter()
            a @ b
            sync(dev)
            seconds = time.perf_counter() - start
            best = max(best, 2 * n ** 3 / seconds)
            if i == 0 and seconds > budget_s:
                return best
    return best


def sync(device: torch.device) -> None:
    """Wait for queued device work (a no-op on CPU), so that wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
