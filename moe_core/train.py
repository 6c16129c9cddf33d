"""The trainer: AdamW, warmup + cosine, clipping, accumulation, evaluation, checkpoints, resume,
and DistributedDataParallel under torchrun.

`train(cfg)` is idempotent and crash-safe: a finished run returns its stored results without
training; a run killed at any point (SIGKILL included) resumes on the next call from its newest
intact checkpoint and ends exactly where an uninterrupted run would, because the batch and the
dropout masks of every step are pure functions of the seed and the step, and a checkpoint holds
the rest (weights, optimizer, how much of metrics.jsonl it has seen). One process at a time
trains a run (a file lock); a non-finite loss stops the run for good, recorded in status.json.

Under torchrun (WORLD_SIZE > 1) each rank takes an equal share of the same global batch a single
process would use, DDP averages the gradients, and only rank 0 writes to the run store.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import hashlib
import json
import math
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import cpu_kernels, store
from .config import ConfigError, RunConfig, TrainConfig, validate
from .data import TrainStream, count_val_batches, prepare_data, to_device, val_batches
from .evaluate import autocast_for, evaluate, matmul_dtype, resolve_device, routing_telemetry
from .model import MoETransformer
from .params import count_parameters
from .perf import matmul_peak_flops, train_flops_per_token
from .progress import progress_bar
from .routing import router_z_loss, switch_balance_loss
from .trajectory import HopEvent

TRAIN, FINISHED, FAILED = 0, 1, 2  # what rank 0 found in the run directory


class RunFailed(RuntimeError):
    """A run stopped for good (a non-finite loss); its status.json says why and where."""


RUNS_ENV, CACHE_ENV = "MOE_CORE_RUNS", "MOE_CORE_CACHE"  # where runs and the data cache go, unless a flag says


def default_run_root() -> Path:
    return Path(os.environ.get(RUNS_ENV, "runs"))


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV, ".cache/moe_core"))


def lr_at(step: int, t: TrainConfig) -> float:
    """Linear warmup to t.lr, then cosine decay that would reach t.lr * t.min_lr_ratio at step t.steps, one past
    the last step trained (steps count from 0), so the last step runs just above it."""
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
    # the fused kernel: one pass over all parameters (CPU too: 0.6 ms against 3.8 ms for the per-tensor
    # loop on the smoke dense model, benchmarks/RESULTS.md)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps,
                             fused=device.type in ("cuda", "cpu"))


def auxiliary_loss(events: list[HopEvent], cfg: RunConfig, device: torch.device,
                   groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(balance loss, z-loss) on `device` over the routing events that have probabilities; the balance loss
    is taken per micro-batch when the batch holds `groups` of them. A term that is off is a zero made on
    `device`: one made on the host and copied over would make every eager GPU step wait for the GPU."""
    t, n_experts = cfg.train, cfg.model.n_experts
    scored = [e for e in events if e.routing.probs is not None]
    zero = torch.zeros((), device=device)
    if not scored:
        return zero, zero
    if t.balance_events == "per_layer":
        by_layer: dict[int, list] = {}
        for e in scored:
            by_layer.setdefault(e.layer, []).append(e.routing)
        pools = list(by_layer.values())
    else:
        pools = [[e.routing] for e in scored]
    terms = torch.stack([switch_balance_loss(pool, n_experts, t.balance_tokens, groups) for pool in pools])
    balance = terms.mean() if t.balance_reduce == "mean" else terms.sum()
    z = torch.stack([router_z_loss(e.routing) for e in scored]).mean() if t.z_loss_coef else zero
    return balance, z


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Clip the gradients' global norm to grad_clip (0: no clipping), step, clear the gradients.
    Returns the norm before clipping (a tensor: no host sync)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class Objective(torch.nn.Module):
    """The training loss of one batch as a module, so that DDP and torch.compile see tensors only.

    Returns (loss to differentiate, detached [cross-entropy, balance loss]). The two statistics
    travel as one stacked tensor: returning a detached alias of the loss beside the loss itself
    makes torch.compile (2.13) drop the loss's graph.
    """

    def __init__(self, model: MoETransformer, cfg: RunConfig):
        super().__init__()
        self.model, self.cfg = model, cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`groups`: how many equal micro-batches x stacks (train.micro_batches = fused)."""
        t = self.cfg.train
        out = self.model(x, y)
        balance, z = auxiliary_loss(out.events, self.cfg, out.loss.device, groups)
        loss = out.loss + t.balance_coef * balance + t.z_loss_coef * z
        return loss, torch.stack((out.loss, balance)).detach()


@contextlib.contextmanager
def cpu_threads(n: int):
    """Run the body on n CPU threads (0: leave torch's setting), restoring the caller's afterwards."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks (up to 32 MiB each) for reuse rather than hand them back to
    the kernel, so a CPU step does not fault its big tensors (logits, their gradients) in afresh page by
    page every time: about 5,400 page faults and 8.5 ms of a 79 ms dense smoke step (benchmarks/RESULTS.md).
    Returns whether it applied (glibc only; numerics are untouched)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # not glibc (macOS, Windows, musl without mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    # both are needed: a fixed mmap threshold alone still trims the heap's top, a trim threshold alone
    # turns off glibc's adaptive threshold and maps every large block afresh
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def use_compile(t: TrainConfig, device: torch.device) -> bool:
    """train.compile resolved: "auto" compiles on CUDA only (measured on CPU: no gain, minutes of compiling)."""
    return t.compile == "on" or (t.compile == "auto" and device.type == "cuda")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of one step on one rank: dropout masks are a pure function of (seed, step, rank),
    like the batches, so resuming needs no saved RNG state and ranks draw independent masks."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little")


