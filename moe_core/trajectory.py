"""The multi-hop ST-MoE layer (the paper's Algorithm 1), composed of a router and an expert bank.

    h_accum = 0
    for hop in 1..H:
        (idx, w) = route(x + h_accum)          # semantic re-route: the same router, updated state
        dh = experts(x + h_accum, idx, w)      # one expert pool shared across hops
        h_accum += dh
    return alpha * h_accum                     # residual="accum" (default), or x + alpha*h_accum

With H = 1 this is an ordinary top-k MoE layer, which is how the PathMoE settings use it.
Inference-only interventions: relative-norm halting (a token stops once
||dh|| / (||x + h_accum|| + 1e-6) < eps; the hop that triggers it counts as executed),
frozen routing (every hop reuses the hop-0 decision), and the robustness perturbations of the
PathMoE spec 4.6 (relabelled expert ids, Gaussian noise on the router input).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .config import ModelConfig
from .experts import build_experts
from .routing import Routing


@dataclass
class HopEvent:
    """What one hop of one layer did: its routing and, when traced, its update dh [N, d]."""

    layer: int
    hop: int
    routing: Routing
    update: torch.Tensor | None = None


@dataclass
class Interventions:
    """Inference-time changes to the trajectory; the defaults change nothing."""

    halt_eps: float = 0.0  # relative-norm halting threshold (0 = never halt)
    freeze_routing: bool = False  # reuse the hop-0 routing at every hop
    zero_moe: bool = False  # the experts' update is zero (expert-contribution test); residual=literal still passes x
    trace: bool = False  # keep every hop's update dh in the events, and each block's |attention| and |FFN| norms
    # per layer: expert id e is replaced by perm[e]; a perm [N, E] holds one row per routed token
    expert_permutation: list[torch.Tensor] | None = None
    router_noise: float = 0.0  # sigma: the router sees h + eps * sigma * ||h|| / sqrt(d), eps ~ N(0, I)


def add_relative_noise(h: torch.Tensor, sigma: float) -> torch.Tensor:
    """h + eps * sigma * ||h|| / sqrt(d), eps ~ N(0, I): noise whose norm is about sigma * ||h|| per row."""
    if not sigma:
        return h
    return h + torch.randn_like(h) * (sigma * h.norm(dim=-1, keepdim=True) / math.sqrt(h.shape[-1]))


def relabel(routing: Routing, perm: torch.Tensor) -> Routing:
    """The same decision with expert id e replaced by perm[e] (perm [E]), or by perm[t, e] for token t (perm [N, E])."""
    perm = perm.to(routing.idx.device)
    if perm.dim() == 2 and perm.shape[0] != routing.idx.shape[0]:
        raise ValueError(f"a per-token permutation has {perm.shape[0]} rows for {routing.idx.shape[0]} routed tokens")
    idx = perm[routing.idx] if perm.dim() == 1 else perm.gather(1, routing.idx)
    return Routing(idx, routing.weights, routing.probs, routing.logits)


class MoELayer(nn.Module):
    """H hops over one expert pool; the router is handed in by the model (it may be shared)."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.hops = cfg.hops_per_layer()[layer]
        self.residual = cfg.residual
        self.key = cfg.hash_key
        self.experts = build_experts(cfg)

    def forward(self, x: torch.Tensor, router: nn.Module, token_ids: torch.Tensor,
                alpha: torch.Tensor | None, iv: Interventions) -> tuple[torch.Tensor, list[HopEvent], torch.Tensor]:
        """x: [B, T, d] (the LayerNorm'd residual). Returns (output, events, hops executed [B, T])."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        keys = self._keys(token_ids, shape)
        halting = iv.halt_eps > 0  # the per-token bookkeeping below runs only when tokens may stop
        active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device) if halting else None
        hops_done = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if halting else None
        h_accum = None  # the sum of the hops' updates; None before the first (adding zeros costs time)
        events: list[HopEvent] = []
        for hop in range(self.hops):
            state = x if h_accum is None else x + h_accum
            if hop > 0 and iv.freeze_routing:
                routing = events[0].routing
            else:
                routing = router.decide(add_relative_noise(state, iv.router_noise), self.layer, hop, keys)
                if iv.expert_permutation is not None:  # robustness test: scramble which expert gets a slot
                    routing = relabel(routing, iv.expert_permutation[self.layer])
            dh = self.experts(state, routing.idx, routing.weights)
            if halting:
                dh = dh * active.unsqueeze(-1).to(dh.dtype)
                hops_done += active
            h_accum = dh if h_accum is None else h_accum + dh
            events.append(HopEvent(self.layer, hop, routing, dh if iv.trace else None))
            if halting:
                rel = dh.float().norm(dim=-1) / ((x + h_accum).float().norm(dim=-1) + 1e-6)
                active = active & ~(rel < iv.halt_eps)
        if hops_done is None:  # without halting every token runs every hop
            hops_done = torch.full((x.shape[0],), self.hops, dtype=torch.long, device=x.device)
        out = h_accum if alpha is None else alpha.to(h_accum.dtype) * h_accum
        if iv.zero_moe:
            out = torch.zeros_like(out)
        if self.residual == "literal":
            out = x + out
        return out.reshape(shape), events, hops_done.reshape(shape[:-1])

    def _keys(self, token_ids: torch.Tensor, shape) -> torch.Tensor:
        """What the hash router hashes: token ids or positions in the sequence."""
        if self.key == "position":
            return torch.arange(shape[1], device=token_ids.device).expand(shape[0], -1).reshape(-1)
        return token_ids.reshape(-1)
