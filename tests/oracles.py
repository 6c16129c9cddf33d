"""Slow, obviously correct references that more than one test module checks fast paths against."""
import torch

from moe_core.routing import ordered_int32


def reference_top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The top-k kernels' contract, spelled out: rank by the int32 keys (NaN above all), largest first, ties
    to the lower column (a stable sort keeps column order among equal keys)."""
    keys = ordered_int32(scores).masked_fill(scores.isnan(), torch.iinfo(torch.int32).max)
    return keys.sort(dim=-1, descending=True, stable=True).indices[..., :k]
