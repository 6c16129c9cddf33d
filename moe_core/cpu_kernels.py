"""C++ kernels for the CPU path, compiled on first use and cached (torch.utils.cpp_extension).

- `topk_indices` replaces torch.topk in the routers' top-k (csrc/topk.cpp says how it works: 1,024 x 64,
  k = 12 in 0.09-0.10 ms against torch.topk's 0.98, benchmarks/RESULTS.md);
- `cross_entropy` replaces F.cross_entropy in the language-modelling loss (csrc/cross_entropy.cpp: one
  exponential per logit, not torch's two; the same loss to float rounding);
- `route` replaces the score routers' softmax, top-k, gather and second softmax, forward and backward, with one
  pass per row each way (csrc/route.cpp; the same experts, the same weights and gradients to float rounding).

All split their rows over torch's threads (OpenMP, on Linux), each row computed whole by one thread, so any
thread count gives the same bits. The first call in a fresh environment compiles them (about 15 s, once;
later processes load the cached library). Where they cannot be built (no C++ compiler or ninja)
`available()` is False, with one warning saying why, and the callers fall back to torch operators. The
environment variable MOE_CORE_CPU_KERNELS picks: unset, build and fall back on failure; "0", off; "1",
required (a failed build raises; CI sets it).
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

from .config import ConfigError

ENV_SWITCH = "MOE_CORE_CPU_KERNELS"
_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = [_CSRC / name for name in ("topk.cpp", "cross_entropy.cpp", "route.cpp")]
# One build per torch version (torch's extension cache does not notice a torch upgrade, and a library built
# against another torch fails to load) and per checkout: ninja rebuilds when the sources' path changes, so
# two checkouts sharing one build folder would rebuild each other's library at every switch.
_NAME = (f"moe_core_cpu_kernels_{re.sub(r'[^0-9A-Za-z]', '_', torch.__version__)}_"
         f"{hashlib.sha1(str(_CSRC).encode()).hexdigest()[:8]}")
# -fno-trapping-math lets float selects vectorise; -fopenmp-simd reads the sources' `omp simd` loops
_FLAGS = ["-O3", "-fno-trapping-math", "-fopenmp-simd"]
# OpenMP lets the kernels' at::parallel_for split rows over torch's threads; built without it, they run on one.
# Asked for on Linux, where torch links GCC's libgomp and the library shares that copy (Apple's clang has no
# -fopenmp). A compiler that refuses it gets a second build without.
_OPENMP = ["-fopenmp"] if sys.platform.startswith("linux") and torch.backends.openmp.is_available() else []


def checked_switch() -> str:
    """$MOE_CORE_CPU_KERNELS ("" when unset); any other value than 0 or 1 is a ConfigError. The CLI checks
    it before any work, so a typo does not surface at the first kernel call, after the data is ready."""
    switch = os.environ.get(ENV_SWITCH, "")
    if switch not in ("", "0", "1"):
        raise ConfigError(ENV_SWITCH, switch, "use 0 (off), 1 (required) or leave it unset (use if it builds)")
    return switch


@functools.cache
def _loaded() -> str:
    """Build (or find in torch's cache) and load the library, once per process: "openmp" or "plain" (one
    thread), "" where switched off or where it fails to build."""
    switch = checked_switch()
    if switch == "0":
        return ""
    try:
        from torch.utils import cpp_extension
        _put_ninja_on_path()
        announced, started = not _is_built(cpp_extension), time.perf_counter()
        if announced:
            print(f"moe_core: compiling the CPU kernels ({', '.join(s.name for s in _SOURCES)}); once, about 15 s ...",
                  file=sys.stderr, flush=True)
        flavour = _build(cpp_extension)
        elapsed = time.perf_counter() - started
        if not announced and elapsed > 2.0:  # a cached build whose sources changed
            print(f"moe_core: rebuilt the CPU kernels in {elapsed:.0f} s (their sources changed)", file=sys.stderr,
                  flush=True)
    except Exception as err:  # any build failure: the torch fallback is correct, only slower
        if switch == "1":
            raise RuntimeError(f"{ENV_SWITCH}=1 but the CPU kernels did not build") from err
        warnings.warn(f"moe_core: the CPU kernels could not be built ({_reason(err)}); torch.topk, torch's softmax "
                      f"and F.cross_entropy run instead (same experts, the same weights and loss to float rounding; "
                      f"slower). Set {ENV_SWITCH}=0 to skip the attempt.", stacklevel=3)
        return ""
    torch.library.register_fake("moe_core::cpu_topk_indices", _topk_shape)  # the others run eager only
    return flavour


def _reason(err: Exception) -> str:
    """The line of a build failure that says why: the compiler's first error, else the message's first line."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "error:" in line), lines[0] if lines else type(err).__name__)


def _build(cpp_extension) -> str:
    """Build and load the library, with OpenMP where asked for, else (or if that build fails) without; returns
    which. A compiler that refused OpenMP once is not asked again (a note in the build folder remembers it)."""
    refusal = None
    if _openmp_flags(cpp_extension):
        try:
            _load(cpp_extension, _OPENMP)
            return "openmp"
        except Exception as err:
            refusal = _reason(err)
            print(f"moe_core: the CPU kernels did not build with OpenMP ({refusal}); building them without, so they "
                  f"run on one thread", file=sys.stderr, flush=True)
    _load(cpp_extension, [])
    note = _refusal_note(cpp_extension) if refusal else None
    if note is not None:  # written only once the build without OpenMP worked
        note.write_text(refusal + "\n")
    return "plain"


