"""Routing paths across depth: the PathMoE paper's path analyses (PathMoE spec 4.1-4.6).

    record              routing_record                                  (4.0)
    routing entropy     expert_usage_entropy, token_routing_entropy     (4.1 a, b)
    path concentration  path_statistics, unique_paths_curve,
                        block_path_entropy                              (4.2, 4.3)
    cross-layer         consecutive_agreement, consecutive_jaccard,
                        consecutive_correlation, split_by_block,
                        run_length_histogram, sustained_engagement      (4.4)
    linguistic paths    token_class, top_path_labels,
                        path_class_alignment, top_tokens_per_path       (4.5)
    load                expert_loads                                    (7.3)
    robustness          shuffle_robustness, single_layer_shuffle,
                        token_fraction_shuffle, router_noise_robustness (4.6)

A token's path is the tuple of its top-1 experts over the MoE layers, pi(t) = (e_1, ..., e_L).
Only routing_record and the robustness functions run a model; the other functions take plain arrays
(top1 [N, L], per-layer top-k [N, k] or probabilities [N, E], torch or numpy) so they can be
checked on hand-built tables and applied to records pooled over many batches. Results are
plain floats, ints and lists.

Index symmetry (spec 7.5): expert ids are arbitrary labels in independently parameterised
layers, so index-based cross-layer measures (agreement, Jaccard) are only meaningful where a
router is shared (Pearson correlation of probabilities and run lengths are index-based too);
`consecutive_agreement` also reports NMI and Hungarian-aligned agreement, which do not change
under a relabelling of either layer's experts.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from ..model import MoETransformer
from ..stats import pct_change
from ..trajectory import Interventions
from .common import perplexity, require_moe, traced_forward
from .mechanism import cosine, set_jaccard
from .utilisation import as_numpy, entropy_bits, load_statistics, selection_shares

# ---------------------------------------------------------------------------------------------
# helpers


def _path_ids(top1) -> np.ndarray:
    """One integer id per token, equal exactly when two tokens follow the same path: [N].

    Layers are folded in one at a time and the ids re-densified after each, so the code never
    overflows (E^L does not fit in int64 for E = L = 16).
    """
    top1 = as_numpy(top1).astype(np.int64)
    if top1.ndim != 2:
        raise ValueError(f"top1 must be [N, L], got shape {top1.shape}")
    ids = np.zeros(top1.shape[0], dtype=np.int64)
    for column in top1.T:
        _, ids = np.unique(ids * (int(column.max(initial=0)) + 1) + column, return_inverse=True)
        ids = ids.reshape(-1)
    return ids


def _path_counts(top1) -> np.ndarray:
    """How many tokens follow each distinct path, most frequent first."""
    return np.sort(np.bincount(_path_ids(top1)))[::-1]


def _require_probs(p, layer: int) -> torch.Tensor:
    """One layer's router probabilities as a float64 tensor; a ValueError where there are none (hash)."""
    if p is None:
        raise ValueError(f"layer {layer} has no router probabilities (hash routing?)")
    return torch.as_tensor(p).double()

# ---------------------------------------------------------------------------------------------
# recording a model's routing (4.0)


def routing_record(model: MoETransformer, tokens: torch.Tensor, iv: Interventions | None = None) -> dict:
    """Every token's routing at every MoE layer's first hop, without autocast, returned on CPU (spec 4.0).

    tokens [B, T] are flattened row-major into N = B*T tokens. Returns {"tokens": [N] ids,
    "top1": LongTensor [N, L] (idx[:, 0]: top-k is sorted by router score), "topk": per layer
    [N, k], "probs": per layer [N, E] fp32, or None where the router has no probabilities (hash)}.
    Records of several batches pool with torch.cat along dim 0. `iv` perturbs the routing (4.6).
    """
    require_moe(model, "routing_record")
    events = [e for e in traced_forward(model, tokens, iv or Interventions()).events if e.hop == 0]
    events.sort(key=lambda e: e.layer)
    topk = [e.routing.idx.cpu() for e in events]
    probs = [None if e.routing.probs is None else e.routing.probs.float().cpu() for e in events]
    return {"tokens": tokens.reshape(-1).cpu(), "top1": torch.stack([idx[:, 0] for idx in topk], dim=1),
            "topk": topk, "probs": probs}

