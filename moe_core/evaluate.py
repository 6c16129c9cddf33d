"""Evaluation: per-batch validation losses, perplexity, routing telemetry, loading stored runs."""
from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from .config import RunConfig
from .model import MoETransformer
from .trajectory import Interventions


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but torch.cuda.is_available() is False")
    return torch.device(name)


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast on CUDA ('auto' or 'bf16'); fp32 on other devices unless bf16 is asked for explicitly
    ('auto' stays fp32 there: bf16 is very slow on CPUs without bf16 instructions)."""
    if device.type == "cuda" and precision in ("auto", "bf16"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def matmul_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype matmuls run in under `autocast_for(device, precision)`: what an MFU peak is measured in."""
    with autocast_for(device, precision):
        return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else torch.float32


@contextlib.contextmanager
def inference(model: MoETransformer):
    """Eval mode without autograd for the duration; the caller's train/eval mode is restored, even on error."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def evaluate(model: MoETransformer, batches, device: torch.device, precision: str = "auto",
             iv: Interventions | None = None) -> dict:
    """Mean cross-entropy of each batch, their mean, perplexity, and mean hops executed."""
    losses, hops = [], []
    with inference(model):
        for x, y in batches:
            with autocast_for(device, precision):
                out = model(x.to(device), y.to(device), iv)
            losses.append(out.loss.item())
            if out.hops is not None:
                hops.append(out.hops.float().mean(dim=(1, 2)))  # per layer
    loss = sum(losses) / len(losses)
    result = {"val_loss": loss, "val_ppl": math.exp(loss), "batch_losses": losses}
    if hops:
        per_layer = torch.stack(hops).mean(dim=0)
        result["hops_per_layer"] = per_layer.tolist()
        result["mean_hops"] = per_layer.mean().item()
    return result


def routing_telemetry(model: MoETransformer, tokens: torch.Tensor, device: torch.device,
                      precision: str = "auto") -> dict[str, torch.Tensor]:
    """The routing of a fixed batch of sequences [S, T]: the token ids, and the selected expert ids and their
    weights for every (layer, hop). Only the ids enter the book (expert loads); the rest is kept for users."""
    with inference(model), autocast_for(device, precision):
        out = model(tokens.to(device))
    record = {"tokens": tokens.cpu()}
    for event in out.events:
        record[f"ids.layer{event.layer}.hop{event.hop}"] = event.routing.idx.to(torch.int32).cpu()
        record[f"weights.layer{event.layer}.hop{event.hop}"] = event.routing.weights.float().cpu()
    return record


def load_model(run: str | Path, device: str = "cpu") -> tuple[MoETransformer, RunConfig]:
    """The final model of a finished run, in eval mode."""
    from .store import load_config

    run = Path(run)
    cfg = load_config(run)
    model = MoETransformer(cfg.model)
    model.load_state_dict(load_file(run / "final.safetensors"))
    return model.to(resolve_device(device)).eval(), cfg
