"""The trainer: AdamW, warmup + cosine, clipping, accumulation, evaluation, checkpoints, resume.

`train(cfg)` is idempotent: a finished run returns its stored results without training, and an
interrupted one resumes from its latest intact checkpoint and ends exactly where an
uninterrupted run would (the batch at each step is a pure function of the seed).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import store
from .config import ConfigError, RunConfig, TrainConfig, validate
from .data import TrainStream, prepare_data, val_batches
from .evaluate import autocast_for, evaluate, resolve_device, routing_telemetry
from .model import MoETransformer
from .params import count_parameters
from .routing import router_z_loss, switch_balance_loss
from .trajectory import HopEvent


def default_run_root() -> Path:
    return Path(os.environ.get("MOE_CORE_RUNS", "runs"))


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOE_CORE_CACHE", ".cache/moe_core"))


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to t.lr, then cosine decay to t.lr * t.min_lr_ratio at the last step."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, t: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms, scalars and the (re-normalised) router centroids."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim < 2 or name.endswith(("centroids", "kinematic"))
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=device.type == "cuda")


def auxiliary_loss(events: list[HopEvent], cfg: RunConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance loss, z-loss) over the routing events that have probabilities."""
    t, n_experts = cfg.train, cfg.model.n_experts
    scored = [e for e in events if e.routing.probs is not None]
    zero = torch.zeros(())
    if not scored:
        return zero, zero
    if t.balance_events == "per_layer":
        groups: dict[int, list] = {}
        for e in scored:
            groups.setdefault(e.layer, []).append(e.routing)
        pools = list(groups.values())
    else:
        pools = [[e.routing] for e in scored]
    terms = torch.stack([switch_balance_loss(pool, n_experts, t.balance_tokens) for pool in pools])
    balance = terms.mean() if t.balance_reduce == "mean" else terms.sum()
    z = torch.stack([router_z_loss(e.routing) for e in scored]).mean() if t.z_loss_coef else zero
    return balance, z


