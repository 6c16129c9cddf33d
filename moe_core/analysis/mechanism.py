"""Why multi-hop and wide routing end up equivalent: the paper's mechanism analyses (spec 4.3-4.8).

    echo chamber       hop_collinearity, hop_jaccard, frozen_routing   (4.3, 4.4, Table 4)
    early exit         halting_sweep                                   (4.5, Tables 5-6)
    what experts are   identity_cosine, vocab_projection_jaccard,
                       weight_alignment_cosine                         (4.6, 4.7)
    how much they do   moe_attention_norm_ratio, expert_zeroing        (4.8)

Every function takes loaded models and token tensors [B, T] (or (x, y) batches for perplexity)
and returns plain floats and lists. Forward passes run under torch.no_grad in eval mode and
restore the caller's mode; token-level analyses run in fp32 on the model's device.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluate import evaluate
from ..experts import RankExperts
from ..model import MoETransformer
from ..stats import pct_change
from ..trajectory import HopEvent, Interventions
from .common import perplexity, require_moe, traced_forward

# ---------------------------------------------------------------------------------------------
# helpers


def _hops_by_layer(events: list[HopEvent]) -> dict[int, list[HopEvent]]:
    layers: dict[int, list[HopEvent]] = {}
    for event in events:
        layers.setdefault(event.layer, []).append(event)
    return layers


def _multi_hop_summary(per_layer: dict[int, float], what: str) -> dict:
    """{"layers", "per_layer", "mean"} over the layers that run >= 2 hops."""
    if not per_layer:
        raise ValueError(f"{what} needs a layer with at least 2 hops; this model runs 1 hop everywhere")
    values = list(per_layer.values())
    return {"layers": list(per_layer), "per_layer": values, "mean": sum(values) / len(values)}


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of [N, d] tensors in fp32; a row where either vector is zero gives 0."""
    a, b = a.float(), b.float()
    dot = (a * b).sum(dim=-1)
    denom = a.norm(dim=-1) * b.norm(dim=-1)
    return torch.where(denom > 0, dot / denom, torch.zeros_like(dot)).clamp(-1.0, 1.0)


def set_jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Jaccard |A & B| / |A | B| of id sets [N, k_a] and [N, k_b] (ids distinct per row)."""
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).sum(dim=(-2, -1)).float()
    return inter / (a.shape[-1] + b.shape[-1] - inter)


def jaccard_matrix(sets_a: torch.Tensor, sets_b: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Jaccard of every set in A [M_a, k] with every set in B [M_b, k] (ids < vocab_size): [M_a, M_b]."""
    hot_a = torch.zeros(sets_a.shape[0], vocab_size).scatter_(1, sets_a.cpu(), 1.0)
    hot_b = torch.zeros(sets_b.shape[0], vocab_size).scatter_(1, sets_b.cpu(), 1.0)
    inter = hot_a @ hot_b.T
    return inter / (sets_a.shape[1] + sets_b.shape[1] - inter)


def best_abs_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """For each row of a [N_a, d], the largest |cosine| with any row of b [N_b, d]: [N_a]."""
    a, b = F.normalize(a.float().cpu(), dim=-1), F.normalize(b.float().cpu(), dim=-1)
    return (a @ b.T).abs().max(dim=1).values


def _rank_experts(model: MoETransformer, what: str) -> list[RankExperts]:
    require_moe(model, what)
    banks = [block.ffn.experts for block in model.blocks]
    if not isinstance(banks[0], RankExperts):
        raise ValueError(f"{what} needs rank-r experts (W_down, W_up); this model has {model.cfg.expert} experts")
    return banks


def _check_comparable(model_a: MoETransformer, model_b: MoETransformer, *keys: str) -> None:
    """Layer-by-layer comparisons need the two configs to agree on `keys`."""
    for key in keys:
        a, b = getattr(model_a.cfg, key), getattr(model_b.cfg, key)
        if a != b:
            raise ValueError(f"the two models differ in {key}: {a} vs {b}")