# ----------------------------------------------------------------- torchrun

@dataclass(frozen=True)
class World:
    """This process's place in a torchrun job; the defaults are a plain single process."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "World":
        """Read torchrun's RANK, LOCAL_RANK and WORLD_SIZE (absent: a single process)."""
        values = {}
        for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            raw = os.environ.get(key, default)
            try:
                values[key] = int(raw)
            except ValueError:
                raise ConfigError(key, raw, "must be an integer (torchrun sets it)") from None
        world = cls(values["RANK"], values["LOCAL_RANK"], values["WORLD_SIZE"])
        if not 0 <= world.rank < world.size or world.local_rank < 0:
            raise ConfigError("RANK", world.rank, f"must be in [0, WORLD_SIZE={world.size}) with LOCAL_RANK >= 0")
        return world


def require_device(key: str, name: str) -> None:
    """Reject a CUDA request on a machine without CUDA before any work."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(key, name, "CUDA is not available on this machine; choose auto or cpu")


def pick_device(name: str, world: World) -> torch.device:
    """`name` resolved; under torchrun on GPUs, the GPU of this process's local rank."""
    require_device("train.device", name)
    device = resolve_device(name)
    if device.type == "cuda" and world.size > 1:
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


def join_process_group(world: World, device: torch.device) -> None:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU) once per process, and leave it at
    exit: joining again after leaving races with ranks that have not left yet."""
    if world.size > 1 and not dist.is_initialized():
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
        atexit.register(dist.destroy_process_group)


def agree(value: int, world: World, device: torch.device) -> int:
    """Rank 0's `value`, on every rank."""
    if world.size == 1:
        return value
    box = torch.tensor([value], device=device)
    dist.broadcast(box, src=0)
    return int(box.item())


class Stopwatch:
    """Seconds spent training: `pause` before an evaluation, a checkpoint or a log line and `resume` after,
    so they are left out; `lap` pauses and returns the seconds since the last lap (resume after it)."""

    def __init__(self):
        self.seconds, self.since = 0.0, time.perf_counter()

    def pause(self) -> None:
        self.seconds += time.perf_counter() - self.since

    def resume(self) -> None:
        self.since = time.perf_counter()

    def lap(self) -> float:
        self.pause()
        seconds, self.seconds = self.seconds, 0.0
        return seconds


