"""Parameter counts by component, computed from a model built on the meta device (no memory)."""
from __future__ import annotations

import torch

from .config import ModelConfig
from .model import MoETransformer

GROUPS = (  # (group, name prefix) in match order
    ("routing", "routers."),
    ("experts", ".ffn.experts."),
    ("dense_ffn", ".ffn."),
    ("attention", ".attn."),
    ("embedding", "embed."),
    ("norms", "ln"),
)


def _group(name: str) -> str:
    for group, prefix in GROUPS:
        if name.startswith(prefix) or prefix in name:
            return group
    return "other"  # e.g. the Magnitude Hack's alpha


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    """Total, trainable and per-group parameter counts (tied embedding counted once)."""
    with torch.device("meta"):
        model = MoETransformer(cfg)
    counts = {"total": 0, "trainable": 0, **{g: 0 for g, _ in GROUPS}, "other": 0}
    for name, p in model.named_parameters():
        counts["total"] += p.numel()
        counts["trainable"] += p.numel() if p.requires_grad else 0
        counts[_group(name)] += p.numel()
    return counts
