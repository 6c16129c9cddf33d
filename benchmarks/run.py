"""Training-step and dispatch benchmarks at a profile's shapes, all ratios taken in one process.

    python benchmarks/run.py --profile smoke            # CPU, about a minute
    python benchmarks/run.py --profile paper --device cuda --compile

1. Train step (the batch's copy to the device, forward + backward + clip + AdamW) of MoE variants and
   the dense baselines on random tokens at the profile's step shape (one micro-batch, or all
   accum_steps of them as one batch where the profile sets train.micro_batches=fused, as paper does;
   `--set` overrides any config key of every variant); rounds interleave the variants, ms/step is
   the median round and a ratio to dense is the median of the rounds' ratios to the dense round
   timed beside them, so drift of the machine hits both sides of a ratio alike. Reports ms/step, tokens/s,
   model FLOPs per token and MFU against a matmul peak measured here, in the training dtype.
2. FFN-expert dispatch (SwiGLU experts, fwd + bwd) of every backend against a per-expert loop
   written the way common MoE libraries' eager paths are (mask per expert, index, matmul,
   index_add), for E in {16, 32, 64}; and rank-1 expert dispatch at the profile's M and at M = 1024.
   Each backend's peak memory too: the most bytes of tensors its forward and backward hold at once
   (`LiveTensorBytes`), from a separate call.
3. The routers' top-k (`top_k_indices`: the C++ kernel on CPU, Triton on CUDA) against torch.topk, at
   the profile's M and at M = 1024, on fresh scores every call (torch.topk is faster on repeated ones);
   a router's whole decision with its balance loss, forward and backward (`select_top_k`: the C++ route
   kernel on CPU) against the same in torch operators (`select_top_k_torch`); and the loss
   (`model.token_cross_entropy`: the C++ kernel on CPU) against F.cross_entropy, forward and
   backward, at the step's tokens and the profile's vocabulary.
Every comparison in 2 and 3 calls its sides in turn, round after round (`timed`), as the step rounds do.

The last line of standard output is one JSON object with every number (see RESULTS.md).
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moe_core.__main__ import overrides_from, setting  # noqa: E402
from moe_core.config import ConfigError  # noqa: E402
from moe_core.data import to_device  # noqa: E402
from moe_core.evaluate import autocast_for, matmul_dtype, resolve_device  # noqa: E402
from moe_core.experts import RankExperts, SwiGLUExperts, grouped_mm_supported  # noqa: E402
from moe_core.model import MoETransformer, token_cross_entropy  # noqa: E402
from moe_core.perf import matmul_peak_flops, sync, train_flops_per_token  # noqa: E402
from moe_core import cpu_kernels  # noqa: E402
from moe_core.routing import select_top_k, select_top_k_torch, switch_balance_loss, top_k_indices  # noqa: E402
from moe_core.train import Objective, keep_freed_memory, make_optimizer, optimizer_step, require_device  # noqa: E402
from moe_core.variants import resolve  # noqa: E402

STEP_VARIANTS = ("dense_iso_param", "dense_iso_flop", "wide", "deep", "indep", "path_b4")


def timed(fns: dict, device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds per call of each of `fns` (name -> function): one warm-up call each, then `repeats`
    rounds that call every function in turn, each round starting one further along, so drift of the machine
    and what the previous call left in the caches fall on every side of a comparison alike."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


class LiveTensorBytes(TorchDispatchMode):
    """Counts the bytes of the (strided) tensors that operators return while it is on, each storage from the
    operator that creates it until it is freed (a finalizer on the storage, whose Python object lives as long
    as the storage); `peak` is the most at any one time. Outputs that share an input's storage (views,
    in-place and out= results) are not new, so an out= or resize_ that reallocates goes uncounted, as do
    workspaces inside kernels. Autograd runs the backward's operators under it too."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage address -> bytes
        self.total = self.peak = 0
        self.lock = threading.RLock()  # finalizers may run on autograd's device threads, or inside the lock (gc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if is_strided(t)}
        for t in filter(is_strided, tree_leaves(out)):
            storage = t.untyped_storage()
            address = storage.data_ptr()
            with self.lock:
                if address and address not in inputs and address not in self.live:
                    self.live[address] = storage.nbytes()
                    self.total += storage.nbytes()
                    weakref.finalize(storage, self.freed, address).atexit = False
                self.peak = max(self.peak, self.total)
        return out

    def freed(self, address: int) -> None:
        with self.lock:
            self.total -= self.live.pop(address, 0)