# ---------------------------------------------------------------------------------------------
# routing entropy and load (4.1, 7.3)


def expert_loads(selections, n_experts: int) -> list[list[float]]:
    """Per layer, the share of selections that went to each expert (sums to 1).

    `selections` is top1 [N, L] (one column per layer) or a list with one [N, k] per layer.
    """
    layers = list(selections) if isinstance(selections, (list, tuple)) else list(as_numpy(selections).T)
    return [selection_shares(ids, n_experts).tolist() for ids in layers]


def expert_usage_entropy(top1, n_experts: int) -> list[float]:
    """Per layer, the entropy in bits of the marginal top-1 expert usage (spec 4.1 a).

    A load-balance view: log2(n_experts) when every expert is used equally, 0 on collapse.
    """
    return [entropy_bits(np.array(load)) for load in expert_loads(top1, n_experts)]


def token_routing_entropy(probs: list) -> list[float]:
    """Per layer, the mean over tokens of the router distribution's entropy in bits (spec 4.1 b).

    A confidence view: 0 for one-hot routing, log2(E) for uniform. Raises ValueError for a layer
    without probabilities (hash routing).
    """
    out = []
    for layer, p in enumerate(probs):
        p = _require_probs(p, layer)
        out.append(-torch.special.xlogy(p, p).sum(dim=-1).mean().item() / math.log(2) + 0.0)
    return out

# ---------------------------------------------------------------------------------------------
# path concentration (4.2, 4.3)


def path_statistics(top1, coverage=(10, 100, 1000)) -> dict:
    """How concentrated the top-1 paths are (spec 4.2, 4.3).

    Returns {"tokens": N, "unique_paths", "path_entropy_bits" (plug-in, bounded by log2 N and
    biased low when most paths are singletons, so compare models at equal N),
    "path_entropy_mm_bits" (Miller-Madow corrected), "entropy_bound_bits" (log2 N),
    "effective_paths" (2^H), "singleton_fraction" (of distinct paths, seen once),
    "coverage": {K: fraction of tokens on the K most frequent paths}}.
    """
    counts = _path_counts(top1)
    n, unique = int(counts.sum()), len(counts)
    h = entropy_bits(counts)
    cumulative = np.cumsum(counts) / n
    return {"tokens": n, "unique_paths": unique, "path_entropy_bits": h,
            "path_entropy_mm_bits": h + (unique - 1) / (2 * n * math.log(2)),
            "entropy_bound_bits": math.log2(n), "effective_paths": 2.0 ** h,
            "singleton_fraction": float((counts == 1).mean()),
            "coverage": {k: float(cumulative[min(k, unique) - 1]) for k in coverage}}


def unique_paths_curve(top1, points) -> list[tuple[int, int]]:
    """(n, distinct paths among the first n tokens) for each n in points (spec 4.3).

    Monotone in n; at n = N it equals path_statistics' unique_paths.
    """
    ids = _path_ids(top1)
    if any(n < 0 or n > len(ids) for n in points):
        raise ValueError(f"points must lie in [0, {len(ids)}], got {list(points)}")
    _, first_seen = np.unique(ids, return_index=True)
    first_seen.sort()
    return [(int(n), int(np.searchsorted(first_seen, n))) for n in points]


def check_block(block: int, n_layers: int) -> None:
    """Blocks of `block` consecutive layers must tile the model's layers exactly."""
    if block < 1 or n_layers % block:
        raise ValueError(f"block={block} does not divide the {n_layers} layers")


