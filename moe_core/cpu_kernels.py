"""C++ kernels for the CPU path, compiled on first use and cached (torch.utils.cpp_extension).

`topk_indices` replaces torch.topk in the routers' top-k on CPU (csrc/topk.cpp says how it works:
1,024 x 64, k = 12 in 0.09-0.10 ms against torch.topk's 0.98, benchmarks/RESULTS.md). The first call
in a fresh environment compiles it (about 15 s, once; later processes load the cached library). Where
it cannot be built (no C++ compiler or ninja) `available()` is False, with one warning saying why,
and the routers fall back to torch.topk. The environment variable MOE_CORE_CPU_KERNELS picks: unset,
build and fall back on failure; "0", off; "1", required (a failed build raises; CI sets it).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

import torch

ENV_SWITCH = "MOE_CORE_CPU_KERNELS"
# one build per torch version: torch's extension cache does not notice a torch upgrade, and a library
# built against another torch fails to load
_NAME = "moe_core_cpu_kernels_" + re.sub(r"\W", "_", torch.__version__)
_SOURCE = Path(__file__).parent / "csrc" / "topk.cpp"


@functools.cache
def _loaded() -> bool:
    """Build (or find in torch's cache) and load the library, once per process; False where switched off
    or where it fails to build."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch not in ("", "0", "1"):
        raise ValueError(f"{ENV_SWITCH}={switch!r}: use 0 (off), 1 (required) or leave it unset (use if it builds)")
    if switch == "0":
        return False
    try:
        from torch.utils import cpp_extension
        _put_ninja_on_path()
        if not _is_built(cpp_extension):
            print(f"moe_core: compiling the CPU top-k kernel ({_SOURCE.name}); once, about 15 s ...",
                  file=sys.stderr, flush=True)
        cpp_extension.load(name=_NAME, sources=[str(_SOURCE)], extra_cflags=["-O3"], is_python_module=False,
                           verbose=False)
    except Exception as err:  # any build failure: the torch fallback is correct, only slower
        if switch == "1":
            raise RuntimeError(f"{ENV_SWITCH}=1 but the CPU top-k kernel did not build") from err
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"moe_core: the CPU top-k kernel could not be built ({reason}); routing uses torch.topk "
                      f"instead (same experts, slower). Set {ENV_SWITCH}=0 to skip the attempt.", stacklevel=3)
        return False
    torch.library.register_fake("moe_core::cpu_topk_indices", _topk_shape)
    return True


def _topk_shape(scores: torch.Tensor, k: int) -> torch.Tensor:
    """What torch.compile needs to know of the operator: the shape and dtype of its output."""
    return scores.new_empty((scores.shape[0], k), dtype=torch.long)


def _put_ninja_on_path() -> None:
    """torch looks for ninja on PATH; the pip wheel of ninja (requirements.txt) lands in the interpreter's
    scripts folder, which is not on PATH when the venv's python is called without activating it."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts):
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


def _is_built(cpp_extension) -> bool:
    """Whether torch's extension cache already holds a build of the kernel (then loading takes no time)."""
    try:
        return (Path(cpp_extension._get_build_directory(_NAME, verbose=False)) / f"{_NAME}.so").exists()
    except Exception:  # a private helper: if it moves, we only lose the message
        return True


@torch.compiler.assume_constant_result  # compiled code reads the answer; it does not trace the build
def available() -> bool:
    return _loaded()


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column ids of the k largest entries of each row of a 2-d fp32 CPU tensor, largest first, ties to
    the lower column, NaN first, [N, k] int64. Call only where `available()`."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.device.type != "cpu":
        raise ValueError(f"topk_indices takes a 2-d fp32 CPU tensor, got {scores.dtype} {tuple(scores.shape)} "
                         f"on {scores.device}")
    if not 0 < k <= scores.shape[1]:
        raise ValueError(f"topk_indices needs 0 < k <= columns, got k={k}, columns={scores.shape[1]}")
    return torch.ops.moe_core.cpu_topk_indices(scores.detach(), k)
