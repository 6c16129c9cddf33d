"""Expert utilisation and load balance from a run's routing telemetry (no model needed)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file


def as_numpy(x) -> np.ndarray:
    """A CPU numpy copy of a tensor or array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def selection_shares(ids, n_experts: int) -> np.ndarray:
    """The share of the selections `ids` (any shape, ids in [0, n_experts)) each expert received: [n_experts]."""
    ids = as_numpy(ids).reshape(-1)
    counts = np.bincount(ids.astype(np.int64), minlength=n_experts)
    if counts.shape[0] > n_experts:
        raise ValueError(f"expert id {ids.max()} is out of range for n_experts={n_experts}")
    return counts / counts.sum()


def entropy_bits(counts) -> float:
    """Plug-in entropy in bits of the distribution given by non-negative counts or shares (zeros ignored)."""
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def run_expert_loads(run: str | Path, n_experts: int) -> dict[tuple[int, int], np.ndarray]:
    """(layer, hop) -> share of selections each of the M experts received on the telemetry slice."""
    telemetry = load_file(Path(run) / "telemetry.safetensors")
    return {tuple(int(part.removeprefix("layer").removeprefix("hop")) for part in key.split(".")[1:]):
            selection_shares(ids, n_experts) for key, ids in telemetry.items() if key.startswith("ids.")}


def ranked_loads(shares) -> np.ndarray:
    """The mean load profile of several routing events: each event's shares sorted, most used first, then
    averaged by rank. Expert ids mean nothing across independently parameterised layers, so averaging
    by id first would flatten the profile of every model whose layers do not share labels."""
    return np.mean([np.sort(np.asarray(s, dtype=np.float64))[::-1] for s in shares], axis=0)


DEAD_LOAD = 0.1  # an expert is dead when it gets less than this fraction of the uniform share 1/M


def load_statistics(share, n_experts: int) -> dict:
    """Balance of one routing event: CV of loads, max/mean, dead experts, entropy (bits and / log2 M).

    An expert is dead when it receives less than a tenth of the uniform share 1/M.
    """
    share, mean = np.asarray(share, dtype=np.float64), 1.0 / n_experts
    entropy = entropy_bits(share)
    return {"cv": float(share.std() / mean), "max_over_mean": float(share.max() / mean),
            "dead_frac": float((share < DEAD_LOAD * mean).mean()), "entropy_bits": entropy,
            "entropy_norm": entropy / math.log2(n_experts)}


def run_load_statistics(run: str | Path, n_experts: int) -> list[dict]:
    """load_statistics for every (layer, hop) of a run, as rows."""
    return [{"layer": layer, "hop": hop, **load_statistics(share, n_experts)}
            for (layer, hop), share in sorted(run_expert_loads(run, n_experts).items())]