def is_strided(x) -> bool:
    return isinstance(x, torch.Tensor) and x.layout == torch.strided


def peak_bytes(fn) -> int:
    """The most bytes of tensors created by `fn()` alive at once (forward intermediates, gradients, outputs)."""
    with LiveTensorBytes() as mode:
        fn()
    return mode.peak


# ------------------------------------------------------------------ train step

class StepBench:
    """One variant's model, optimizer and a fixed random batch; `step()` is one training step."""

    def __init__(self, variant: str, profile: str, device: torch.device, batch_size: int | None,
                 compile_mode: str | None, overrides: dict):
        self.cfg = resolve(variant, profile, 42, {**overrides, "train": {**overrides.get("train", {}), "device": device.type}})
        t = self.cfg.train
        torch.manual_seed(0)
        self.model = MoETransformer(self.cfg.model).to(device)
        self.optimizer = make_optimizer(self.model, t, device)
        objective = Objective(self.model, self.cfg)
        self.loss_fn = torch.compile(objective, mode=compile_mode) if compile_mode else objective  # any device
        # train.micro_batches=fused: the step's accum_steps micro-batches as one batch, as the trainer runs them
        self.groups = t.accum_steps if t.micro_batches == "fused" else 1
        rows = (batch_size or t.batch_size) * self.groups
        tokens = torch.randint(0, self.cfg.model.vocab_size, (rows, t.seq_len + 1), generator=torch.Generator().manual_seed(0))
        self.x, self.y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # on the host, as the trainer's
        self.device, self.precision, self.grad_clip = device, t.precision, t.grad_clip
        self.tokens = rows * t.seq_len
        self.flops_per_token = train_flops_per_token(self.cfg.model, t.seq_len)

    def step(self) -> None:
        with autocast_for(self.device, self.precision):
            loss, _ = self.loss_fn(to_device(self.x, self.device), to_device(self.y, self.device), self.groups)
        loss.backward()
        optimizer_step(self.model, self.optimizer, self.grad_clip)


def bench_steps(args, device: torch.device, peak: float) -> dict[str, dict]:
    benches = {v: StepBench(v, args.profile, device, args.batch_size, args.compile_mode, args.overrides)
               for v in args.variants}
    for bench in benches.values():  # warm-up: allocator, thread pools, compilation
        for _ in range(args.warmup):
            bench.step()
    rounds: dict[str, list[float]] = {v: [] for v in benches}
    for _ in range(args.rounds):
        for variant, bench in benches.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(args.steps):
                bench.step()
            sync(device)
            rounds[variant].append((time.perf_counter() - start) / args.steps)
    results = {}
    base = rounds["dense_iso_param"]
    for variant, bench in benches.items():
        seconds = statistics.median(rounds[variant])
        tokens_per_s = bench.tokens / seconds
        results[variant] = {"ms_per_step": 1e3 * seconds, "tokens_per_step": bench.tokens, "tokens_per_s": tokens_per_s,
                            "flops_per_token": bench.flops_per_token,
                            "mfu": tokens_per_s * bench.flops_per_token / peak,
                            # paired: each round's ratio to the dense step timed beside it, the median of those
                            "over_dense_iso_param": statistics.median(t / b for t, b in zip(rounds[variant], base))}
    return results


# -------------------------------------------------------------------- dispatch

def library_style_loop(bank: SwiGLUExperts, h, idx, weights):
    """The usual eager MoE loop: a boolean mask per expert, index, matmul, index_add."""
    out = torch.zeros_like(h)
    for e in range(bank.w_gate.shape[0]):
        mask = idx == e
        rows, slot = torch.where(mask)
        y = bank.expert(e, h[rows]) * weights[rows, slot, None]
        out.index_add_(0, rows, y)
    return out


