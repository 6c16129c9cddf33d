"""The CUDA path: bf16 autocast training with compile, the Triton top-k at the paper's shape and compiled, the
benchmark. Skipped without a GPU. The bf16 dispatch parity tests (tests/test_experts.py) and the Triton top-k's
contract (tests/test_kernels.py: ties, NaN, -inf) run on CPU and CUDA alike."""
import pytest
import torch

from moe_core.routing import top_k_indices
from moe_core.train import train
from moe_core.variants import resolve

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FAST = {"train": {"steps": 6, "eval_every": 6, "checkpoint_every": 6, "device": "cuda"}}


@pytest.mark.parametrize("variant", ["wide", "deep", "hash", "indep", "dense_iso_param"])
def test_tiny_runs_train_in_bf16_with_compile(variant, tmp_path, shared_cache):
    cfg = resolve(variant, "tiny", overrides=FAST)
    assert cfg.train.compile == "auto"  # compiles on CUDA
    result = train(cfg, tmp_path, shared_cache, progress=False)
    assert result["device"].startswith("cuda") and 0 < result["val_ppl"] < cfg.model.vocab_size * 2


@pytest.mark.parametrize("rows,cols,k", [(32768, 1024, 12), (4096, 1024, 4), (1000, 64, 12), (77, 1000, 12),
                                         (5, 17, 17), (300, 8192, 1)])
def test_triton_top_k_matches_torch(rows, cols, k):
    pytest.importorskip("triton")
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(rows)).cuda()
    got = top_k_indices(scores, k)
    assert torch.equal(scores.gather(-1, got), scores.topk(k, dim=-1).values)  # ties may order differently
    assert (got.sort(-1).values.diff(dim=-1) > 0).all(), "distinct columns"
    compiled = torch.compile(lambda s: s.gather(-1, top_k_indices(s, k)))
    assert torch.equal(compiled(scores), scores.topk(k, dim=-1).values)


def test_benchmark_runs_on_cuda():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from run import main
    summary = main(["--profile", "tiny", "--device", "cuda", "--steps", "2", "--rounds", "2", "--repeats", "2"])
    assert summary["dense_mfu"] > 0 and summary["grouped_dispatch_speedup_e32"] > 0
