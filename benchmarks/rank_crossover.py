"""Where `masked` stops beating `gather` for rank-1 experts on this device: the data behind
`RankExperts.auto_backend`'s CPU threshold (M <= 64 k).

    python benchmarks/rank_crossover.py                      # d_model 64, 1,024 tokens (smoke shapes)
    python benchmarks/rank_crossover.py --d-model 1024 --tokens 512

Times one forward and backward of each backend, with gradients for the input, the experts and the
routing weights (as in training), median of --repeats, one thread by default. Prints a table of
milliseconds and gather/masked ratios (below 1: gather is faster) and ends with one JSON line.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from moe_core.experts import RankExperts  # noqa: E402
from moe_core.routing import select_top_k  # noqa: E402
from moe_core.train import cpu_threads, keep_freed_memory  # noqa: E402


def fwd_bwd_ms(bank: RankExperts, backend: str, n_tokens: int, k: int, repeats: int) -> float:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n_tokens, bank.w_down.shape[-1], generator=g).requires_grad_()
    routing = select_top_k(torch.randn(n_tokens, bank.w_down.shape[0], generator=g), k)
    weights = routing.weights.requires_grad_()
    forward = getattr(bank, f"forward_{backend}")
    times = []
    for i in range(repeats + 2):  # two warm-up calls
        start = time.perf_counter()
        forward(h, routing.idx, weights).sum().backward()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--top-k", type=int, nargs="+", default=[1, 4, 12])
    p.add_argument("--experts", type=int, nargs="+", default=[16, 32, 64, 128, 256, 512, 1024])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    for name in ("d_model", "tokens", "repeats", "threads", "top_k", "experts"):
        value = getattr(args, name)
        if min(value if isinstance(value, list) else [value]) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    keep_freed_memory()
    print(f"torch {torch.__version__}, {args.threads} thread(s), d_model {args.d_model}, {args.tokens} tokens")
    print(f"{'k':>3} {'M':>5} {'masked ms':>10} {'gather ms':>10} {'gather/masked':>14} {'auto':>7}")
    rows = []
    with cpu_threads(args.threads):  # restored afterwards, for callers in the same process (the tests)
        for k in args.top_k:
            for m in (m for m in args.experts if m >= k):
                bank = RankExperts(m, args.d_model, 1, n_layers=8)
                masked, gather = (fwd_bwd_ms(bank, b, args.tokens, k, args.repeats) for b in ("masked", "gather"))
                auto = RankExperts.auto_backend(torch.device("cpu"), m, k)
                rows.append({"k": k, "experts": m, "masked_ms": masked, "gather_ms": gather, "auto": auto})
                print(f"{k:>3} {m:>5} {masked:>10.2f} {gather:>10.2f} {gather / masked:>14.2f} {auto:>7}", flush=True)
    summary = {"d_model": args.d_model, "tokens": args.tokens, "threads": args.threads, "rows": rows,
               "auto_picked_the_faster": sum((r["gather_ms"] < r["masked_ms"]) == (r["auto"] == "gather") for r in rows),
               "cases": len(rows)}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
