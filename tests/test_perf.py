"""Training-efficiency pieces: model FLOPs, the parallel grid, compile parity, threads, MFU logging."""
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from moe_core.config import ConfigError
from moe_core.experiments import RunSpec, grid_workers, run_grid
from moe_core.model import MoETransformer
from moe_core import perf
from moe_core.perf import matmul_peak_flops, train_flops_per_token
from moe_core.train import Objective, cpu_threads, make_optimizer, optimizer_step, use_compile
from moe_core.variants import resolve, variants

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"train": {"steps": 4, "eval_every": 4, "checkpoint_every": 4, "threads": 1}}


def test_dense_flops_follow_the_6n_rule():
    """A dense model: 6 FLOPs per weight per token (embedding used once, as the LM head) + attention."""
    m = resolve("dense_iso_param", "tiny").model
    weights = m.n_layers * (4 * m.d_model ** 2 + 2 * m.d_model * m.d_ff) + m.d_model * m.vocab_size
    assert train_flops_per_token(m, 64) == 6 * weights + 12 * m.n_layers * m.d_model * 64


def test_moe_flops_count_active_experts_and_every_routing_decision():
    wide, deep = resolve("wide", "smoke").model, resolve("deep", "smoke").model
    d, M, s = wide.d_model, wide.n_experts, wide.d_space
    per_layer = {"wide": 1 * ((s * d + M * s) + 12 * 2 * d), "deep": 3 * ((s * d + M * s) + 4 * 2 * d)}
    base = 6 * (wide.n_layers * 4 * d * d + d * wide.vocab_size) + 12 * wide.n_layers * d * 64
    assert train_flops_per_token(wide, 64) == base + 6 * wide.n_layers * per_layer["wide"]
    assert train_flops_per_token(deep, 64) == base + 6 * deep.n_layers * per_layer["deep"]
    assert train_flops_per_token(resolve("hash", "smoke").model, 64) < train_flops_per_token(wide, 64)


def test_decision_forcing_routes_once_per_block():
    indep, monob = resolve("indep", "smoke").model, resolve("monob4", "smoke").model
    routing = monob.n_experts * monob.d_model  # a linear router's multiply-adds per decision
    assert train_flops_per_token(indep, 64) - train_flops_per_token(monob, 64) == 6 * routing * (8 - 2)


def test_matmul_peak_stops_growing_at_a_slow_size(monkeypatch):
    """budget_s = 0: every size counts as slow, so only the first is measured."""
    sizes = []
    randn = torch.randn
    monkeypatch.setattr(perf, "_peak_sizes", lambda device: (64, 128))
    monkeypatch.setattr(perf.torch, "randn", lambda n, *a, **k: sizes.append(n) or randn(n, *a, **k))
    assert perf.matmul_peak_flops.__wrapped__("cpu", torch.float32, 1, budget_s=0.0) > 0
    assert sizes == [64, 64]  # a and b of the first size only
    sizes.clear()
    assert perf.matmul_peak_flops.__wrapped__("cpu", torch.float32, 1, budget_s=60.0) > 0
    assert sizes == [64, 64, 128, 128]


def test_matmul_peak_is_positive_and_cached():
    first = matmul_peak_flops("cpu", torch.float32, torch.get_num_threads())
    assert first > 1e8 and matmul_peak_flops("cpu", torch.float32, torch.get_num_threads()) == first


@pytest.mark.parametrize("variant", ["wide", "hash"])
def test_compiled_objective_matches_eager(variant):
    cfg = resolve(variant, "tiny")
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    compiled, stats = torch.compile(Objective(model, cfg))(x, x)
    compiled_grads = torch.autograd.grad(compiled, params, allow_unused=True)
    eager, eager_stats = Objective(model, cfg)(x, x)
    eager_grads = torch.autograd.grad(eager, params, allow_unused=True)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(stats, eager_stats)
    for got, expected in zip(compiled_grads, eager_grads, strict=True):  # the compiled backward too
        assert (got is None) == (expected is None)
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def tiny_objective(variant: str, device: str = "cpu", overrides: dict | None = None):
    """The `tiny` configuration of `variant`, its training objective (weights of seed 0) and 4 x 16 token ids."""
    cfg = resolve(variant, "tiny", overrides=overrides or {})
    torch.manual_seed(0)
    objective = Objective(MoETransformer(cfg.model).to(device), cfg)
    x = torch.randint(0, cfg.model.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0)).to(device)
    return cfg, objective, x