def _openmp_flags(cpp_extension) -> list[str]:
    """-fopenmp where it is asked for and the compiler has not refused it before."""
    note = _refusal_note(cpp_extension) if _OPENMP else None
    return [] if note is not None and note.exists() else _OPENMP


def _refusal_note(cpp_extension) -> Path | None:
    """Where a refusal of -fopenmp is remembered: the OpenMP build's folder in torch's extension cache."""
    try:
        return Path(cpp_extension._get_build_directory(_library_name(_OPENMP), verbose=False)) / "openmp_refused"
    except Exception:  # a private helper: if it moves, each process asks the compiler again
        return None


def _load(cpp_extension, openmp: list[str]) -> None:
    cpp_extension.load(name=_library_name(openmp), sources=[str(s) for s in _SOURCES], extra_cflags=_FLAGS + openmp,
                       extra_ldflags=list(openmp), is_python_module=False, verbose=False)  # load() extends the list


def _library_name(openmp: list[str]) -> str:
    return _NAME + ("_openmp" if openmp else "")


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
        name = _library_name(_openmp_flags(cpp_extension))
        return (Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper: if it moves, we only lose the message
        return True


@torch.compiler.assume_constant_result  # compiled code reads the answer; it does not trace the build
def available() -> bool:
    return bool(_loaded())


def threaded() -> bool:
    """Whether the loaded kernels split their rows over torch's threads (built with OpenMP)."""
    return _loaded() == "openmp"


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether x takes the CPU-only fast paths (these kernels, the complex RoPE, the one-node cosine router):
    a CPU tensor in eager code. Compiled code keeps the plain torch operations, which Inductor fuses."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column ids of the k largest entries of each row of a 2-d fp32 CPU tensor, largest first, ties to
    the lower column, NaN first, [N, k] int64. Call only where `available()`."""
    if scores.dim() != 2 or scores.dtype != torch.float32 or scores.device.type != "cpu":
        raise ValueError(f"topk_indices takes a 2-d fp32 CPU tensor, got {scores.dtype} {tuple(scores.shape)} "
                         f"on {scores.device}")
    if not 0 < k <= scores.shape[1]:
        raise ValueError(f"topk_indices needs 0 < k <= columns, got k={k}, columns={scores.shape[1]}")
    return torch.ops.moe_core.cpu_topk_indices(scores.detach(), k)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Per-row softmax cross-entropy of [N, V] logits; the forward keeps the softmax for the backward."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss, probs = torch.ops.moe_core.cpu_softmax_xent(logits, targets)
        ctx.save_for_backward(probs, targets)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs, targets = ctx.saved_tensors
        return torch.ops.moe_core.cpu_softmax_xent_backward(probs, targets, grad_loss), None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The mean softmax cross-entropy of fp32 CPU logits [N, V] against class ids [N], as F.cross_entropy
    (no ignored index, no smoothing), differentiable in the logits. Call only where `available()`."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError(f"cross_entropy takes 2-d fp32 CPU logits, got {logits.dtype} {tuple(logits.shape)} "
                         f"on {logits.device}")
    if targets.shape != logits.shape[:1] or targets.dtype != torch.long:
        raise ValueError(f"cross_entropy takes one int64 class id per row of the logits, got {targets.dtype} "
                         f"{tuple(targets.shape)} for {logits.shape[0]} rows")
    return _SoftmaxCrossEntropy.apply(logits, targets).mean()


class _Route(torch.autograd.Function):
    """A router's (softmax over all experts, top-k ids, weights) from its logits; the ids carry no gradient."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, k: int, renormalize: bool):
        probs, idx, weights = torch.ops.moe_core.cpu_route(logits, k, renormalize)
        ctx.mark_non_differentiable(idx)
        ctx.set_materialize_grads(False)  # an output that nothing used sends None, and the kernel skips it
        ctx.save_for_backward(probs, idx, weights)
        ctx.renormalize = renormalize
        return probs, idx, weights

    @staticmethod
    def backward(ctx, grad_probs, grad_idx, grad_weights):
        probs, idx, weights = ctx.saved_tensors
        grad = torch.ops.moe_core.cpu_route_backward(probs, idx, weights, grad_probs, grad_weights, ctx.renormalize)
        return grad, None, None


def route(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(softmax over all M, ids of the k largest logits, their weights) of fp32 CPU logits [N, M], as
    `routing.select_top_k_torch` computes them with torch operators; differentiable in the logits. Call only where
    `available()`."""
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.device.type != "cpu":
        raise ValueError(f"route takes 2-d fp32 CPU logits, got {logits.dtype} {tuple(logits.shape)} on {logits.device}")
    if not 0 < k <= logits.shape[1]:
        raise ValueError(f"route needs 0 < k <= columns, got k={k}, columns={logits.shape[1]}")
    return _Route.apply(logits, k, renormalize)