def block_path_entropy(top1, block: int) -> list[float]:
    """Entropy in bits of the sub-path over each block of `block` consecutive layers (spec 4.2).

    Far less saturated than the full path's entropy (E^block possible sub-paths); with
    block = L it is the full path entropy.
    """
    top1 = as_numpy(top1)
    n_layers = top1.shape[1]
    check_block(block, n_layers)
    return [entropy_bits(_path_counts(top1[:, start:start + block])) for start in range(0, n_layers, block)]

# ---------------------------------------------------------------------------------------------
# cross-layer consistency (4.4)


def contingency(a, b, size: int) -> np.ndarray:
    """C[i, j] = number of tokens with label i in `a` and label j in `b`, labels in [0, size): [size, size].
    For two layers' top-1 experts, C counts the tokens going from expert i to expert j."""
    a, b = as_numpy(a).astype(np.int64), as_numpy(b).astype(np.int64)
    return np.bincount(a * size + b, minlength=size * size).reshape(size, size)


def normalized_mutual_information(counts: np.ndarray) -> float:
    """2 I(X; Y) / (H(X) + H(Y)) of a contingency table; 1.0 when both variables are constant."""
    h_x, h_y = entropy_bits(counts.sum(axis=1)), entropy_bits(counts.sum(axis=0))
    if h_x + h_y == 0:
        return 1.0
    mutual = h_x + h_y - entropy_bits(counts.reshape(-1))
    return float(np.clip(2 * mutual / (h_x + h_y), 0.0, 1.0))


def aligned_agreement(counts: np.ndarray) -> float:
    """Agreement after the best one-to-one relabelling of the second variable (Hungarian)."""
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / counts.sum())


def consecutive_agreement(top1, n_experts: int) -> list[dict]:
    """Top-1 consistency of each pair of consecutive layers (spec 4.4).

    Per pair: {"layers": (l, l+1), "agreement": share of tokens with e_l == e_{l+1} (index-based,
    meaningful only under a shared router), "nmi": normalised mutual information of e_l and
    e_{l+1}, "aligned_agreement": agreement after the best one-to-one relabelling of layer l+1's
    experts}. nmi and aligned_agreement are invariant to relabelling the experts of either layer.
    """
    top1 = as_numpy(top1)
    rows = []
    for layer in range(top1.shape[1] - 1):
        counts = contingency(top1[:, layer], top1[:, layer + 1], n_experts)
        rows.append({"layers": (layer, layer + 1), "agreement": float(np.trace(counts) / counts.sum()),
                     "nmi": normalized_mutual_information(counts), "aligned_agreement": aligned_agreement(counts)})
    return rows


def consecutive_jaccard(topk: list) -> list[float]:
    """Per pair of consecutive layers, the mean Jaccard of the tokens' top-k expert sets (spec 4.4).

    The PathMoE v1 measure (paper: 79% PathB4 vs 48% Indep); index-based, so see the caveat in
    the module docstring. Two uniformly random k-sets of E experts overlap by 0.158 on average at E = 16,
    k = 4 (k / (2E - k) = 0.143 is the ratio of the expected intersection to the expected union).
    """
    sets = [torch.as_tensor(s) for s in topk]
    return [set_jaccard(a, b).mean().item() for a, b in zip(sets, sets[1:])]


def consecutive_correlation(probs: list) -> list[float]:
    """Per pair of consecutive layers, the mean over tokens of the Pearson correlation of p_l and p_l+1 (spec 4.4).

    The correlation runs over the E experts of one token; a token whose distribution is uniform in
    either layer counts as 0. Index-based, like consecutive_jaccard (see the module docstring).
    """
    centred = []
    for layer, p in enumerate(probs):
        p = _require_probs(p, layer)
        centred.append(p - p.mean(dim=-1, keepdim=True))
    return [cosine(a, b).mean().item() for a, b in zip(centred, centred[1:])]