# ---------------------------------------------------------------------------------------------
# the echo chamber: consecutive hops repeat each other (4.3, 4.4, Table 4)


def hop_collinearity(model: MoETransformer, tokens: torch.Tensor) -> dict:
    """cos(dh_0, dh_1) between each token's first two hop updates (spec 4.3).

    With one shared proj_in the re-routed state moves along dh_0, so hop 1 tends to repeat hop 0
    (paper: 0.805 for Deep 3x4, 0.049 with decoupled per-hop projections). Mean over tokens per
    layer, then over the layers running >= 2 hops; a zero update counts as cosine 0.
    Returns {"layers", "per_layer", "mean"}.
    """
    require_moe(model, "hop_collinearity")
    hops = _hops_by_layer(traced_forward(model, tokens, Interventions(trace=True)).events)
    per_layer = {layer: cosine(ev[0].update, ev[1].update).mean().item()
                 for layer, ev in hops.items() if len(ev) >= 2}
    return _multi_hop_summary(per_layer, "hop_collinearity")


def hop_jaccard(model: MoETransformer, tokens: torch.Tensor, freeze_routing: bool = False) -> dict:
    """Mean Jaccard overlap of the selected expert sets of consecutive hops (spec 4.4).

    Averaged over tokens and hop pairs per layer, then over the layers running >= 2 hops
    (paper: 0.970 converged, 0.102 underfit). With freeze_routing it is 1 by construction.
    Returns {"layers", "per_layer", "mean"}.
    """
    require_moe(model, "hop_jaccard")
    hops = _hops_by_layer(traced_forward(model, tokens, Interventions(freeze_routing=freeze_routing)).events)
    per_layer = {layer: torch.stack([set_jaccard(a.routing.idx, b.routing.idx).mean()
                                     for a, b in zip(ev, ev[1:])]).mean().item()
                 for layer, ev in hops.items() if len(ev) >= 2}
    return _multi_hop_summary(per_layer, "hop_jaccard")


def frozen_routing(model: MoETransformer, batches, device: torch.device, precision: str = "auto") -> dict:
    """Perplexity with normal re-routing vs every hop reusing the hop-0 experts (Table 4).

    Returns {"normal_ppl", "frozen_ppl", "delta_ppl_pct", "jaccard"}, where jaccard is the
    normal-mode hop_jaccard on the inputs of the first batch (paper, converged: 34.62 -> 37.26,
    +7.6%, Jaccard 0.970). Needs a layer with >= 2 hops, like hop_jaccard.
    """
    jaccard = hop_jaccard(model, batches[0][0])["mean"]
    normal = perplexity(model, batches, device, precision)
    frozen = perplexity(model, batches, device, precision, Interventions(freeze_routing=True))
    return {"normal_ppl": normal, "frozen_ppl": frozen, "delta_ppl_pct": pct_change(frozen, normal),
            "jaccard": jaccard}

# ---------------------------------------------------------------------------------------------
# early exit (4.5)


def halting_sweep(model: MoETransformer, batches, device: torch.device,
                  eps=(0.02, 0.05, 0.10, 0.15), precision: str = "auto") -> list[dict]:
    """Zero-shot relative-norm halting (spec 4.5): one row per epsilon, the eps = 0 baseline first.

    A token ends a layer's trajectory once ||dh|| / (||x + h_accum|| + 1e-6) < eps; the hop that
    triggers it counts. Each row: {"eps", "mean_hops" (executed hops per token, mean over layers),
    "hops_per_layer", "flop_saving" (1 - executed / scheduled hop slots, i.e. 1 - mean_hops / H
    for uniform hops), "val_ppl", "delta_ppl_pct" (vs eps = 0)}. Paper, converged Deep 3x4:
    eps 0.10 -> 2.25 hops, 25.0% saved, +0.12% ppl.
    """
    require_moe(model, "halting_sweep")
    if not all(e > 0 for e in eps):  # written so that a NaN fails too
        raise ValueError(f"halting thresholds must be > 0 (eps = 0 is the baseline row), got {eps}")
    scheduled = sum(model.cfg.hops_per_layer())
    rows = []
    for e in (0.0, *eps):
        r = evaluate(model, batches, device, precision, Interventions(halt_eps=e))
        rows.append({"eps": e, "mean_hops": r["mean_hops"], "hops_per_layer": r["hops_per_layer"],
                     "flop_saving": 1.0 - sum(r["hops_per_layer"]) / scheduled, "val_ppl": r["val_ppl"]})
    for row in rows:
        row["delta_ppl_pct"] = pct_change(row["val_ppl"], rows[0]["val_ppl"])
    return rows


