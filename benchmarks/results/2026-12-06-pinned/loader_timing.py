"""Host time to build one training step's batch with TrainStream (one thread): the paper recipe's 8 micro-batches
of 8 x 512 tokens, concatenated as train.micro_batches=fused does, and smoke's 16 x 64. Random tokens."""
import time

import torch

from moe_core.data import TrainStream

torch.set_num_threads(1)
tokens = torch.randint(0, 32000, (20_000_000,), generator=torch.Generator().manual_seed(0))
for batch_size, seq_len, accum in [(8, 512, 8), (16, 64, 1)]:
    stream = TrainStream(tokens, seq_len, batch_size, 0, accum)
    stream.batch(0, 0)  # the epoch's window order, computed once and cached
    start, steps = time.perf_counter(), 50
    for step in range(steps):
        parts = [stream.batch(step, m) for m in range(accum)]
        x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    print(f"{accum} x {batch_size} x {seq_len} tokens: {1e3 * (time.perf_counter() - start) / steps:.3f} ms per step")