def pair_within_block(layer: int, block: int) -> bool:
    """Whether layers (layer, layer + 1) lie in one block of `block` consecutive layers (blocks start at layer 0)."""
    return bool((layer + 1) % block)


def split_by_block(per_pair: list[float], block: int) -> dict:
    """Means of a per-pair measure over the pairs inside a block and those straddling a block boundary (spec 4.4).

    per_pair[l] belongs to layers (l, l+1), as consecutive_* return it; a side without pairs is nan.
    """
    n_layers = len(per_pair) + 1
    check_block(block, n_layers)
    within = [v for layer, v in enumerate(per_pair) if pair_within_block(layer, block)]
    across = [v for layer, v in enumerate(per_pair) if not pair_within_block(layer, block)]
    return {"within_block": float(np.mean(within)) if within else math.nan,
            "across_blocks": float(np.mean(across)) if across else math.nan}


def consecutive_pairs(record: dict, n_experts: int, block: int) -> list[dict]:
    """Per pair of consecutive layers of a routing_record: {"pair": "l-(l+1)", "within_block" (of `block`
    layers), "jaccard" of the top-k sets, "nmi" and "aligned_agreement" of the top-1 experts}."""
    check_block(block, record["top1"].shape[1])
    agree = consecutive_agreement(record["top1"], n_experts)
    return [{"pair": f"{a['layers'][0]}-{a['layers'][1]}", "within_block": pair_within_block(a["layers"][0], block),
             "jaccard": j, "nmi": a["nmi"], "aligned_agreement": a["aligned_agreement"]}
            for a, j in zip(agree, consecutive_jaccard(record["topk"]))]


def record_summary(record: dict, n_experts: int, block: int) -> dict:
    """One model's path statistics from its routing_record, each averaged over layers or layer pairs: expert-usage
    and token-routing entropy, full-path and block-path entropy (blocks of `block` layers), effective and unique
    paths, the share of tokens on the 100 most common paths, consecutive-layer agreement (Jaccard, by index,
    NMI, aligned), and the load balance (CV, share of dead experts)."""
    top1 = record["top1"]
    path = path_statistics(top1)
    agree = consecutive_agreement(top1, n_experts)
    loads = [load_statistics(share, n_experts) for share in expert_loads(record["topk"], n_experts)]
    return {"usage_entropy_bits": np.mean(expert_usage_entropy(top1, n_experts)),
            "token_entropy_bits": np.mean(token_routing_entropy(record["probs"])),
            "path_entropy_bits": path["path_entropy_bits"], "effective_paths": path["effective_paths"],
            "block_path_entropy_bits": np.mean(block_path_entropy(top1, block)),
            "unique_paths": path["unique_paths"], "coverage_top100": path["coverage"][100],
            "jaccard": np.mean(consecutive_jaccard(record["topk"])),
            "agreement": np.mean([a["agreement"] for a in agree]), "nmi": np.mean([a["nmi"] for a in agree]),
            "aligned_agreement": np.mean([a["aligned_agreement"] for a in agree]),
            "load_cv": np.mean([s["cv"] for s in loads]), "dead_frac": np.mean([s["dead_frac"] for s in loads])}


def aligned_labels(top1, n_experts: int) -> np.ndarray:
    """top1 [N, L] with each layer's expert ids renamed, layer after layer, by the one-to-one renaming that
    best matches the previous (renamed) layer (Hungarian on their co-occurrence counts). Run lengths of the
    result are permutation-invariant: a router that merely shares labels across layers gains nothing."""
    top1 = as_numpy(top1).astype(np.int64)
    for layer in range(1, top1.shape[1]):
        rows, cols = linear_sum_assignment(contingency(top1[:, layer - 1], top1[:, layer], n_experts), maximize=True)
        rename = np.empty(n_experts, dtype=np.int64)
        rename[cols] = rows
        top1[:, layer] = rename[top1[:, layer]]
    return top1


