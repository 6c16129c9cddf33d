"""Expert utilisation and load balance from a run's routing telemetry (no model needed)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file


def expert_loads(run: str | Path, n_experts: int) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, hop) -> share of selections each of the M experts received on the telemetry slice."""
    telemetry = load_file(Path(run) / "telemetry.safetensors")
    loads = {}
    for key, ids in telemetry.items():
        if key.startswith("ids."):
            layer, hop = (int(part.removeprefix("layer").removeprefix("hop")) for part in key.split(".")[1:])
            counts = torch.bincount(ids.long().flatten(), minlength=n_experts).double()
            loads[(layer, hop)] = counts / counts.sum()
    return loads


def load_statistics(share: torch.Tensor, n_experts: int) -> dict:
    """Balance of one routing event: CV of loads, max/mean, dead experts, entropy (bits and / log2 M).

    An expert is dead when it receives less than a tenth of the uniform share 1/M.
    """
    mean = 1.0 / n_experts
    nonzero = share[share > 0]
    entropy = float(-(nonzero * nonzero.log2()).sum())
    return {"cv": float(share.std(unbiased=False) / mean), "max_over_mean": float(share.max() / mean),
            "dead_frac": float((share < 0.1 * mean).double().mean()), "entropy_bits": entropy,
            "entropy_norm": entropy / math.log2(n_experts)}


def run_load_statistics(run: str | Path, n_experts: int) -> list[dict]:
    """load_statistics for every (layer, hop) of a run, as rows."""
    return [{"layer": layer, "hop": hop, **load_statistics(share, n_experts)}
            for (layer, hop), share in sorted(expert_loads(run, n_experts).items())]