def cost_at_saving(rows: list[dict], saving: float) -> float | None:
    """PPL change (%) at a MoE FLOP saving (a fraction), interpolated linearly along halting_sweep's rows.

    The paper's halting claims are about the cost of a given saving, and the same epsilon saves more in
    an underfit model, so models are compared at equal saving. None when no epsilon saved that much.
    """
    points = sorted((row["flop_saving"], row["delta_ppl_pct"]) for row in rows)
    if points[-1][0] < saving:
        return None
    return float(np.interp(saving, [s for s, _ in points], [d for _, d in points]))

# ---------------------------------------------------------------------------------------------
# how much the experts contribute (4.8)


def expert_zeroing(model: MoETransformer, batches, device: torch.device, precision: str = "auto") -> dict:
    """Perplexity with the MoE layers as trained vs with every expert update set to zero (spec 4.8).

    Returns {"normal_ppl", "zeroed_ppl", "ratio"} (paper: Wide 33.9 -> 494.5, Deep 34.6 -> 846.9).
    """
    require_moe(model, "expert_zeroing")
    normal = perplexity(model, batches, device, precision)
    zeroed = perplexity(model, batches, device, precision, Interventions(zero_moe=True))
    return {"normal_ppl": normal, "zeroed_ppl": zeroed, "ratio": zeroed / normal}


def moe_attention_norm_ratio(model: MoETransformer, tokens: torch.Tensor) -> dict:
    """Per layer, the mean over tokens of ||MoE output|| / ||attention output|| (spec 4.8).

    The paper does not say whether it averages the per-token ratios or takes the ratio of mean norms;
    this is the former, so each token weighs the same whatever its norms. Both are what the block adds
    to the residual stream (the MoE output includes any magnitude alpha). A fraction, not a percentage
    (paper: Wide 0.396, Deep 1.482). Dense models give the FFN/attention ratio. Returns
    {"per_layer", "mean"}.
    """
    out = traced_forward(model, tokens, Interventions(trace=True))
    per_layer = [(ffn / attn).mean().item() for attn, ffn in zip(out.attn_norms, out.ffn_norms)]
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer)}

# ---------------------------------------------------------------------------------------------
# what the experts are (4.6, 4.7)


@torch.no_grad()
def identity_cosine(model: MoETransformer) -> dict:
    """cos(W_down_i, W_up_i) of every expert in every layer, one value per rank row (spec 4.7).

    An expert that reads and writes the same direction would be a (gated) identity; the paper
    finds mean 0.157, 0.0% with |cos| > 0.8 and 62.3% with |cos| < 0.2. Returns {"mean",
    "mean_abs", "frac_abs_above_0.8", "frac_abs_below_0.2", "values"} (values for a histogram).
    """
    banks = _rank_experts(model, "identity_cosine")
    values = torch.cat([cosine(b.w_down.flatten(0, 1), b.w_up.flatten(0, 1)) for b in banks])
    magnitude = values.abs()
    return {"mean": values.mean().item(), "mean_abs": magnitude.mean().item(),
            "frac_abs_above_0.8": (magnitude > 0.8).float().mean().item(),
            "frac_abs_below_0.2": (magnitude < 0.2).float().mean().item(),
            "values": values.tolist()}