def _runs(top1) -> tuple[np.ndarray, np.ndarray]:
    """Every maximal run of one top-1 expert over consecutive layers: (the run's token, its length)."""
    top1 = as_numpy(top1)
    n, n_layers = top1.shape
    tokens, lengths = [], []
    run = np.ones(n, dtype=np.int64)
    for layer in range(1, n_layers + 1):
        ends = np.ones(n, dtype=bool) if layer == n_layers else top1[:, layer] != top1[:, layer - 1]
        tokens.append(np.flatnonzero(ends))
        lengths.append(run[ends])
        run = np.where(ends, 1, run + 1)
    return np.concatenate(tokens), np.concatenate(lengths)


def run_length_histogram(top1) -> list[int]:
    """h[i] = number of runs of i + 1 consecutive layers keeping one top-1 expert, for i < L (spec 4.4).

    A token whose path is (3, 3, 5, 5, 5) has one run of 2 and one of 3; each token's runs sum to L.
    """
    _, lengths = _runs(top1)
    return np.bincount(lengths, minlength=as_numpy(top1).shape[1] + 1)[1:].tolist()


def sustained_engagement(top1, min_run: int = 4) -> float:
    """Share of tokens that keep one top-1 expert through >= min_run consecutive layers (spec 4.4). Index-based:
    pass aligned_labels(top1, E) to compare models whose layers do not share expert labels."""
    tokens, lengths = _runs(top1)
    return len(np.unique(tokens[lengths >= min_run])) / as_numpy(top1).shape[0]

# ---------------------------------------------------------------------------------------------
# paths and linguistic function (4.5)


FUNCTION_WORDS = frozenset(
    "a an the and or but nor if as of in on at to by for from with into about than that this these those "
    "it its he she they we you i his her their our my your is was are were be been has have had do does "
    "did not no so which who whom whose what when where".split())


def token_class(text: str) -> str:
    """Coarse linguistic class of a decoded token, standing in for POS tags (spec 4.5).

    "punctuation" (no letter or digit: also whitespace and special tokens), "digit" (starts with
    one), "function" (a word of FUNCTION_WORDS, any case), "capitalised" or "word" (the rest,
    subword pieces included). Surrounding whitespace (BPE's leading space) is ignored.
    """
    word = text.strip()
    if not any(c.isalnum() for c in word):
        return "punctuation"
    if word[0].isdigit():
        return "digit"
    if word.lower() in FUNCTION_WORDS:
        return "function"
    return "capitalised" if word[0].isupper() else "word"


def top_path_labels(top1, m: int) -> np.ndarray:
    """Per token, its path's rank among the m most frequent paths (0 = most frequent), or m ("rest"): [N].

    Paths of equal frequency rank in a fixed, arbitrary order.
    """
    ids = _path_ids(top1)
    counts = np.bincount(ids)
    ranked = np.argsort(-counts, kind="stable")[:m]
    rank = np.full(len(counts), m)
    rank[ranked] = np.arange(len(ranked))
    return rank[ids]


def path_class_alignment(top1, classes, m: int, seed: int = 0) -> dict:
    """How well the m most frequent paths (the rest pooled) sort tokens by class (spec 4.5, claim C8).

    Returns {"purity": sum over path-IDs of the largest class count / N, "nmi": NMI(path-ID; class),
    "nmi_shuffled": the same with the classes randomly permuted over tokens (a chance level),
    "majority_class": the purity of one single path-ID, "rest_fraction": tokens pooled as rest}.
    """
    labels = top_path_labels(top1, m)
    class_names, class_ids = np.unique(np.asarray(classes), return_inverse=True)
    size = max(m + 1, len(class_names))
    counts = contingency(labels, class_ids, size)
    shuffled = contingency(labels, np.random.default_rng(seed).permutation(class_ids), size)
    n = counts.sum()
    return {"purity": float(counts.max(axis=1).sum() / n), "nmi": normalized_mutual_information(counts),
            "nmi_shuffled": normalized_mutual_information(shuffled),
            "majority_class": float(counts.sum(axis=0).max() / n), "rest_fraction": float(np.mean(labels == m))}