@pytest.mark.parametrize("variant", list(variants()))
def test_every_variant_compiles_to_one_graph(variant):
    """torch.compile (the CUDA default) traces the whole training objective, fused micro-batches and bf16
    autocast included, as one forward graph and one backward graph, as Inductor would get them: no graph
    break, hence no host sync inside the step. The trainer compiles without fullgraph, which would capture
    some breaking ops (bincount) instead of breaking, so compilers that count the graphs and run them
    unchanged check the tracing alone. On the CPU, and on CUDA too where there is a GPU (other kernels and
    backends run there)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def counting(graphs: list):
        def compiler(graph_module, example_inputs):
            graphs.append(graph_module)
            return make_boxed_func(graph_module.forward)
        return compiler
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        _, objective, x = tiny_objective(variant, device)
        forward, backward = [], []
        torch._dynamo.reset()
        backend = aot_autograd(fw_compiler=counting(forward), bw_compiler=counting(backward))
        compiled = torch.compile(objective, backend=backend)
        with torch.autocast(device, dtype=torch.bfloat16):
            loss, stats = compiled(x, x, 2)
        loss.backward()
        assert (len(forward), len(backward)) == (1, 1), device
        assert torch.isfinite(loss) and stats.shape == (2,)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in objective.model.parameters())


class MetaTensorOps(TorchDispatchMode):
    """Records every operator that takes or makes a tensor on the meta device."""

    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(x, torch.Tensor) and x.is_meta for x in tree_leaves((args, kwargs, out))):
            self.ops.add(str(func))
        return out


def test_every_variant_makes_its_tensors_on_its_inputs_device():
    """A tensor the training step makes without naming a device lands on the host; on a GPU it must then be
    copied over, and a blocking copy to the GPU waits for all the work queued there. (A zero of the auxiliary
    loss did so in every eager CUDA step before this test.) Here the step (objective, backward, clipping,
    AdamW) runs on CPU tensors with meta as the default device, so such a tensor would be a meta tensor, which
    the dispatch mode sees."""
    for variant in variants():
        cfg, objective, x = tiny_objective(variant, overrides={"train": {"accum_steps": 2, "micro_batches": "fused"}})
        optimizer = make_optimizer(objective.model, cfg.train, torch.device("cpu"))
        meta_ops = MetaTensorOps()
        with torch.device("meta"), meta_ops:
            try:
                loss, stats = objective(x, x, 2)
                loss.backward()
                optimizer_step(objective.model, optimizer, cfg.train.grad_clip)
            except (NotImplementedError, RuntimeError) as error:  # a meta tensor met the host's
                pytest.fail(f"{variant}: tensors made on the default device, in {sorted(meta_ops.ops)}: {error}")
        assert not meta_ops.ops, (variant, sorted(meta_ops.ops))
        assert torch.isfinite(loss) and stats.device.type == "cpu"


def test_compile_defaults_to_cuda_only():
    t = resolve("wide", "paper").train
    assert t.compile == "auto"
    assert use_compile(t, torch.device("cuda")) and not use_compile(t, torch.device("cpu"))
    with pytest.raises(ConfigError, match="train.compile"):
        resolve("wide", "tiny", overrides={"train": {"compile": "yes"}})


def test_cpu_threads_restores_the_callers_setting():
    before = torch.get_num_threads()
    with cpu_threads(2):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before
    with cpu_threads(0):
        assert torch.get_num_threads() == before


def test_grid_workers_follow_threads(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)), raising=False)
    one = resolve("wide", "tiny", overrides={"train": {"threads": 1}})
    two = resolve("wide", "tiny", overrides={"train": {"threads": 2}})
    assert grid_workers([one, one]) == 8 and grid_workers([two]) == 4
    assert grid_workers([resolve("wide", "tiny")]) == 1  # threads 0: torch's default takes every core
    assert grid_workers([one, two]) == 1


def test_parallel_grid_equals_serial_grid(tmp_path, shared_cache, monkeypatch):
    """Two runs trained at once in spawned processes give the numbers a serial grid gives, and log MFU."""
    monkeypatch.setenv("MOE_CORE_CACHE", str(shared_cache))
    specs = [RunSpec("wide", 42, FAST), RunSpec("hash", 42, FAST)]
    parallel = run_grid(specs, "tiny", tmp_path / "parallel", workers=2)
    serial = run_grid(specs, "tiny", tmp_path / "serial", workers=1)
    assert not parallel.cached.any() and not serial.cached.any()
    assert parallel.val_loss.tolist() == serial.val_loss.tolist()
    again = run_grid(specs, "tiny", tmp_path / "parallel", workers=2)
    assert again.cached.all() and again.val_loss.tolist() == parallel.val_loss.tolist()
    records = [json.loads(line) for line in open(f"{parallel.run_dir[0]}/metrics.jsonl")]
    mfu = [r["mfu"] for r in records if "mfu" in r]
    assert mfu and all(0 < v < 1 for v in mfu)


def test_benchmark_harness_reports_every_ratio(capsys):
    """benchmarks/run.py runs end to end (here at the tiny profile) and ends with the JSON line."""
    from run import main
    main(["--profile", "tiny", "--device", "cpu", "--steps", "1", "--rounds", "1", "--warmup", "1", "--repeats", "1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("wide_step_over_dense_iso_param", "deep_step_over_dense_iso_param",
                "grouped_dispatch_speedup_e32", "dense_mfu", "topk_speedup", "decision_speedup", "cross_entropy_speedup"):
        assert summary[key] > 0
    assert set(summary["steps"]) >= {"dense_iso_param", "wide", "deep"}
    for table, backends in (("swiglu_dispatch", {"loop", "sorted", "grouped", "masked"}),
                            ("rank_dispatch", {"loop", "gather", "masked"})):
        for row in summary[table].values():  # every backend's measured peak memory
            assert set(row["peak_bytes"]) == backends and min(row["peak_bytes"].values()) > 0
    # what the backends materialise: masked SwiGLU runs every expert on every token, masked rank-1 experts
    # activate all M, gather holds k rows per token whatever M is
    masked = [row["peak_bytes"]["masked"] for row in summary["swiglu_dispatch"].values()]  # E = 16, 32, 64
    assert masked == sorted(masked) and masked[2] > 2 * masked[0]
    small, large = summary["rank_dispatch"].values()  # the profile's M, then M = 1,024
    assert small["peak_bytes"]["gather"] == large["peak_bytes"]["gather"]
    assert large["peak_bytes"]["masked"] > 2 * small["peak_bytes"]["masked"]


def test_peak_bytes_counts_the_tensors_alive_at_once_backward_included():
    """The benchmark's memory measure: the most bytes of tensors created by the call alive at one time."""
    from run import peak_bytes

    def allocate():
        a = torch.empty(1 << 18)  # 1 MiB of fp32
        b = torch.empty(1 << 19)  # 2 MiB, while a lives: 3 MiB
        del a
        c = torch.empty(1 << 18)  # 3 MiB again, not 4: a's bytes were freed
        return b, c
    assert peak_bytes(allocate) == 3 << 20
    x = torch.randn(256, requires_grad=True)  # 1 KiB
    forward_only = peak_bytes(lambda: x.exp().sum())
    with_backward = peak_bytes(lambda: x.exp().sum().backward())  # exp's output lives on for the backward
    # forward: exp's output, the sum; backward: the sum's unit gradient and exp's input gradient (x.grad)
    assert forward_only == 1024 + 4 and with_backward == 1024 + 4 + 4 + 1024