def dispatch_cases(bank, fns: dict, n_tokens: int, k: int, device: torch.device, args) -> dict:
    """Median seconds of forward + backward through each of `fns` (name -> fn(h, idx, weights)) on the same
    fixed random routing, timed in turn, in the profile's training precision (`autocast_for`: bf16 on CUDA,
    where torch's grouped GEMM runs; fp32 on CPU unless it asks for bf16); and under "peak_bytes", each
    one's peak memory (`peak_bytes`, measured in a separate, untimed call)."""
    g = torch.Generator().manual_seed(0)
    d = bank.w_down.shape[-1] if isinstance(bank, RankExperts) else bank.w_gate.shape[1]
    h = torch.randn(n_tokens, d, generator=g).to(device).requires_grad_()
    routing = select_top_k(torch.randn(n_tokens, bank_size(bank), generator=g).to(device), k)
    cotangent = torch.randn(n_tokens, d, generator=g).to(device)

    def fwd_bwd(fn):
        with autocast_for(device, args.precision):
            out = fn(h, routing.idx, routing.weights)
        (out.float() * cotangent).sum().backward()
    calls = {name: (lambda fn=fn: fwd_bwd(fn)) for name, fn in fns.items()}
    seconds = timed(calls, device, args.repeats)
    return {**seconds, "peak_bytes": {name: peak_bytes(call) for name, call in calls.items()}}


def bank_size(bank) -> int:
    return (bank.w_down if isinstance(bank, RankExperts) else bank.w_gate).shape[0]


def bench_swiglu_dispatch(args, device: torch.device, d: int, d_ff: int, k: int, n_tokens: int) -> dict:
    results = {}
    for n_experts in (16, 32, 64):
        bank = SwiGLUExperts(n_experts, d, d_ff, n_layers=8).to(device)
        fns = {"loop": lambda *a: library_style_loop(bank, *a),
               **{backend: getattr(bank, f"forward_{backend}") for backend in ("sorted", "grouped", "masked")}}
        row = dispatch_cases(bank, fns, n_tokens, k, device, args)
        row["grouped_mm"] = grouped_mm_supported(matmul_dtype(device, args.precision), device, bank.w_gate, bank.w_out)
        results[n_experts] = row
    return results


def bench_rank_dispatch(args, device: torch.device, d: int, k: int, n_tokens: int, sizes) -> dict:
    """Rank-1 experts: seconds per fwd + bwd and peak bytes of each backend."""
    results = {}
    for m in sizes:
        bank = RankExperts(m, d, 1, n_layers=8).to(device)
        fns = {backend: getattr(bank, f"forward_{backend}") for backend in ("loop", "gather", "masked")}
        row = dispatch_cases(bank, fns, n_tokens, k, device, args)
        results[m] = row
    return results


def bench_topk(args, device: torch.device, n_tokens: int, k: int, sizes) -> dict:
    """Seconds per call of torch.topk and of top_k_indices, each call on the next of 16 random score matrices."""
    g = torch.Generator().manual_seed(0)
    results = {}
    for m in sizes:
        pool = itertools.cycle([torch.randn(n_tokens, m, generator=g).to(device) for _ in range(16)])
        results[m] = timed({"torch_topk": lambda: next(pool).topk(k, dim=-1),
                            "top_k_indices": lambda: top_k_indices(next(pool), k)}, device, 20 * args.repeats)
    return results


def bench_decision(args, device: torch.device, n_tokens: int, n_experts: int, k: int) -> dict:
    """Seconds per forward + backward of one routing decision and its balance loss: `select_top_k` against
    `select_top_k_torch` on the same logits, [n_tokens, n_experts] fp32 (routers score in fp32)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n_tokens, n_experts, generator=g).to(device).requires_grad_()
    cotangent = torch.randn(n_tokens, k, generator=g).to(device)

    def fwd_bwd(select):
        logits.grad = None
        r = select(logits, k)
        ((r.weights * cotangent).sum() + switch_balance_loss([r], n_experts)).backward()
    return timed({"select_top_k_torch": lambda: fwd_bwd(select_top_k_torch),
                  "select_top_k": lambda: fwd_bwd(select_top_k)}, device, 20 * args.repeats)


def bench_cross_entropy(args, device: torch.device, n_tokens: int, vocab: int) -> dict:
    """Seconds per forward + backward of F.cross_entropy and of token_cross_entropy on fp32 logits [n_tokens, vocab]."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, n_tokens, vocab, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (1, n_tokens), generator=g).to(device)

    def fwd_bwd(loss_fn):
        logits.grad = None  # as in a step: the gradient is written, not accumulated
        loss_fn(logits, targets).backward()
    reference = lambda x, t: F.cross_entropy(x.flatten(0, 1), t.flatten())  # noqa: E731
    return timed({"F.cross_entropy": lambda: fwd_bwd(reference),
                  "token_cross_entropy": lambda: fwd_bwd(token_cross_entropy)}, device, 3 * args.repeats)