def top_tokens_per_path(top1, tokens, m: int, n_top: int = 10) -> list[dict]:
    """The m most frequent paths, each with its most frequent token ids, for qualitative reading (spec 4.5).

    One row per path, most frequent first: {"path": tuple of experts, "tokens": count,
    "top": [(token id, count), ...] (at most n_top, most frequent first)}.
    """
    top1, tokens = as_numpy(top1), as_numpy(tokens).reshape(-1)
    labels = top_path_labels(top1, m)
    rows = []
    for rank in range(min(m, labels.max(initial=-1) + 1)):
        on_path = labels == rank
        ids, counts = np.unique(tokens[on_path], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:n_top]
        rows.append({"path": tuple(int(e) for e in top1[np.argmax(on_path)]), "tokens": int(on_path.sum()),
                     "top": [(int(ids[i]), int(counts[i])) for i in order]})
    return rows

# ---------------------------------------------------------------------------------------------
# robustness to routing perturbations (4.6)


def expert_permutations(n_layers: int, n_experts: int, seed: int = 0, layers=None) -> list[torch.Tensor]:
    """One random permutation of the expert ids per layer; identity outside `layers` (None: all).

    Every layer's permutation is drawn in order from one seeded generator, so layer l gets the
    same permutation whichever other layers are shuffled.
    """
    g = torch.Generator().manual_seed(seed)
    perms = [torch.randperm(n_experts, generator=g) for _ in range(n_layers)]
    chosen = range(n_layers) if layers is None else set(layers)
    return [perm if layer in chosen else torch.arange(n_experts) for layer, perm in enumerate(perms)]