class Trainer:
    """One run: its data, model, optimizer and run directory."""

    def __init__(self, cfg: RunConfig, run_root: Path, cache_dir: Path, progress: bool = True):
        self.cfg, self.progress = validate(cfg), progress
        self.run = store.run_dir(cfg, run_root)
        self.device = resolve_device(cfg.train.device)
        t = cfg.train
        self.data = prepare_data(cfg.data.corpus, cfg.data.vocab_size, cache_dir)
        self.stream = TrainStream(self.data.train, t.seq_len, t.batch_size, cfg.seed, t.accum_steps)
        try:
            self.val = val_batches(self.data.validation, t.seq_len, t.eval_batch_size, t.eval_batches)
        except ValueError as e:  # the corpus decides how many validation batches exist
            raise ConfigError("train.eval_batches", t.eval_batches, str(e)) from e
        torch.manual_seed(cfg.seed)
        self.model = MoETransformer(cfg.model).to(self.device)
        self.optimizer = make_optimizer(self.model, t, self.device)
        self.step_fn = torch.compile(self.model) if t.compile else self.model
        self.train_seconds = 0.0

    def log(self, record: dict) -> None:
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def resume(self) -> int:
        """Load the latest intact checkpoint; drop metrics logged after it. Returns its step."""
        found = store.latest_checkpoint(self.run)
        if found is None:
            (self.run / "metrics.jsonl").unlink(missing_ok=True)
            return 0
        meta, tensors = found
        store.restore_checkpoint(meta, tensors, self.model, self.optimizer)
        self.train_seconds = meta["train_seconds"]
        path = self.run / "metrics.jsonl"
        if path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= meta["step"]]
            store.atomic_write(path, lambda tmp: Path(tmp).write_text("".join(f"{k}\n" for k in kept)))
        return meta["step"]

    def checkpoint(self, step: int) -> None:
        store.save_checkpoint(self.run, step, self.model, self.optimizer, {"train_seconds": self.train_seconds})

    def train_step(self, step: int) -> dict:
        t, cfg = self.cfg.train, self.cfg
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ce_sum, balance_sum = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        for micro in range(t.accum_steps):
            x, y = self.stream.batch(step, micro)
            with autocast_for(self.device, t.precision):
                out = self.step_fn(x.to(self.device), y.to(self.device))
                balance, z = auxiliary_loss(out.events, cfg)
                loss = out.loss + t.balance_coef * balance.to(self.device) + t.z_loss_coef * z.to(self.device)
            (loss / t.accum_steps).backward()
            ce_sum += out.loss.detach()
            balance_sum += balance.detach().to(self.device)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip if t.grad_clip else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        stats = {"loss": ce_sum / t.accum_steps, "balance": balance_sum / t.accum_steps, "grad_norm": grad_norm, "lr": lr}
        if self.model.alpha is not None:  # the Magnitude Hack's scalar, for its trajectory
            stats["alpha"] = self.model.alpha.detach().mean()
        return stats

    def fit(self, stop_at: int | None = None) -> dict | None:
        """Train to the end (or to `stop_at`, leaving a checkpoint). Returns results when finished."""
        t, cfg = self.cfg.train, self.cfg
        self.run.mkdir(parents=True, exist_ok=True)
        store.write_json(self.run / "config.json", {"config": cfg.to_dict(), "versions": store.code_versions()})
        start = self.resume()
        self.model.train()
        log_every = max(1, t.steps // 200)
        bar = tqdm(total=t.steps, initial=start, disable=not self.progress, unit="step", file=sys.stderr,
                   desc=f"{cfg.variant}/{cfg.profile}/s{cfg.seed}", dynamic_ncols=True, mininterval=1.0)
        tokens_done, tick = 0, time.perf_counter()
        try:
            for step in range(start, t.steps):
                if stop_at is not None and step >= stop_at:
                    self.checkpoint(step)
                    return None
                stats = self.train_step(step)
                tokens_done += t.tokens_per_step
                done = step + 1
                if done % log_every == 0 or done == t.steps:
                    now = time.perf_counter()
                    self.train_seconds += now - tick
                    record = {"step": done, **{k: float(v) for k, v in stats.items()},
                              "tokens_per_s": tokens_done / (now - tick), "train_seconds": self.train_seconds}
                    if not math.isfinite(record["loss"]):
                        store.write_json(self.run / "status.json", {"state": "failed", "step": done,
                                                                    "reason": "non-finite loss"})
                        raise FloatingPointError(f"loss became {record['loss']} at step {done}; the last good "
                                                 f"checkpoint is kept in {self.run}")
                    self.log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{math.exp(min(record['loss'], 50)):.1f}",
                                    tok_s=f"{record['tokens_per_s']:.0f}")
                    tokens_done, tick = 0, time.perf_counter()
                if done % t.eval_every == 0 and done < t.steps:
                    result = evaluate(self.model, self.val, self.device, t.precision)
                    self.log({"step": done, "val_loss": result["val_loss"], "val_ppl": result["val_ppl"]})
                    bar.write(f"step {done}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}")
                    tick = time.perf_counter()
                if done % t.checkpoint_every == 0 and done < t.steps:
                    self.checkpoint(done)
                    tick = time.perf_counter()
                bar.update(1)
        finally:
            bar.close()
        return self.finish()

    def finish(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        final = evaluate(self.model, self.val, self.device, t.precision)
        self.log({"step": t.steps, "val_loss": final["val_loss"], "val_ppl": final["val_ppl"]})
        store.write_json(self.run / "val_batch_losses.json", final["batch_losses"])
        if cfg.model.ffn == "moe" and t.telemetry_seqs:
            seqs = val_batches(self.data.validation, t.seq_len, t.telemetry_seqs, 1)[0][0]
            store.write_tensors(self.run / "telemetry.safetensors",
                                routing_telemetry(self.model, seqs, self.device, t.precision))
        store.write_tensors(self.run / "final.safetensors", self.model.state_dict())
        params = count_parameters(cfg.model)
        results = {
            "run_dir": str(self.run), "variant": cfg.variant, "profile": cfg.profile, "seed": cfg.seed,
            "val_loss": final["val_loss"], "val_ppl": final["val_ppl"], "steps": t.steps,
            "tokens": t.steps * t.tokens_per_step, "train_seconds": self.train_seconds,
            "tokens_per_s": t.steps * t.tokens_per_step / max(self.train_seconds, 1e-9),
            "params_total": params["total"], "params_routing": params["routing"],
            "device": str(self.device), "versions": store.code_versions(),
        }
        for old in self.run.glob("ckpt-*"):
            old.unlink()
        store.write_json(self.run / "status.json", {"state": "finished", "step": t.steps})
        store.write_json(self.run / "results.json", results)
        return results


def train(cfg: RunConfig, run_root: str | Path | None = None, cache_dir: str | Path | None = None,
          progress: bool = True, stop_at: int | None = None) -> dict | None:
    """Train `cfg` (or return its stored results with cached=True). `stop_at` pauses at a step."""
    run_root = Path(run_root) if run_root else default_run_root()
    done = store.run_dir(validate(cfg), run_root) / "results.json"
    if done.exists():
        return {**store.read_json(done), "cached": True}
    trainer = Trainer(cfg, run_root, Path(cache_dir) if cache_dir else default_cache_dir(), progress)
    results = trainer.fit(stop_at=stop_at)
    return None if results is None else {**results, "cached": False}
