"""Fixtures shared by the test modules that spawn training processes, and the Triton switch."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels (moe_core/kernels.py) run on CPU tensors through Triton's interpreter.
    # Triton reads the switch when a kernel is defined, so it is set here, before any test imports moe_core.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread here and in child processes (torchrun workers have one too): bit-identity
    across processes needs the same count, tiny models train fastest on one, and on shared cores two
    processes of two OpenMP threads each can run a hundred times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One tokenizer/token cache for the process-spawning test modules."""
    return tmp_path_factory.getbasetemp() / "moe-cache"