@torch.no_grad()
def vocab_top_sets(model: MoETransformer, top: int) -> list[torch.Tensor]:
    """Per layer, the `top` token ids each rank-1 expert's write vector u_i promotes most: [M, top].

    Logits are E u_i with the tied embedding E and no final LayerNorm, as the paper projects W_up.
    """
    banks = _rank_experts(model, "vocab_projection_jaccard")
    if banks[0].w_up.shape[1] != 1:
        raise ValueError(f"vocab_projection_jaccard needs rank-1 experts; this model has rank {banks[0].w_up.shape[1]}")
    embed = model.embed.weight.float()
    return [(b.w_up[:, 0].float() @ embed.T).topk(top, dim=-1).indices.cpu() for b in banks]


@torch.no_grad()
def vocab_projection_jaccard(model_a: MoETransformer, model_b: MoETransformer, top: int = 20,
                             seed: int = 0) -> dict:
    """Cross-seed functional alignment (spec 4.6): do two models' experts write the same tokens?

    For each expert of A, the best Jaccard between its top-`top` vocabulary projection and that of
    any expert in the same layer of B; mean per layer and overall (paper: Wide 0.15, Deep 0.13).
    `random_baseline` is the same best-match statistic for random `top`-token sets (seeded);
    `random_pair_mean` is the mean Jaccard of two random sets, which is what the paper's ~0.0003
    baseline matches (its "500x above random"). Returns {"per_layer", "mean", "random_baseline",
    "random_pair_mean"}.
    """
    _check_comparable(model_a, model_b, "n_layers", "vocab_size")
    vocab = model_a.cfg.vocab_size
    sets_a, sets_b = vocab_top_sets(model_a, top), vocab_top_sets(model_b, top)
    per_layer = [jaccard_matrix(a, b, vocab).max(dim=1).values.mean().item() for a, b in zip(sets_a, sets_b)]
    g = torch.Generator().manual_seed(seed)
    rand_a = torch.rand(sets_a[0].shape[0], vocab, generator=g).topk(top, dim=-1).indices
    rand_b = torch.rand(sets_b[0].shape[0], vocab, generator=g).topk(top, dim=-1).indices
    rand = jaccard_matrix(rand_a, rand_b, vocab)
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer),
            "random_baseline": rand.max(dim=1).values.mean().item(), "random_pair_mean": rand.mean().item()}


@torch.no_grad()
def weight_alignment_cosine(model_a: MoETransformer, model_b: MoETransformer, seed: int = 0) -> dict:
    """Best-match |cosine| of raw W_up vectors between two models, layer by layer (spec 4.6).

    For each W_up row of A, the largest |cos| with any W_up row in the same layer of B; mean per
    layer and overall. `random_baseline` is the same statistic for as many Gaussian vectors in
    R^d_model (seeded): the paper finds 0.107 across seeds against ~0.116 for random, i.e. no
    weight alignment. At the paper's shapes (1,024 vectors in R^1,024) this baseline is 0.107, the
    paper's observed value; its 0.116 matches sqrt(2 ln M / d), the large-d limit. Returns
    {"per_layer", "mean", "random_baseline"}.
    """
    _check_comparable(model_a, model_b, "n_layers", "d_model")
    banks_a = _rank_experts(model_a, "weight_alignment_cosine")
    banks_b = _rank_experts(model_b, "weight_alignment_cosine")
    per_layer = [best_abs_cosine(a.w_up.flatten(0, 1), b.w_up.flatten(0, 1)).mean().item()
                 for a, b in zip(banks_a, banks_b)]
    g = torch.Generator().manual_seed(seed)
    shape_a, shape_b = banks_a[0].w_up.flatten(0, 1).shape, banks_b[0].w_up.flatten(0, 1).shape
    baseline = best_abs_cosine(torch.randn(shape_a, generator=g), torch.randn(shape_b, generator=g))
    return {"per_layer": per_layer, "mean": sum(per_layer) / len(per_layer), "random_baseline": baseline.mean().item()}
