"""What the analyses share: the MoE check, a traced forward pass and perplexity under an intervention."""
from __future__ import annotations

import torch

from ..evaluate import evaluate, inference
from ..model import ModelOutput, MoETransformer
from ..trajectory import Interventions


def require_moe(model: MoETransformer, what: str) -> None:
    """Refuse a dense model in an analysis of routing or experts, naming the analysis."""
    if model.cfg.ffn != "moe":
        raise ValueError(f"{what} needs an MoE model; this one has dense FFNs")


def traced_forward(model: MoETransformer, tokens: torch.Tensor, iv: Interventions) -> ModelOutput:
    """One eval-mode, no-grad forward pass of `tokens` [B, T] on the model's device, with its hop events."""
    with inference(model):
        return model(tokens.to(model.embed.weight.device), iv=iv)


def perplexity(model: MoETransformer, batches, device: torch.device, precision: str,
               iv: Interventions | None = None) -> float:
    """Validation perplexity over `batches`, under the interventions `iv` (None: the model as trained)."""
    return evaluate(model, batches, device, precision, iv)["val_ppl"]