# ------------------------------------------------------------------ trainer

class Trainer:
    """One run: its data, model, optimizer and run directory, on one rank."""

    def __init__(self, cfg: RunConfig, run_root: Path, cache_dir: Path, progress: bool = True,
                 world: World = World()):
        self.cfg, self.progress, self.world = validate(cfg), progress, world
        t = cfg.train
        if t.accum_steps % world.size and t.batch_size % world.size:
            raise ConfigError("WORLD_SIZE", world.size,
                              f"must divide train.accum_steps={t.accum_steps} or train.batch_size={t.batch_size}")
        self.run = store.run_dir(cfg, run_root)
        self.device = pick_device(t.device, world)
        if self.device.type == "cpu":
            keep_freed_memory()
            cpu_kernels.available()  # a first build (seconds) happens here, not in the first timed step
        self.data = self.load_data(cache_dir)
        self.stream = TrainStream(self.data.train, t.seq_len, t.batch_size, cfg.seed, t.accum_steps)
        self.check_validation_size()
        self.val = val_batches(self.data.validation, t.seq_len, t.eval_batch_size, t.eval_batches)
        self.telemetry = None
        if cfg.model.ffn == "moe" and t.telemetry_seqs:
            self.telemetry = val_batches(self.data.validation, t.seq_len, t.telemetry_seqs, 1)[0][0]
        torch.manual_seed(cfg.seed)
        self.model = MoETransformer(cfg.model).to(self.device)
        self.optimizer = make_optimizer(self.model, t, self.device)
        self.objective = Objective(self.model, cfg)
        if world.size > 1:  # static_graph: the unused kinematic vectors are found once, not every step
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[self.device] if self.device.type == "cuda" else None, static_graph=True)
        self.step_fn = torch.compile(self.objective) if use_compile(t, self.device) else self.objective
        self.flops_per_token = train_flops_per_token(cfg.model, t.seq_len)
        self.finite = torch.ones((), dtype=torch.bool, device=self.device)  # every step since `checked` so far
        self.checked, self.train_seconds = 0, 0.0
        self.step_losses: list[torch.Tensor] = []  # each step's loss since the last log line, still on the device

    def peak_flops(self) -> float:
        """The matmul peak MFU is measured against: this device, the training dtype, measured once per process."""
        dtype = matmul_dtype(self.device, self.cfg.train.precision)
        return matmul_peak_flops(str(self.device), dtype, torch.get_num_threads())

    def load_data(self, cache_dir: Path):
        """Tokenizer and token caches, built by local rank 0 of each machine before the others read them."""
        first = self.world.local_rank == 0
        if not first:
            dist.barrier()
        data = prepare_data(self.cfg.data.corpus, self.cfg.data.vocab_size, cache_dir)
        if first and self.world.size > 1:
            dist.barrier()
        return data

    def check_validation_size(self) -> None:
        """The corpus decides how many validation sequences exist: a setting asking for more is refused by
        name, before the model is built (the batch size first: too large, it leaves no batch at all)."""
        t = self.cfg.train
        held = count_val_batches(self.data.validation, t.seq_len, 1)
        limits = {"train.eval_batch_size": (t.eval_batch_size, held, " sequences per batch"),
                  "train.eval_batches": (t.eval_batches, held // t.eval_batch_size, f" batches of {t.eval_batch_size}")}
        if self.cfg.model.ffn == "moe":  # a dense model records no routing
            limits["train.telemetry_seqs"] = (t.telemetry_seqs, held, " sequences")
        for key, (value, most, unit) in limits.items():
            if value > most:
                raise ConfigError(key, value, f"the validation split holds {held} sequences of {t.seq_len} tokens, "
                                              f"so at most {most}{unit}")

    def log(self, record: dict) -> None:
        with open(self.run / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def resume(self) -> int:
        """Restore the newest intact checkpoint (rank 0 picks it, every rank loads it) and cut
        metrics.jsonl back to what it held then, a half-written last line included. Returns its step."""
        found = store.latest_checkpoint(self.run) if self.world.main else None
        step = agree(found[0]["step"] if found else 0, self.world, self.device)
        if step and found is None:
            found = store.load_checkpoint(self.run, step)
        metrics_bytes = 0
        if found:
            meta, tensors = found
            store.restore_checkpoint(meta, tensors, self.model, self.optimizer)
            self.train_seconds, metrics_bytes = meta["train_seconds"], meta["metrics_bytes"]
            self.step_losses = [torch.tensor(v, device=self.device) for v in meta.get("step_losses", [])]
        path = self.run / "metrics.jsonl"
        if self.world.main and path.exists():
            kept = path.read_bytes()[:metrics_bytes]
            store.atomic_write(path, lambda tmp: Path(tmp).write_bytes(kept))
        self.checked = step
        return step

    def check_finite(self, step: int) -> None:
        """Stop for good if the loss or gradient norm was non-finite at any step since the last check.

        Checkpoints are written only after this check passes, so the newest one predates the damage.
        """
        if bool(self.finite):
            self.checked = step
            return
        reason = f"non-finite loss or gradient norm after step {self.checked} (detected at step {step})"
        if self.world.main:
            last = store.checkpoint_steps(self.run)
            store.write_status(self.run, "failed", step=step, reason=reason, last_checkpoint=last[-1] if last else None)
        raise RunFailed(f"{self.run.name}: {reason}; training stopped, the last good checkpoint is kept in {self.run} "
                        f"and status.json records the failure. Try a lower train.lr (a new run).")

    def checkpoint(self, step: int) -> None:
        self.check_finite(step)
        if self.world.main:
            metrics = self.run / "metrics.jsonl"
            state = {"train_seconds": self.train_seconds, "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
                     "step_losses": self.pending_losses()}  # so a resumed run's next log line is whole
            store.save_checkpoint(self.run, step, self.model, self.optimizer, state)
            self.write_running_status(step)

    def pending_losses(self) -> list[float]:
        """The losses of the steps since the last log line, fetched from the device at once."""
        return torch.stack(self.step_losses).tolist() if self.step_losses else []

    def write_running_status(self, step: int) -> None:
        """status.json while training: who trains the run, and the step it resumed from or last checkpointed."""
        store.write_status(self.run, "running", step=step, host=socket.gethostname(), pid=os.getpid(),
                           world_size=self.world.size)

    def shard(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the global batch of `step` (the single-process batch): micro-batches
        r, r+W, ... when the world size W divides accum_steps, so every micro-batch, balance loss
        included, is the single-process one; otherwise rows r::W of every micro-batch."""
        t, r, w = self.cfg.train, self.world.rank, self.world.size
        if t.accum_steps % w == 0:
            return [self.stream.batch(step, m) for m in range(r, t.accum_steps, w)]
        return [(x[r::w], y[r::w]) for x, y in (self.stream.batch(step, m) for m in range(t.accum_steps))]

    def no_sync(self, skip: bool):
        """DDP syncs gradients on the last micro-batch of a step only."""
        return self.objective.no_sync() if skip and self.world.size > 1 else contextlib.nullcontext()

    def mean_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        if self.world.size > 1:
            dist.all_reduce(values)
            values = values / self.world.size
        return values

    def train_step(self, step: int) -> dict:
        """One optimizer step on this rank's share of the global batch; the stats are global means."""
        t = self.cfg.train
        lr = lr_at(step, t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(step_seed(self.cfg.seed, step, self.world.rank))
        shares, groups = self.shard(step), 1
        if t.micro_batches == "fused":  # one batch; the balance loss still sees each micro-batch alone
            shares, groups = [tuple(torch.cat(part) for part in zip(*shares))], len(shares)
        sums = torch.zeros(2, device=self.device)
        for i, (x, y) in enumerate(shares):
            with self.no_sync(i < len(shares) - 1):
                with autocast_for(self.device, t.precision):
                    loss, stats = self.step_fn(to_device(x, self.device), to_device(y, self.device), groups)
                (loss / len(shares)).backward()
            sums += stats
        grad_norm = optimizer_step(self.model, self.optimizer, t.grad_clip)
        ce, balance = self.mean_over_ranks(sums / len(shares))
        stats = {"loss": ce, "balance": balance, "grad_norm": grad_norm, "lr": lr}
        if self.model.alpha is not None:  # the Magnitude Hack's scalar, for its trajectory
            stats["alpha"] = self.model.alpha.detach().mean()
        return stats

    def fit(self, stop_at: int | None = None) -> dict | None:
        """Train to the end (or to `stop_at`, leaving a checkpoint). Returns results when finished (rank 0)."""
        t, cfg, main = self.cfg.train, self.cfg, self.world.main
        if main:
            store.write_json(self.run / "config.json", {"config": cfg.to_dict(), "versions": store.code_versions()})
        start = self.resume()
        if main:
            self.write_running_status(start)
        self.model.train()
        log_every = max(1, t.steps // 200)
        name = f"{cfg.variant}/{cfg.profile}/s{cfg.seed}"
        bar = progress_bar(t.steps, name, "step", initial=start, disable=not (self.progress and main), mininterval=1.0)
        tokens_done, watch = 0, Stopwatch()  # tokens and training seconds since the last log line
        try:
            for step in range(start, t.steps):
                if stop_at is not None and step >= stop_at:
                    self.train_seconds += watch.lap()
                    self.checkpoint(step)
                    if main:
                        store.write_status(self.run, "paused", step=step)
                    return None
                stats = self.train_step(step)
                self.finite &= torch.isfinite(stats["loss"]) & torch.isfinite(stats["grad_norm"])
                self.step_losses.append(stats["loss"])
                tokens_done += t.tokens_per_step
                done = step + 1
                if done % log_every == 0 or done == t.steps:
                    self.check_finite(done)  # waits for the steps' work, so their time is counted in full
                    self.log_progress(done, stats, tokens_done, watch.lap(), bar)  # the watch stays paused
                    tokens_done = 0
                    watch.resume()
                if done % t.eval_every == 0 and done < t.steps:
                    self.check_finite(done)
                    watch.pause()
                    if main:
                        result = evaluate(self.model, self.val, self.device, t.precision)
                        self.log({"step": done, "val_loss": result["val_loss"], "val_ppl": result["val_ppl"]})
                        bar.write(f"{name} step {done}: val loss {result['val_loss']:.4f}, ppl {result['val_ppl']:.2f}")
                    watch.resume()
                if done % t.checkpoint_every == 0 or done == t.steps:  # the last one covers finish()
                    watch.pause()
                    self.checkpoint(done)
                    watch.resume()
                bar.update(1)
        finally:
            bar.close()
        return self.finish() if main else None

    def log_progress(self, done: int, stats: dict, tokens: int, seconds: float, bar) -> None:
        """One training log line (rank 0) and the progress bar's figures: the step's stats, the loss of every
        step since the last line (`step_losses`, this step's last: spikes between lines stay visible), and the
        throughput and MFU of the `tokens` trained in `seconds` since the last line."""
        self.train_seconds += seconds
        tokens_per_s = tokens / seconds
        record = {"step": done, **{k: float(v) for k, v in stats.items()},
                  "step_losses": self.pending_losses(), "tokens_per_s": tokens_per_s,
                  "mfu": tokens_per_s * self.flops_per_token / self.peak_flops(), "train_seconds": self.train_seconds}
        self.step_losses = []
        if self.world.main:
            self.log(record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", ppl=f"{math.exp(min(record['loss'], 50)):.1f}",
                        tok_s=f"{tokens_per_s:.0f}", mfu=f"{100 * record['mfu']:.1f}%", refresh=False)

    def finish(self) -> dict:
        """Final evaluation and the result files; results.json is written last, then checkpoints go."""
        cfg, t = self.cfg, self.cfg.train
        final = evaluate(self.model, self.val, self.device, t.precision)
        self.log({"step": t.steps, "val_loss": final["val_loss"], "val_ppl": final["val_ppl"]})
        store.write_json(self.run / "val_batch_losses.json", final["batch_losses"])
        if self.telemetry is not None:
            store.write_tensors(self.run / "telemetry.safetensors",
                                routing_telemetry(self.model, self.telemetry, self.device, t.precision))
        store.write_tensors(self.run / "final.safetensors", self.model.state_dict())
        params = count_parameters(cfg.model)
        results = {
            "run_dir": str(self.run), "variant": cfg.variant, "profile": cfg.profile, "seed": cfg.seed,
            "corpus": cfg.data.corpus,
            "val_loss": final["val_loss"], "val_ppl": final["val_ppl"], "steps": t.steps,
            "tokens": t.steps * t.tokens_per_step, "train_seconds": self.train_seconds,
            "tokens_per_s": t.steps * t.tokens_per_step / max(self.train_seconds, 1e-9),
            "params_total": params["total"], "params_routing": params["routing"],
            "device": str(self.device), "world_size": self.world.size, "versions": store.code_versions(),
        }
        store.write_status(self.run, "finished", step=t.steps)
        store.write_json(self.run / "results.json", results)
        for old in self.run.glob("ckpt-*"):
            old.unlink()
        return results


def inspect_run(run: Path) -> int:
    """Rank 0, holding the run's lock: tidy what a killed process left and say what to do."""
    removed = store.clean_partial(run)
    if removed:
        print(f"{run.name}: removed the leftovers of an interrupted process: {', '.join(removed)}",
              file=sys.stderr, flush=True)
    if (run / "results.json").exists():
        return FINISHED
    status = store.read_status(run)
    if status.get("state") == "failed":
        return FAILED
    if status.get("state") == "running":
        print(f"{run.name}: the process that trained it (pid {status.get('pid')} on {status.get('host')}) stopped "
              f"without finishing; resuming from the newest intact checkpoint", file=sys.stderr, flush=True)
    return TRAIN


def train(cfg: RunConfig, run_root: str | Path | None = None, cache_dir: str | Path | None = None,
          progress: bool = True, stop_at: int | None = None) -> dict | None:
    """Train `cfg` (or return its stored results with cached=True). `stop_at` pauses at a step.

    Under torchrun every rank calls this; rank 0 returns the results, the other ranks None.
    """
    cfg = validate(cfg)
    run_root = Path(run_root) if run_root else default_run_root()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    run, world = store.run_dir(cfg, run_root), World.from_env()
    if (run / "results.json").exists():
        return {**store.read_json(run / "results.json"), "cached": True} if world.main else None
    device = pick_device(cfg.train.device, world)
    join_process_group(world, device)
    trainer = Trainer(cfg, run_root, cache_dir, progress, world)  # data checks come before any file is written
    with store.locked(run) if world.main else contextlib.nullcontext():
        state = agree(inspect_run(run) if world.main else TRAIN, world, device)
        if state == FINISHED:  # another process finished it while this one waited for the lock
            return {**store.read_json(run / "results.json"), "cached": True} if world.main else None
        if state == FAILED:
            if not world.main:
                raise RunFailed(f"{run} failed earlier (rank 0 says why)")
            status = store.read_status(run)
            retry = (f"from its last good checkpoint (step {status['last_checkpoint']})" if status.get("last_checkpoint")
                     else "from scratch (it has no checkpoint)")
            raise RunFailed(f"{run} failed earlier ({status['reason']}). Retried as it is, it trains the same steps "
                            f"again and most likely fails again: change the configuration (a lower train.lr, say) "
                            f"for a new run, or remove its status.json to retry {retry}")
        with cpu_threads(cfg.train.threads):
            results = trainer.fit(stop_at=stop_at)
    return None if results is None else {**results, "cached": False}
