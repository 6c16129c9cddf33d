"""Does a host-to-GPU copy wait for the work already queued on the GPU? Needs a CUDA GPU.

    python benchmarks/copy_waits.py

Copies a 64 x 512 batch of token ids from pageable memory with non_blocking=True (what the trainer did before
`data.to_device`) and with `data.to_device` (pinned), each behind a kernel of about half a second, and prints
how long each call took and whether the kernel was still running after it. The CUDA documentation says the
driver *may* synchronise for the pageable copy; this shows what it does on the machine at hand.
tests/test_cuda.py holds `data.to_device` to not waiting with `copy_waits`.
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from moe_core.data import to_device  # noqa: E402


def copy_waits(copy) -> tuple[float, bool]:
    """Calls `copy()` once to warm up (a first pinned buffer or staging area comes from the driver), then again
    behind a kernel of a billion GPU clock cycles (about half a second). Returns the seconds the second call
    took and whether the kernel had finished when it returned, that is whether the copy waited for it."""
    copy()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    start = time.perf_counter()
    copy()
    seconds = time.perf_counter() - start
    waited = torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    return seconds, waited


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/copy_waits.py needs a CUDA GPU")
    batch, cuda = torch.randint(0, 32000, (64, 512)), torch.device("cuda")
    copies = {"pageable, non_blocking=True": lambda: batch.to(cuda, non_blocking=True),
              "data.to_device (pinned)": lambda: to_device(batch, cuda)}
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, copy in copies.items():
        seconds, waited = copy_waits(copy)
        print(f"{name}: the call took {1e3 * seconds:.1f} ms; the kernel queued before it was "
              f"{'done' if waited else 'still running'} when it returned")


if __name__ == "__main__":
    main()
