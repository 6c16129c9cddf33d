"""Does a host-to-GPU copy wait for the work already queued on the GPU? Needs a CUDA GPU.

    python benchmarks/copy_waits.py

Queues a kernel of a billion GPU clock cycles (about half a second), then copies a 64 x 512 batch of token ids
from pageable memory with non_blocking=True (what the trainer did before `data.to_device`) and with
`data.to_device` (pinned), and prints how long each call took and whether the kernel was still running after
it. The CUDA documentation says the driver *may* synchronise for the pageable copy; this shows what it does
on the machine at hand.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moe_core.data import to_device  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("benchmarks/copy_waits.py needs a CUDA GPU")
batch, cuda = torch.randint(0, 32000, (64, 512)), torch.device("cuda")
copies = {"pageable, non_blocking=True": lambda: batch.to(cuda, non_blocking=True),
          "data.to_device (pinned)": lambda: to_device(batch, cuda)}
print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
for name, copy in copies.items():
    copy()  # a first pinned buffer or staging area comes from the driver
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    start = time.perf_counter()
    copy()
    seconds = time.perf_counter() - start
    print(f"{name}: the call took {1e3 * seconds:.1f} ms; the kernel queued before it was "
          f"{'still running' if not torch.cuda.current_stream().query() else 'done'} when it returned")
    torch.cuda.synchronize()