def test_rank_crossover_reports_each_case(capsys):
    """benchmarks/rank_crossover.py times both rank-1 backends per (k, M) and says which one auto picks."""
    from rank_crossover import main
    threads = torch.get_num_threads()
    main(["--d-model", "8", "--tokens", "16", "--top-k", "1", "4", "--experts", "2", "8", "128", "--repeats", "1",
          "--threads", "1"])
    assert torch.get_num_threads() == threads, "the caller's thread count is restored"
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(r["k"], r["experts"], r["auto"]) for r in summary["rows"]] == [
        (1, 2, "masked"), (1, 8, "masked"), (1, 128, "gather"), (4, 8, "masked"), (4, 128, "masked")]  # k <= M only
    assert all(r["masked_ms"] > 0 and r["gather_ms"] > 0 for r in summary["rows"]) and summary["cases"] == 5


@pytest.mark.parametrize("argv,message", [
    (["--variants", "wider"], "invalid variant='wider'"),
    (["--profile", "huge"], "invalid profile='huge'"),
    (["--set", "train.lr=-1"], "train.lr"),
])
def test_benchmark_rejects_bad_input_before_timing(argv, message, capsys):
    from run import main
    with pytest.raises(SystemExit) as stop:
        main(["--device", "cpu", *argv])
    out, err = capsys.readouterr()
    assert stop.value.code == 2 and message in err  # the moe_core command line's status for bad input
    assert "matmul peak" not in out  # stopped before the first measurement
