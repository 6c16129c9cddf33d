"""The decoder-only transformer: pre-LN blocks, RoPE attention via SDPA, tied embeddings.

    x = dropout(embed(tokens))
    for each block:  x = x + dropout(Attn(LN(x)));  x = x + dropout(FFN(LN(x)))
    logits = LN_f(x) @ embed.T

FFN is a dense SiLU MLP or an MoE layer (trajectory.MoELayer). The model owns the routers and
hands each MoE layer its router, so block-shared routers are literally one module. Decision
forcing (MonoB-MoE, `router_decision_block` > 1) hands every layer of a block a replay of the
decision its first layer's router made; each layer still applies its own experts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import cpu_kernels
from .config import ModelConfig
from .routing import Routing, build_routers
from .trajectory import HopEvent, Interventions, MoELayer


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in real arithmetic: each consecutive channel pair (x1, x2) of x becomes
    (x1 cos - x2 sin, x1 sin + x2 cos); cos and sin broadcast against x[..., ::2]."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x by position-dependent angles (`rotate_pairs`).

    On CPU in fp32 (and fp64) the rotation runs as one complex product, at a third of the cost of the dozen
    strided real ops: the same arithmetic, equal to `rotate_pairs` within the last bit (bit for bit at
    head widths 16 and 32 on the CPU we measured, not at 8). bf16 has no complex dtype, and
    torch.compile fuses the real ops but not complex ones.
    """
    if not cpu_kernels.eager_cpu(x) or x.dtype not in (torch.float32, torch.float64):
        return rotate_pairs(x, cos, sin)
    z = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(z * torch.complex(cos, sin).to(z.dtype)).flatten(-2)


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, T, V] against targets [B, T], in fp32. Eager CPU runs use the C++
    kernel (cpu_kernels.cross_entropy: one exponential per logit, not torch's two; 2.2-2.3 against 5.3-5.7
    ms forward and backward at 1,024 x 2,048 in benchmarks/run.py), equal to F.cross_entropy to float
    rounding; GPUs and compiled code use F.cross_entropy, which torch.compile fuses."""
    logits, targets = logits.float().flatten(0, 1), targets.flatten()
    if cpu_kernels.eager_cpu(logits) and cpu_kernels.available():
        return cpu_kernels.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.dropout = cfg.n_heads, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.attn_bias)
        self.out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        # split and unbind: their backward joins the gradients, where slicing's writes each into zeros
        qk, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).split([2, 1], dim=2)
        q, k = apply_rope(qk, cos[:T, None, None], sin[:T, None, None]).unbind(2)  # one rotation for both
        q, k, v = (t.transpose(1, 2) for t in (q, k, v.squeeze(2)))  # [B, H, T, hd]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class DenseFFN(nn.Module):
    """SiLU MLP without biases: d_ff always-active rank-1 neurons (the paper's dense baselines)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.down = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.up(F.silu(self.down(x)))


class Block(nn.Module):
    """One pre-LN block: x + Attn(LN(x)), then + FFN(LN(x)). The FFN is dense or an MoE layer; an MoE layer
    routes with the router (and scales by the magnitude scalar alpha) that the model hands it."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ffn = MoELayer(cfg, layer) if cfg.ffn == "moe" else DenseFFN(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, tokens: torch.Tensor,
                iv: Interventions, router=None, alpha: torch.Tensor | None = None):
        """Returns (the block's output, the attention update, the FFN update, the MoE layer's hop events and
        hops executed per token [B, T]); a dense block has no events and None hops."""
        attn = self.attn(self.ln1(x), cos, sin)
        x = x + self.drop(attn)
        h = self.ln2(x)
        if isinstance(self.ffn, MoELayer):
            ffn, events, hops = self.ffn(h, router, tokens, alpha, iv)
        else:
            ffn, events, hops = self.ffn(h), [], None
        return x + self.drop(ffn), attn, ffn, events, hops


class DecisionReplay:
    """MonoB: routes with `router` on the first call, then returns that same decision to every later call.

    Later calls get copies of the expert ids and weights, so each layer owns its tensors (telemetry
    saves them side by side); gradients still reach the router through every layer's weights.
    Interventions that relabel experts act per layer, on the replayed decision.
    """

    def __init__(self, router: nn.Module):
        self.router, self.decision = router, None

    def decide(self, h: torch.Tensor, layer: int, hop: int, keys: torch.Tensor | None = None) -> Routing:
        if self.decision is None:
            self.decision = self.router.decide(h, layer, hop, keys)
            return self.decision
        d = self.decision
        return Routing(d.idx.clone(), d.weights.clone(), d.probs, d.logits)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, V]
    loss: torch.Tensor | None  # mean token cross-entropy when targets were given
    events: list[HopEvent] = field(default_factory=list)  # one per (layer, hop)
    hops: torch.Tensor | None = None  # [L, B, T] hops executed per token and layer (MoE only)
    # traced runs only (Interventions.trace), per layer [B, T]: norms of the attention and FFN (MoE or dense) updates
    attn_norms: list[torch.Tensor] = field(default_factory=list)
    ffn_norms: list[torch.Tensor] = field(default_factory=list)


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, layer) for layer in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        if cfg.ffn == "moe":
            self.routers, self.router_of_layer = build_routers(cfg)
        else:
            self.routers, self.router_of_layer = nn.ModuleList(), []
        n_alpha = cfg.n_layers if cfg.magnitude_scope == "layer" else 1
        self.alpha = nn.Parameter(torch.full((n_alpha,), cfg.magnitude_alpha)) if cfg.magnitude_alpha else None
        cos, sin = rope_tables(cfg.max_seq_len, cfg.d_model // cfg.n_heads, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._init_weights()

    def _init_weights(self):
        """normal(0.02) for embeddings and linears, GPT-2 residual scaling on output projections."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:
            for linear in (block.attn.qkv, block.attn.out):
                nn.init.normal_(linear.weight, std=0.02)
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)
            # out's first draw above only advances the generator; dropping it would change every run's weights
            nn.init.normal_(block.attn.out.weight, std=residual_std)
            if isinstance(block.ffn, DenseFFN):
                nn.init.normal_(block.ffn.down.weight, std=0.02)
                nn.init.normal_(block.ffn.up.weight, std=residual_std)

    def router_for_layer(self, layer: int) -> nn.Module:
        return self.routers[self.router_of_layer[layer]]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None,
                iv: Interventions | None = None) -> ModelOutput:
        iv = iv or Interventions()
        for router in self.routers:  # a recurrent router starts each forward pass from a zero state
            if hasattr(router, "reset"):
                router.reset()
        x = self.drop(self.embed(tokens))
        out = ModelOutput(logits=None, loss=None)
        hops = []
        decision_block = self.cfg.router_decision_block
        for layer, block in enumerate(self.blocks):
            router = alpha = None
            if self.cfg.ffn == "moe":
                alpha = None if self.alpha is None else self.alpha[min(layer, len(self.alpha) - 1)]
                router = self.router_for_layer(layer)
                if decision_block > 1:  # MonoB: the block's first layer decides for all of its layers
                    if layer % decision_block == 0:
                        replay = DecisionReplay(router)
                    router = replay
            x, attn, ffn, events, done = block(x, self.rope_cos, self.rope_sin, tokens, iv, router, alpha)
            out.events += events
            if done is not None:
                hops.append(done)
            if iv.trace:
                out.attn_norms.append(attn.detach().float().norm(dim=-1))
                out.ffn_norms.append(ffn.detach().float().norm(dim=-1))
        out.logits = self.ln_f(x) @ self.embed.weight.T
        if targets is not None:
            out.loss = token_cross_entropy(out.logits, targets)
        out.hops = torch.stack(hops) if hops else None
        return out
