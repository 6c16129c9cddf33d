"""Training end to end on the bundled corpus: the loss falls, runs resume exactly, finished runs are cached."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moe_core import store
from moe_core.experiments import metrics, step_losses
from moe_core.model import MoETransformer
from moe_core.routing import router_z_loss, switch_balance_loss
from moe_core.train import Objective, Trainer, autocast_for, auxiliary_loss, lr_at, optimizer_step, train
from moe_core.variants import resolve


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def initial_val_loss(cfg, root, cache):
    trainer = Trainer(cfg, root, cache, progress=False)
    from moe_core.evaluate import evaluate
    return evaluate(trainer.model, trainer.val, trainer.device)["val_loss"]


@pytest.mark.parametrize("variant", ["wide", "deep", "linear", "hash", "dense_iso_param", "path_b4"])
def test_short_training_lowers_the_validation_loss(variant, tmp_path, cache):
    cfg = resolve(variant, "tiny", overrides={"train": {"steps": 40}})
    before = initial_val_loss(cfg, tmp_path, cache)
    result = train(cfg, tmp_path, cache, progress=False)
    assert result["val_loss"] < before - 0.3, (before, result["val_loss"])
    run = tmp_path / result["run_dir"].split("/")[-1]
    losses = json.loads((run / "val_batch_losses.json").read_text())
    assert len(losses) == cfg.train.eval_batches
    assert abs(sum(losses) / len(losses) - result["val_loss"]) < 1e-9
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 40 and "val_loss" in metrics[-1]
    if variant != "dense_iso_param":
        telemetry = load_file(run / "telemetry.safetensors")
        hops = cfg.model.hops_per_layer()
        ids = [k for k in telemetry if k.startswith("ids.")]
        assert len(ids) == sum(hops)
        assert telemetry["ids.layer0.hop0"].shape == (cfg.train.telemetry_seqs * cfg.train.seq_len, cfg.model.top_k)


def test_resumed_run_ends_with_the_same_weights(tmp_path, cache):
    cfg = resolve("deep", "tiny", overrides={"train": {"steps": 24, "checkpoint_every": 8, "eval_every": 8},
                                             "model": {"dropout": 0.1}})
    straight = train(cfg, tmp_path / "a", cache, progress=False)
    assert train(cfg, tmp_path / "b", cache, progress=False, stop_at=13) is None
    run_b = store.run_dir(cfg, tmp_path / "b")
    assert sorted(p.name for p in run_b.glob("ckpt-*.json")) == ["ckpt-0000008.json", "ckpt-0000013.json"]
    resumed = train(cfg, tmp_path / "b", cache, progress=False)
    assert resumed["val_loss"] == straight["val_loss"]
    a = load_file(store.run_dir(cfg, tmp_path / "a") / "final.safetensors")
    b = load_file(run_b / "final.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    lines = lambda root: (store.run_dir(cfg, root) / "metrics.jsonl").read_text()
    assert lines(tmp_path / "a") .count('"step": 8,') == lines(tmp_path / "b").count('"step": 8,')


def test_every_steps_loss_is_logged_and_survives_a_resume(tmp_path, cache):
    """Past 400 steps the log has a line every few steps; each line carries the losses of the steps since
    the line before, and a run paused between two lines writes the same log as one trained straight."""
    cfg = resolve("dense_iso_param", "tiny", overrides={"train": {"steps": 402, "checkpoint_every": 1000,
                                                                  "eval_every": 1000}})
    train(cfg, tmp_path / "a", cache, progress=False)
    assert train(cfg, tmp_path / "b", cache, progress=False, stop_at=201) is None  # lines at even steps
    assert len(store.read_json(store.run_dir(cfg, tmp_path / "b") / "ckpt-0000201.json")["step_losses"]) == 1
    train(cfg, tmp_path / "b", cache, progress=False)
    logs = [metrics(store.run_dir(cfg, tmp_path / root))[0] for root in ("a", "b")]
    timing = ["tokens_per_s", "mfu", "train_seconds"]
    assert logs[0].drop(columns=timing).equals(logs[1].drop(columns=timing))
    log = logs[0]
    assert log["step"].tolist() == list(range(2, 403, 2))
    assert all(len(w) == 2 and w[-1] == loss for w, loss in zip(log["step_losses"], log["loss"]))
    every = step_losses(log)
    assert every.index.tolist() == list(range(1, 403)) and every[402] == log["loss"].iloc[-1]
    assert every.loc[log["step"]].tolist() == log["loss"].tolist()


def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, cache):
    cfg = resolve("wide", "tiny", overrides={"train": {"steps": 20, "checkpoint_every": 5}})
    train(cfg, tmp_path, cache, progress=False, stop_at=12)
    run = store.run_dir(cfg, tmp_path)
    newest = sorted(run.glob("ckpt-*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    meta, _ = store.latest_checkpoint(run)
    assert meta["step"] == 10
    assert train(cfg, tmp_path, cache, progress=False)["steps"] == 20


def test_finished_run_is_not_retrained(tmp_path, cache, monkeypatch):
    cfg = resolve("hash", "tiny", overrides={"train": {"steps": 5}})
    first = train(cfg, tmp_path, cache, progress=False)
    assert first["cached"] is False
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a finished run was retrained"))
    again = train(cfg, tmp_path, cache, progress=False)
    assert again["cached"] is True and again["val_loss"] == first["val_loss"]


def test_throughput_counts_training_steps_only(tmp_path, cache, monkeypatch):
    """With a clock that advances one second per training step, and five seconds in every log write, peak
    measurement, evaluation and checkpoint, the logged tokens/s is exactly tokens_per_step and train_seconds
    the step count, though evals and checkpoints fall between logs."""
    import types

    from moe_core import train as train_module

    clock = [0.0]
    monkeypatch.setattr(train_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    step = Trainer.train_step

    def one_second_step(self, s):
        out = step(self, s)
        clock[0] += 1.0
        return out

    monkeypatch.setattr(Trainer, "train_step", one_second_step)

    def slow(function):
        def wrapped(*args, **kwargs):
            clock[0] += 5.0
            return function(*args, **kwargs)
        return wrapped

    for name in ("log", "checkpoint", "peak_flops"):
        monkeypatch.setattr(Trainer, name, slow(getattr(Trainer, name)))
    monkeypatch.setattr(train_module, "evaluate", slow(train_module.evaluate))
    cfg = resolve("wide", "tiny", 5, {"train": {"steps": 400, "eval_every": 15, "checkpoint_every": 7}})
    result = train(cfg, tmp_path, cache, progress=False)  # logs every 2 steps; evals at 15, 45, ...
    logged = [json.loads(line) for line in (tmp_path / result["run_dir"] / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["tokens_per_s"] for r in logged if "tokens_per_s" in r}
    assert set(rates.values()) == {cfg.train.tokens_per_step} and len(rates) == 200
    assert result["train_seconds"] == 400.0


def test_learning_rate_schedule():
    t = resolve("wide", "paper").train
    assert lr_at(0, t) == pytest.approx(3e-7)
    assert lr_at(999, t) == pytest.approx(3e-4)
    assert lr_at(t.steps, t) == pytest.approx(3e-5)
    assert lr_at(1000 + (t.steps - 1000) // 2, t) == pytest.approx(3e-4 * 0.55, rel=1e-3)


def run_cli(*args, env_root):
    return subprocess.run([sys.executable, "-m", "moe_core", *args], capture_output=True, text=True,
                          env={**__import__("os").environ, "MOE_CORE_RUNS": str(env_root / "runs"),
                               "MOE_CORE_CACHE": str(env_root / "cache")})


def test_cli_list_params_train_eval(tmp_path, cache):
    listed = run_cli("list", env_root=tmp_path)
    assert listed.returncode == 0 and "path_b4" in listed.stdout and "wiki-vital" in listed.stdout
    params = json.loads(run_cli("params", "--variant", "wide", "--profile", "paper", env_root=tmp_path).stdout)
    assert params["total"] == 84_740_096 and params["routing"] == 1_572_864 and params["paper_total"] == 84_742_144
    trained = run_cli("train", "--variant", "deep", "--profile", "tiny", "--seed", "3", "--steps", "6",
                      "--no-progress", env_root=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    assert {"run_dir", "val_loss", "val_ppl", "tokens_per_s", "cached"} <= result.keys()
    hops = {}
    for flags in ((), ("--halt-eps", "1e9")):  # a threshold no update passes: every token stops after one hop
        evaluated = run_cli("eval", result["run_dir"], *flags, env_root=tmp_path)
        assert evaluated.returncode == 0, evaluated.stderr
        hops[flags] = json.loads(evaluated.stdout.strip().splitlines()[-1])["mean_hops"]
    assert list(hops.values()) == [3.0, 1.0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_eval_runs_where_the_run_trained_or_on_the_cpu_without_cuda(tmp_path, cache, capsys):
    from moe_core.__main__ import main

    result = train(resolve("wide", "tiny", overrides={"train": {"steps": 3}}), tmp_path, cache, progress=False)
    assert main(["eval", result["run_dir"], "--cache-dir", str(cache)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["val_loss"] == result["val_loss"] and "eval:" not in err
    store.write_json(Path(result["run_dir"]) / "results.json", {**result, "device": "cuda:0"})  # as if from a GPU
    assert main(["eval", result["run_dir"], "--cache-dir", str(cache)]) == 0
    assert "the run trained on CUDA and this machine has none; evaluating on the CPU" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["train", "--variant", "wider", "--profile", "tiny"], "valid variants:"),
    (["train", "--variant", "wide", "--profile", "tiny", "--steps", "-3"], "train.steps"),
    (["train", "--variant", "wide", "--profile", "tiny", "--corpus", "wikipedia"], "valid corpora:"),
    (["params", "--variant", "wide", "--profile", "laptop"], "valid profiles:"),
    (["train", "--variant", "wide", "--profile", "tiny", "--set", "eval_batches"], "write section.key=value"),
    (["train", "--variant", "wide", "--profile", "tiny", "--set", "train.eval_batch=2"], "valid keys:"),
    (["train", "--variant", "wide", "--profile", "tiny", "--set", "trian.steps=2"], "valid override sections:"),
])
def test_cli_rejects_bad_input_before_any_work(args, message, tmp_path):
    out = run_cli(*args, env_root=tmp_path)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_set_overrides_any_key():
    from moe_core.__main__ import parser, run_overrides

    args = parser().parse_args(["train", "--variant", "wide", "--profile", "tiny", "--set", "train.eval_batches=2",
                                "--set", "train.compile=off", "--set", "model.dropout=0.1", "--steps", "4",
                                "--set", "train.lr=1e-3", "--set", "train.weight_decay=5E-2"])
    cfg = resolve("wide", "tiny", 42, run_overrides(args))
    assert (cfg.train.eval_batches, cfg.train.compile, cfg.model.dropout, cfg.train.steps) == (2, "off", 0.1, 4)
    assert (cfg.train.lr, cfg.train.weight_decay) == (1e-3, 5e-2)  # YAML 1.1 alone reads 1e-3 as a string


@pytest.mark.parametrize("variant", ["deep", "path_b4"])
def test_fused_micro_batches_take_the_sequential_step(variant, tmp_path, cache):
    """train.micro_batches=fused runs the accum_steps micro-batches as one batch with the balance loss
    still per micro-batch: the same update as accumulating them one by one, up to float rounding."""
    grads, stats, calls = [], [], {}
    for mode in ("sequential", "fused"):
        cfg = resolve(variant, "tiny", overrides={"train": {"accum_steps": 3, "micro_batches": mode,
                                                            "balance_events": "per_layer"}})
        trainer = Trainer(cfg, tmp_path / mode, cache, progress=False)
        named = list(trainer.model.named_parameters())
        grads.append({})  # what the optimizer would apply (compared before Adam's sign-like first step)
        trainer.optimizer.step = lambda: grads[-1].update({k: p.grad.clone() for k, p in named if p.grad is not None})
        step_fn, calls[mode] = trainer.step_fn, []
        trainer.step_fn = lambda x, y, groups, log=calls[mode], fn=step_fn: log.append((tuple(x.shape), groups)) or fn(x, y, groups)
        stats.append(trainer.train_step(0))
    b, t = cfg.train.batch_size, cfg.train.seq_len
    assert calls == {"sequential": [((b, t), 1)] * 3, "fused": [((3 * b, t), 3)]}  # fused really is one call
    for key in ("loss", "balance", "grad_norm"):
        torch.testing.assert_close(stats[1][key], stats[0][key], rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for key, value in grads[0].items():
        torch.testing.assert_close(grads[1][key], value, rtol=1e-4, atol=1e-7, msg=key)
    fused_balance = stats[1]["balance"]
    cfg = resolve(variant, "tiny", overrides={"train": {"accum_steps": 1, "batch_size": 24, "balance_events": "per_layer"}})
    whole = Trainer(cfg, tmp_path / "whole", cache, progress=False).train_step(0)["balance"]
    assert not torch.allclose(whole, fused_balance), "one balance loss over the whole batch is a different objective"


def test_balance_and_z_loss_options_train(tmp_path, cache):
    cfg = resolve("deep", "tiny", overrides={"train": {"steps": 3, "balance_events": "per_layer",
                                                       "balance_reduce": "sum", "z_loss_coef": 1e-3}})
    result = train(cfg, tmp_path, cache, progress=False)
    run = store.run_dir(cfg, tmp_path)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "balance" in line]
    # summed over 4 layers: about 4x the per-event value of 1 for a balanced router
    assert logged and all(2.0 < rec["balance"] < 4 * cfg.model.n_experts for rec in logged)
    assert result["val_loss"] > 0


def test_balance_loss_options_pool_and_reduce_the_routing_events_as_named():
    """per_hop: one loss per (layer, hop); per_layer: one per layer over its hops pooled; then mean or sum.
    The pools are built here by hand (the loss of one pool is tested against the textbook formula in
    test_routing.py). The four combinations give four different numbers, so an ignored option would show."""
    base = resolve("asymmetric", "tiny")  # layers of 1 to 3 hops: per_layer pools differently sized groups
    torch.manual_seed(0)
    model = MoETransformer(base.model).eval()
    x = torch.randint(0, base.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        events = model(x, x).events
    layers = sorted({e.layer for e in events})
    per_hop = torch.stack([switch_balance_loss([e.routing], base.model.n_experts) for e in events])
    per_layer = torch.stack([switch_balance_loss([e.routing for e in events if e.layer == layer], base.model.n_experts)
                             for layer in layers])
    got = {}
    for pooling, terms in (("per_hop", per_hop), ("per_layer", per_layer)):
        for reduce in ("mean", "sum"):
            cfg = resolve("asymmetric", "tiny", overrides={"train": {"balance_events": pooling, "balance_reduce": reduce}})
            with torch.no_grad():
                got[pooling, reduce] = auxiliary_loss(events, cfg, torch.device("cpu"))[0].item()
            assert got[pooling, reduce] == pytest.approx((terms.mean() if reduce == "mean" else terms.sum()).item(), rel=1e-6)
    assert len(per_hop) > len(per_layer) > 1 and len(set(got.values())) == 4


def test_objective_adds_each_auxiliary_term_with_its_coefficient():
    """loss = cross-entropy + balance_coef * balance + z_loss_coef * (mean z-loss over the routing events)."""
    cfg = resolve("wide", "tiny", overrides={"train": {"balance_coef": 0.25, "z_loss_coef": 0.5}})
    torch.manual_seed(0)
    model = MoETransformer(cfg.model).eval()  # no dropout: every forward below sees the same network
    x = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    loss, (ce, balance) = Objective(model, cfg)(x, x)
    z = torch.stack([router_z_loss(e.routing) for e in model(x, x).events]).mean()
    assert z > 1e-3 and balance > 0.5  # both terms are large enough to show
    torch.testing.assert_close(loss, ce + 0.25 * balance + 0.5 * z)


@pytest.mark.parametrize("grad_clip", [0.0, 0.5])
def test_optimizer_step_clips_only_when_asked(grad_clip):
    """grad_clip = 0 means no clipping (not a zero norm): the trainer and the benchmark share this step."""
    layer = torch.nn.Linear(4, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    layer.weight.grad = torch.full_like(layer.weight, 2.0)  # norm 4
    norm = optimizer_step(layer, torch.optim.SGD(layer.parameters(), lr=1.0), grad_clip)
    assert norm.item() == 4.0 and layer.weight.grad is None
    torch.testing.assert_close(layer.weight, torch.full_like(layer.weight, -2.0 * (grad_clip / 4 if grad_clip else 1)))


@pytest.mark.parametrize("variant", ["wide", "deep", "path_b4"])
def test_bf16_autocast_trains_on_cpu_close_to_fp32(variant, tmp_path, cache):
    """train.precision=bf16 on a CPU takes the GPU recipe's mixed-precision path (autocast; the router in
    fp32; the real-arithmetic RoPE; bf16 grouped GEMMs for FFN experts): it must train, and land near fp32."""
    losses = {}
    for precision in ("fp32", "bf16"):
        cfg = resolve(variant, "tiny", overrides={"train": {"steps": 6, "eval_every": 6, "checkpoint_every": 6,
                                                            "precision": precision}})
        losses[precision] = train(cfg, tmp_path, cache, progress=False)["val_loss"]
    assert losses["bf16"] != losses["fp32"], "autocast changed nothing: bf16 did not run"
    assert abs(losses["bf16"] - losses["fp32"]) < 0.05, losses


@pytest.mark.parametrize("variant", ["wide", "deep", "path_b4"])
def test_bf16_autocast_gradients_stay_close_to_fp32(variant):
    """Every parameter's gradient of one step under bf16 autocast, against fp32: relative error under 0.08
    (measured at most 0.028 here, the routers' included). A bug confined to the MoE (a wrong gate, an expert
    without gradient) moves the final loss of a short run far less than the 0.05 the test above allows."""
    cfg = resolve(variant, "tiny")
    torch.manual_seed(0)
    model = MoETransformer(cfg.model)
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, cfg.model.vocab_size, (8, 32), generator=g) for _ in range(2))
    grads = {}
    for precision in ("fp32", "bf16"):
        model.zero_grad()
        with autocast_for(torch.device("cpu"), precision):
            loss, _ = Objective(model, cfg)(x, y)
        loss.backward()
        grads[precision] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads["bf16"].keys() == grads["fp32"].keys() and any(".experts." in n for n in grads["fp32"])
    for name, reference in grads["fp32"].items():
        assert reference.norm() > 0, name
        error = ((grads["bf16"][name] - reference).norm() / reference.norm()).item()
        assert error < 0.08, (name, error)


def test_sweep_trains_only_its_shard(tmp_path, cache, capsys):
    from moe_core.__main__ import main

    argv = ["sweep", "--variant", "hash", "dense_iso_flop", "hash", "--profile", "tiny", "--seed", "1", "2", "2",
            "--shard", "1/2", "--steps", "2", "--run-root", str(tmp_path), "--cache-dir", str(cache), "--no-progress"]
    assert main(argv) == 0  # repeated names and seeds count once: 4 runs, of which this shard trains 2
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["shard"] == "1/2"
    assert [(r["variant"], r["seed"]) for r in result["runs"]] == [("hash", 2), ("dense_iso_flop", 2)]
    assert sorted(p.name.split("_s")[0] for p in tmp_path.iterdir()) == ["dense_iso_flop_tiny", "hash_tiny"]
    assert main([a if a != "1/2" else "5/6" for a in argv]) == 0
    assert "sweep: shard 5/6 holds none of the 4 runs" in capsys.readouterr().err

    hash_run, dense_run = (r["run_dir"] for r in result["runs"])  # interventions a model cannot take
    assert main(["eval", dense_run, "--zero-moe", "--cache-dir", str(cache)]) == 2
    assert f"invalid run_dir={dense_run!r}: a dense model, with no MoE layer for --zero-moe to act on" in capsys.readouterr().err
    assert main(["eval", hash_run, "--halt-eps", "0.1", "--cache-dir", str(cache)]) == 0
    assert "--halt-eps changes nothing on a model with one hop per layer" in capsys.readouterr().err


def test_freed_memory_is_reused_without_page_faults():
    """keep_freed_memory(): big CPU tensors allocated and freed step after step fault in no new pages
    (without it glibc trims its heap and every round faults them in again, about 8,000 faults here).
    Counted per round: a rare round that faults because the host reclaimed a block is tolerated."""
    pytest.importorskip("resource")
    script = """
import resource, torch
from moe_core.train import keep_freed_memory
print(keep_freed_memory())
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # the first rounds grow the heap
    blocks = [torch.ones(1 << 21) for _ in range(4)]; del blocks
for _ in range(10):  # four 8 MiB tensors alive together, then freed, as a step's logits and gradients are
    before = faults()
    blocks = [torch.ones(1 << 21) for _ in range(4)]; del blocks
    print(faults() - before)
"""
    applied, *rounds = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    if applied != "True":
        pytest.skip("the C library has no glibc mallopt")
    faulting = [int(n) for n in rounds if int(n) >= 100]
    assert len(faulting) <= 2, rounds


def test_training_into_a_log_file_writes_its_bar_as_lines(tmp_path, cache, capsys):
    train(resolve("wide", "tiny", overrides={"train": {"steps": 3}}), tmp_path, cache)  # pytest's stderr is no terminal
    err = capsys.readouterr().err
    bar = [line for line in err.splitlines() if line.startswith("wide/tiny/s42:")]
    assert "\r" not in err and "0/3" in bar[0] and "3/3" in bar[-1] and "loss=" in bar[-1]