def token_permutations(n_tokens: int, n_layers: int, n_experts: int, rho: float, seed: int = 0) -> list[torch.Tensor]:
    """Per layer a [n_tokens, E] table permuting the expert ids of a random share rho of the tokens (spec 4.6 iii).

    round(rho * n_tokens) positions, the same at every layer, get that layer's permutation from
    expert_permutations(seed); the other rows are the identity.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho={rho}: the share of tokens shuffled must lie in [0, 1]")
    chosen = torch.randperm(n_tokens, generator=torch.Generator().manual_seed(seed))[:round(rho * n_tokens)]
    tables = []
    for perm in expert_permutations(n_layers, n_experts, seed):
        table = torch.arange(n_experts).repeat(n_tokens, 1)
        table[chosen] = perm
        tables.append(table)
    return tables


def shuffle_robustness(model: MoETransformer, batches, device: torch.device, seed: int = 0, layers=None,
                       precision: str = "auto", draws: int = 1) -> dict:
    """Perplexity clean vs with expert ids permuted at every layer, or only at `layers` (spec 4.6 i).

    The routing decision is kept (same gates), but expert id e is served by expert perm[e]. With
    draws > 1 the permutations of seeds seed, seed + 1, ... are each evaluated (spec 4.6: 5 seeds).
    Returns {"clean_ppl", "shuffled_ppl" and "increase_pct" = 100 (shuffled / clean - 1), both means
    over the draws, "increase_std" (over the draws; nan for one), "layers"} (paper: +237% PathB4 vs
    +5328% Indep).
    """
    require_moe(model, "shuffle_robustness")
    if draws < 1:
        raise ValueError(f"draws={draws}: need at least one draw of permutations")
    n_layers = model.cfg.n_layers
    clean = perplexity(model, batches, device, precision)
    shuffled = [perplexity(model, batches, device, precision, Interventions(
        expert_permutation=expert_permutations(n_layers, model.cfg.n_experts, seed + draw, layers)))
        for draw in range(draws)]
    increases = [pct_change(s, clean) for s in shuffled]
    return {"clean_ppl": clean, "shuffled_ppl": float(np.mean(shuffled)), "increase_pct": float(np.mean(increases)),
            "increase_std": float(np.std(increases, ddof=1)) if draws > 1 else math.nan,
            "layers": list(range(n_layers)) if layers is None else sorted(layers)}


def single_layer_shuffle(model: MoETransformer, batches, device: torch.device, seed: int = 0,
                         precision: str = "auto") -> dict:
    """Delta-PPL% with the expert ids of one layer at a time permuted, and its mean over layers (spec 4.6 i').

    Returns {"clean_ppl", "per_layer_pct": one Delta-PPL% per layer, "increase_pct": their mean}.
    """
    require_moe(model, "single_layer_shuffle")
    n_layers, n_experts = model.cfg.n_layers, model.cfg.n_experts
    clean = perplexity(model, batches, device, precision)
    per_layer = []
    for layer in range(n_layers):
        iv = Interventions(expert_permutation=expert_permutations(n_layers, n_experts, seed, [layer]))
        per_layer.append(pct_change(perplexity(model, batches, device, precision, iv), clean))
    return {"clean_ppl": clean, "per_layer_pct": per_layer, "increase_pct": float(np.mean(per_layer))}


def token_fraction_shuffle(model: MoETransformer, batches, device: torch.device, rhos, seed: int = 0,
                           precision: str = "auto") -> list[dict]:
    """Delta-PPL% when a random share rho of the tokens have their expert ids permuted at every layer (spec 4.6 iii).

    The tokens are positions in a [B, T] batch, so every batch must have the same shape; rho = 1
    is shuffle_robustness over all layers. One row per rho: {"rho", "clean_ppl", "ppl", "increase_pct"}.
    """
    require_moe(model, "token_fraction_shuffle")
    n_tokens = batches[0][0].numel()
    clean = perplexity(model, batches, device, precision)
    rows = []
    for rho in rhos:
        tables = token_permutations(n_tokens, model.cfg.n_layers, model.cfg.n_experts, rho, seed)
        ppl = perplexity(model, batches, device, precision, Interventions(expert_permutation=tables))
        rows.append({"rho": rho, "clean_ppl": clean, "ppl": ppl, "increase_pct": pct_change(ppl, clean)})
    return rows


def router_noise_robustness(model: MoETransformer, batches, device: torch.device, sigmas, seed: int = 0,
                            precision: str = "auto") -> list[dict]:
    """Top-k overlap and Delta-PPL% under Gaussian noise on the router input at relative scale sigma (spec 4.6 ii).

    Every router sees h + eps * sigma * ||h|| / sqrt(d); experts still see h. One row per sigma:
    {"sigma", "jaccard": mean over tokens and layers of Jaccard(S_clean, S_noisy) of the top-k
    sets (batches of equal shape), "clean_ppl", "ppl", "increase_pct"}. The noise is drawn from
    `seed`, leaving torch's global generator as it was. The overlap and the PPL come from two passes with
    their own noise draws (the PPL pass continues the generator): the overlap from `routing_record`, without
    autocast, the PPL from `evaluate` in `precision` (bf16 on CUDA under "auto").
    """
    require_moe(model, "router_noise_robustness")
    clean_sets = [routing_record(model, x)["topk"] for x, _ in batches]
    clean = perplexity(model, batches, device, precision)
    rows = []
    for sigma in sigmas:
        iv = Interventions(router_noise=sigma)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            noisy_sets = [routing_record(model, x, iv)["topk"] for x, _ in batches]
            ppl = perplexity(model, batches, device, precision, iv)
        jaccard = np.mean([set_jaccard(a, b).mean().item() for clean_batch, noisy_batch in zip(clean_sets, noisy_sets)
                           for a, b in zip(clean_batch, noisy_batch)])
        rows.append({"sigma": sigma, "jaccard": float(jaccard), "clean_ppl": clean, "ppl": ppl,
                     "increase_pct": pct_change(ppl, clean)})
    return rows