# ------------------------------------------------------------------------ main

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--profile", default="smoke", help="profile whose shapes are timed (tiny, smoke, paper)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--variants", nargs="+", default=list(STEP_VARIANTS))
    parser.add_argument("--batch-size", type=int, default=None,
                        help="sequences per micro-batch (default: the profile's); a step runs one micro-batch, or "
                             "accum_steps of them as one batch under --set train.micro_batches=fused")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=12, help="timed rounds per variant (the median counts)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per dispatch case")
    parser.add_argument("--compile", action="store_const", const="default", dest="compile_mode",
                        help="torch.compile the training objective (= --compile-mode default)")
    parser.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
                        help="torch.compile the training objective in this mode (reduce-overhead: CUDA graphs)")
    parser.add_argument("--set", type=setting, action="append", metavar="SECTION.KEY=VALUE", default=[],
                        help="override a config key of every variant, e.g. --set train.micro_batches=fused")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (default: the profile's train.threads, else torch's default)")
    args = parser.parse_args(argv)
    for flag, least in (("steps", 1), ("rounds", 1), ("repeats", 1), ("warmup", 0), ("batch_size", 1), ("threads", 0)):
        value = getattr(args, flag)
        if value is not None and value < least:
            parser.error(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
    try:
        args.overrides = overrides_from(args.set)
    except ConfigError as e:  # a key set twice
        parser.error(str(e))
    for required in ("dense_iso_param", "wide", "deep"):
        if required not in args.variants:
            args.variants.append(required)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:  # every name and value, before the first timing
        require_device("--device", args.device)
        probe, probe_ffn, *_ = (resolve(v, args.profile, 42, args.overrides) for v in ("wide", "indep", *args.variants))
    except ConfigError as e:  # exit status 2, as the moe_core command line
        print(f"benchmarks/run.py: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    device = resolve_device(args.device)
    threads = probe.train.threads if args.threads is None else args.threads
    if threads:  # the thread count the profile trains with (smoke: 1, one run per core)
        torch.set_num_threads(threads)
    if device.type == "cpu":
        keep_freed_memory()  # as the trainer does
    args.precision = probe.train.precision
    peak_dtype = matmul_dtype(device, args.precision)
    peak = matmul_peak_flops(device.type, peak_dtype, torch.get_num_threads())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; matmul peak {peak / 1e9:.1f} GFLOP/s ({peak_dtype})")

    steps = bench_steps(args, device, peak)
    n_tokens = steps["dense_iso_param"]["tokens_per_step"]  # every variant's step has the same shape
    print(f"\ntrain step at profile {args.profile}, {n_tokens // probe.train.seq_len} x {probe.train.seq_len} tokens:")
    print(f"{'variant':<18}{'ms/step':>10}{'tokens/s':>12}{'GFLOP/token':>13}{'MFU':>8}{'x dense_iso_param':>20}")
    for variant, r in steps.items():
        print(f"{variant:<18}{r['ms_per_step']:>10.1f}{r['tokens_per_s']:>12.0f}{r['flops_per_token'] / 1e9:>13.4f}"
              f"{100 * r['mfu']:>7.1f}%{r['over_dense_iso_param']:>20.2f}")

    m, f = probe.model, probe_ffn.model
    swiglu = bench_swiglu_dispatch(args, device, f.d_model, f.expert_d_ff, f.top_k, n_tokens)
    print(f"\nSwiGLU expert dispatch, fwd+bwd, {n_tokens} tokens, top-{f.top_k}, d_model {f.d_model}, "
          f"d_ff {f.expert_d_ff} (ms, speed-up over the loop, peak MiB of the call's tensors):")
    for n_experts, row in swiglu.items():
        mib = {b: row["peak_bytes"][b] / 2**20 for b in row["peak_bytes"]}
        cells = "  ".join(f"{b} {1e3 * row[b]:.2f} ({row['loop'] / row[b]:.2f}x, {mib[b]:.1f})"
                          for b in ("sorted", "grouped", "masked"))
        print(f"  E={n_experts:<3} loop {1e3 * row['loop']:.2f} ({mib['loop']:.1f})  {cells}  "
              f"[grouped_mm: {row['grouped_mm']}]")

    rank = bench_rank_dispatch(args, device, m.d_model, m.top_k, n_tokens, sorted({m.n_experts, 1024}))
    print(f"\nrank-1 expert dispatch, fwd+bwd, top-{m.top_k} (ms, peak MiB of the call's tensors):")
    for n_experts, row in rank.items():
        print(f"  M={n_experts:<5} " + "  ".join(f"{b} {1e3 * row[b]:.2f} ({row['peak_bytes'][b] / 2**20:.1f})"
                                                  for b in ("loop", "gather", "masked")))

    topk = bench_topk(args, device, n_tokens, m.top_k, sorted({m.n_experts, 1024}))
    kernel = {"cuda": "Triton"}.get(device.type, "C++ kernel" if cpu_kernels.available() else "torch.topk fallback")
    print(f"\nrouter top-{m.top_k} over {n_tokens} tokens (ms; top_k_indices here: {kernel}):")
    for n_experts, row in topk.items():
        print(f"  M={n_experts:<5} torch.topk {1e3 * row['torch_topk']:.3f}  top_k_indices {1e3 * row['top_k_indices']:.3f} "
              f"({row['torch_topk'] / row['top_k_indices']:.1f}x)")

    decision = bench_decision(args, device, n_tokens, m.n_experts, m.top_k)
    route_kernel = "C++ route kernel" if device.type == "cpu" and cpu_kernels.available() else "torch operators"
    print(f"\nrouter decision and balance loss, fwd+bwd, {n_tokens} x {m.n_experts}, top-{m.top_k} (ms; select_top_k "
          f"here: {route_kernel}): select_top_k_torch {1e3 * decision['select_top_k_torch']:.3f}  select_top_k "
          f"{1e3 * decision['select_top_k']:.3f} ({decision['select_top_k_torch'] / decision['select_top_k']:.1f}x)")

    xent = bench_cross_entropy(args, device, n_tokens, m.vocab_size)
    xent_kernel = "C++ kernel" if device.type == "cpu" and cpu_kernels.available() else "F.cross_entropy"
    print(f"\ncross-entropy, fwd+bwd, {n_tokens} tokens x {m.vocab_size} classes (ms; token_cross_entropy here: "
          f"{xent_kernel}): "
          f"F.cross_entropy {1e3 * xent['F.cross_entropy']:.2f}  token_cross_entropy "
          f"{1e3 * xent['token_cross_entropy']:.2f} ({xent['F.cross_entropy'] / xent['token_cross_entropy']:.1f}x)")

    summary = {
        "profile": args.profile, "device": name, "torch": torch.__version__, "compile": args.compile_mode,
        "overrides": args.overrides, "date": time.strftime("%Y-%m-%d"), "matmul_peak_gflops": peak / 1e9,
        "wide_step_over_dense_iso_param": steps["wide"]["over_dense_iso_param"],
        "deep_step_over_dense_iso_param": steps["deep"]["over_dense_iso_param"],
        "grouped_dispatch_speedup_e32": swiglu[32]["loop"] / swiglu[32]["grouped"],
        "dense_mfu": steps["dense_iso_param"]["mfu"],
        "topk_speedup": topk[m.n_experts]["torch_topk"] / topk[m.n_experts]["top_k_indices"],
        "decision_speedup": decision["select_top_k_torch"] / decision["select_top_k"],
        "cross_entropy_speedup": xent["F.cross_entropy"] / xent["token_cross_entropy"],
        "steps": steps, "swiglu_dispatch": swiglu, "rank_dispatch": rank, "topk": topk, "topk_kernel": kernel,
        "decision": decision, "decision_kernel": route_kernel, "cross_entropy": xent, "cross_entropy_kernel": xent_kernel,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
