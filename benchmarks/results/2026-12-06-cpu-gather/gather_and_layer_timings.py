"""The standalone timings behind the thirteenth session's RESULTS.md notes (one thread, medians):
the gather of tokens by expert at the grouped path's shape, advanced indexing against index_select, and
where one smoke MoE layer of Wide spends its time against the dense iso-parameter FFN."""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from moe_core.model import MoETransformer  # noqa: E402
from moe_core.routing import switch_balance_loss  # noqa: E402
from moe_core.train import keep_freed_memory  # noqa: E402
from moe_core.trajectory import Interventions  # noqa: E402
from moe_core.variants import resolve  # noqa: E402

torch.set_num_threads(1)
keep_freed_memory()


def ms(fn, n=300):
    for _ in range(30):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[n // 2]


g = torch.Generator().manual_seed(0)
idx = torch.randint(0, 32, (1024, 4), generator=g)
token = idx.reshape(-1).argsort(stable=True) // 4  # 4,096 ids into 1,024 rows, as sort_by_expert makes them
h = torch.randn(1024, 64, generator=g, requires_grad=True)
cot = torch.randn(4096, 64, generator=g)
print("gather of 4,096 rows of [1,024, 64] fp32 (ms):")
print(f"  forward:   h[token] {ms(lambda: h[token]):.3f}  index_select {ms(lambda: h.index_select(0, token)):.3f}")
print(f"  + backward: h[token] {ms(lambda: h[token].backward(cot)):.3f}  "
      f"index_select {ms(lambda: h.index_select(0, token).backward(cot)):.3f}")

x = torch.randn(16, 64, 64, generator=g, requires_grad=True)
c = torch.randn(16, 64, 64, generator=g)
tokens = torch.randint(0, 2048, (16, 64), generator=g)
dense = MoETransformer(resolve("dense_iso_param", "smoke").model).blocks[0].ffn
cfg = resolve("wide", "smoke")
wide = MoETransformer(cfg.model)
layer, router, iv = wide.blocks[0].ffn, wide.router_for_layer(0), Interventions()
flat = x.detach().reshape(-1, 64).requires_grad_()
weights_cot = torch.randn(1024, cfg.model.top_k, generator=g)


def moe_layer():
    out, events, _ = layer(x, router, tokens, None, iv)
    ((out * c).sum() + 0.01 * switch_balance_loss([e.routing for e in events], cfg.model.n_experts)).backward()


def decision():
    r = router.decide(flat, 0, 0, None)
    ((r.weights * weights_cot).sum() + switch_balance_loss([r], cfg.model.n_experts)).backward()


routing = router.decide(flat, 0, 0, None)
idx, w = routing.idx, routing.weights.detach().requires_grad_()
print("one smoke layer, 16 x 64 tokens, forward + backward (ms):")
print(f"  dense iso-param FFN (d_ff {resolve('dense_iso_param', 'smoke').model.d_ff}) {ms(lambda: dense(x).backward(c)):.3f}")
print(f"  Wide MoE layer with its balance loss {ms(moe_layer):.3f}")
print(f"    its experts alone (masked) {ms(lambda: layer.experts(flat, idx, w).backward(c.reshape(-1, 64))):.3f}")
print(f"    its decision with cosine scores and balance loss {ms(decision):.3f}")
print(f"    the cosine scores alone {ms(lambda: router.logits(flat, 0, 0).backward(torch.ones(1024, 64))):.3f}")
