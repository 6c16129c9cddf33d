"""Reliability: runs killed at any point resume exactly, damaged checkpoints are skipped, training
is bit-identical across processes, bad inputs are rejected cleanly (fuzzed), one process trains a
run at a time, a non-finite loss stops a run for good, and hub corpora fail fast offline."""
import dataclasses
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from moe_core import store
from moe_core.__main__ import main
from moe_core.config import (PROFILE_KEYS, VARIANT_KEYS, ConfigError, DataConfig, ModelConfig, TrainConfig,
                             check_spec, validate)
from moe_core.model import MoETransformer
from moe_core.train import RunFailed, Trainer, make_optimizer, train
from moe_core.variants import profiles, resolve, variants

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def cache(shared_cache):
    return shared_cache


# Dropout and accumulation on, so a resumed run must redraw the same masks and micro-batches.
CFG = resolve("deep", "tiny", overrides={"train": {"steps": 12, "checkpoint_every": 4, "eval_every": 4,
                                                   "accum_steps": 2}, "model": {"dropout": 0.1}})
TIMING = ("tokens_per_s", "mfu", "train_seconds")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # child processes use the thread count of this one (see one_thread)


def outcome(run):
    """What an interrupted run must reproduce exactly: weights, metrics (but timings), val losses."""
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in (run / "metrics.jsonl").read_text().splitlines()]
    return load_file(run / "final.safetensors"), metrics, store.read_json(run / "val_batch_losses.json")


def assert_same(got, want):
    (w1, m1, v1), (w2, m2, v2) = got, want
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1 == m2
    assert v1 == v2


def assert_tidy(run):
    """A finished run directory holds no temporary files and no checkpoints."""
    assert (run / "results.json").exists() and store.read_status(run)["state"] == "finished"
    assert not list(run.glob(".*.tmp")) and not list(run.glob("ckpt-*"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("reference")
    train(CFG, root, cache, progress=False)
    return outcome(store.run_dir(CFG, root))


# ------------------------------------------------------------------ kill and resume

# A child process trains a config and SIGKILLs itself at one point: on the call of a function for
# which `when(call number, *args)` is true, after `before(original, *args)` did part of its work.
CHILD = r"""
import json, os, signal, sys
from pathlib import Path
import torch
from moe_core import store, train as T
from moe_core.config import RunConfig
from moe_core.model import MoETransformer

fault, config, root, cache = sys.argv[1:5]
calls, evaluations = {}, []

def kill_at(owner, name, when, before=None):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        calls[name] = calls.get(name, 0) + 1
        if when(calls[name], *args):
            if before:
                before(original, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(owner, name, wrapper)

def half_file(original, tensors, tmp, **kw):  # a safetensors write cut in the middle
    original(tensors, tmp, **kw)
    Path(tmp).write_bytes(Path(tmp).read_bytes()[: os.path.getsize(tmp) // 2])

def half_line(original, trainer, record):  # a metrics line cut in the middle
    with open(trainer.run / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record)[:20])

def complete(original, *args, **kw):  # the call finishes, then the process dies
    original(*args, **kw)

def sixth_evaluation_batch(n, model, *args):  # the 2nd batch of the 2nd evaluation (4 batches each)
    evaluations.extend([1] * (not model.training))
    return len(evaluations) == 6

faults = {
    "none": lambda: None,
    "mid-step": lambda: kill_at(torch.nn.utils, "clip_grad_norm_", lambda n, *a: n == 6),  # after backward
    "mid-checkpoint-write": lambda: kill_at(store, "save_file", lambda n, *a: n == 2, half_file),
    "checkpoint-without-json": lambda: kill_at(store, "write_json", lambda n, p, *a: p.name == "ckpt-0000008.json"),
    "mid-evaluation": lambda: kill_at(MoETransformer, "forward", sixth_evaluation_batch),
    "mid-metrics-line": lambda: kill_at(T.Trainer, "log", lambda n, *a: n == 7, half_line),
    "mid-finish": lambda: kill_at(store, "write_tensors", lambda n, p, *a: p.name == "final.safetensors", complete),
}
faults[fault]()
T.train(RunConfig.from_dict(json.loads(config)), root, cache, progress=False)
"""
# What each fault leaves in the run directory, checked before resuming.
LEFTOVERS = {
    "mid-checkpoint-write": lambda run: list(run.glob(".ckpt-0000008.safetensors.*.tmp")),
    "checkpoint-without-json": lambda run: store.checkpoint_steps(run) == [4]
    and (run / "ckpt-0000008.safetensors").exists(),
    "mid-metrics-line": lambda run: not (run / "metrics.jsonl").read_text().endswith("\n"),
    "mid-finish": lambda run: (run / "final.safetensors").exists() and store.checkpoint_steps(run) == [8, 12],
}


def run_child(fault, root, cache, **env):
    config = json.dumps(CFG.to_dict())
    return subprocess.run([sys.executable, "-c", CHILD, fault, config, str(root), str(cache)], capture_output=True,
                          text=True, env={**os.environ, **ONE_THREAD, **env})


@pytest.mark.parametrize("fault", ["mid-step", "mid-checkpoint-write", "checkpoint-without-json", "mid-evaluation",
                                   "mid-metrics-line", "mid-finish"])
def test_sigkill_at_any_point_resumes_to_the_uninterrupted_result(fault, tmp_path, cache, reference):
    killed = run_child(fault, tmp_path, cache)
    assert killed.returncode == -9, killed.stderr
    run = store.run_dir(CFG, tmp_path)
    assert not (run / "results.json").exists()
    assert LEFTOVERS.get(fault, lambda run: True)(run), fault
    result = train(CFG, tmp_path, cache, progress=False)
    assert result["cached"] is False
    assert_same(outcome(run), reference)
    assert_tidy(run)


@pytest.mark.parametrize("lines", [2, 7])
def test_sigkill_from_outside_at_an_unplanned_moment_resumes_exactly(lines, tmp_path, cache, reference):
    """Killed from outside wherever the child happens to be once its log holds `lines` lines (of 15), and
    a little later (a seeded delay): not at one of the fault points the other test plants."""
    config = json.dumps(CFG.to_dict())
    child = subprocess.Popen([sys.executable, "-c", CHILD, "none", config, str(tmp_path), str(cache)],
                             env={**os.environ, **ONE_THREAD}, stderr=subprocess.DEVNULL)
    metrics = store.run_dir(CFG, tmp_path) / "metrics.jsonl"
    while child.poll() is None and (not metrics.exists() or metrics.read_text().count("\n") < lines):
        time.sleep(0.005)
    time.sleep(random.Random(lines).uniform(0, 0.05))
    child.kill()
    assert child.wait() == -9, "the child finished before the kill: nothing was interrupted"
    assert not (store.run_dir(CFG, tmp_path) / "results.json").exists()
    assert train(CFG, tmp_path, cache, progress=False)["cached"] is False
    assert_same(outcome(store.run_dir(CFG, tmp_path)), reference)


def test_training_is_bit_identical_across_processes(tmp_path, cache, reference):
    child = run_child("none", tmp_path, cache, PYTHONHASHSEED="12345")
    assert child.returncode == 0, child.stderr
    assert_same(outcome(store.run_dir(CFG, tmp_path)), reference)


# --------------------------------------------------------------------- corruption

def flip_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_state(path):
    meta = store.read_json(path)
    meta["train_seconds"] += 1.0
    store.write_json(path, meta)


DAMAGE = {
    "flipped tensor byte": lambda run: flip_byte(run / "ckpt-0000010.safetensors"),
    "truncated tensors": lambda run: (run / "ckpt-0000010.safetensors").write_bytes(b"\0" * 64),
    "edited JSON state": lambda run: edit_state(run / "ckpt-0000010.json"),
    "garbage JSON": lambda run: (run / "ckpt-0000010.json").write_text("{\"step\": 1"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_checkpoint_is_reported_and_the_previous_one_used(damage, tmp_path, cache, reference, capsys):
    assert train(CFG, tmp_path, cache, progress=False, stop_at=10) is None
    run = store.run_dir(CFG, tmp_path)
    assert store.checkpoint_steps(run) == [8, 10] and store.read_status(run)["state"] == "paused"
    DAMAGE[damage](run)
    capsys.readouterr()
    meta, _ = store.latest_checkpoint(run)
    assert meta["step"] == 8 and "ckpt-0000010" in capsys.readouterr().err
    assert store.checkpoint_steps(run) == [8]
    train(CFG, tmp_path, cache, progress=False)
    assert_same(outcome(run), reference)


def test_no_intact_checkpoint_restarts_from_scratch(tmp_path, cache, reference):
    train(CFG, tmp_path, cache, progress=False, stop_at=10)
    run = store.run_dir(CFG, tmp_path)
    for path in run.glob("ckpt-*.safetensors"):
        flip_byte(path)
    assert store.latest_checkpoint(run) is None
    train(CFG, tmp_path, cache, progress=False)
    assert_same(outcome(run), reference)


# ------------------------------------------------------------ concurrency, NaN

def test_concurrent_requests_for_one_run_train_it_once(tmp_path, cache):
    """Two processes ask for one run while it is busy (this test holds its lock): one trains it
    after the lock is released, the other waits for that and returns the stored results."""
    cmd = [sys.executable, "-m", "moe_core", "train", "--variant", "wide", "--profile", "tiny", "--seed", "5",
           "--run-root", str(tmp_path), "--cache-dir", str(cache), "--no-progress"]
    run = store.run_dir(resolve("wide", "tiny", 5), tmp_path)
    logs = [tmp_path / f"stderr-{i}.txt" for i in range(2)]
    with store.locked(run):
        procs = []
        for log in logs:
            with open(log, "w") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                              env={**os.environ, **ONE_THREAD}))
        deadline = time.monotonic() + 120
        while not all("waiting for another process" in log.read_text() for log in logs):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), [l.read_text() for l in logs]
            time.sleep(0.05)
        assert not (run / "metrics.jsonl").exists()
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [log.read_text() for log in logs]
    results = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    assert sorted(r["cached"] for r in results) == [False, True]
    assert results[0]["val_loss"] == results[1]["val_loss"]
    assert_tidy(run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 31))  # one trainer wrote the log


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache, monkeypatch):
    real_step = Trainer.train_step

    def poisoned(self, step):
        stats = real_step(self, step)
        return {**stats, "loss": torch.tensor(float("nan"))} if step == 9 else stats

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    with pytest.raises(RunFailed, match="non-finite loss"):
        train(CFG, tmp_path, cache, progress=False)
    run = store.run_dir(CFG, tmp_path)
    status = store.read_status(run)
    assert status["state"] == "failed" and status["step"] == 10 and status["last_checkpoint"] == 8
    assert store.checkpoint_steps(run) == [4, 8]
    store.load_checkpoint(run, 8)  # intact
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("a failed run was retrained"))
    with pytest.raises(RunFailed, match=r"failed earlier .*retry from its last good checkpoint \(step 8\)"):
        train(CFG, tmp_path, cache, progress=False)
    store.write_status(run, **{**status, "last_checkpoint": None})  # as when it failed before its first checkpoint
    with pytest.raises(RunFailed, match=r"retry from scratch \(it has no checkpoint\)"):
        train(CFG, tmp_path, cache, progress=False)


def test_an_interrupted_run_status_names_its_newest_checkpoint(tmp_path, cache, monkeypatch):
    real_step = Trainer.train_step

    def interrupted(self, step):
        if step == 9:
            raise KeyboardInterrupt  # as a Ctrl-C or a killed process between checkpoints
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(CFG, tmp_path, cache, progress=False)
    run = store.run_dir(CFG, tmp_path)
    status = store.read_status(run)
    assert status["state"] == "running" and status["step"] == 8 == store.checkpoint_steps(run)[-1]
    assert status["pid"] == os.getpid()


# ------------------------------------------------------------------ strict inputs

VARIANTS = ["wide", "deep", "hash", "linear", "indep", "recurrent", "dense_iso_flop"]
FIELDS = {f"{section}.{f.name}": f.default for section, cls in (("model", ModelConfig), ("train", TrainConfig),
                                                                 ("data", DataConfig)) for f in fields(cls)
          if f"{section}.{f.name}" != "model.vocab_size"}  # resolve() copies data.vocab_size over it
MOE = [v for v in VARIANTS if not v.startswith("dense")]
COSINE = ["wide", "deep"]
# (key, value, variants where it is invalid): ranges and relations no type check can see.
OUT_OF_RANGE = [
    ("train.steps", 0, VARIANTS), ("model.top_k", 999, MOE), ("model.d_space", 10_000, COSINE),
    ("model.hops", [0], MOE), ("model.hops", [1, 2, 3], MOE), ("model.tau", 0.0, COSINE),
    ("model.dropout", 1.0, VARIANTS), ("train.beta1", 1.0, VARIANTS), ("train.beta2", -0.1, VARIANTS),
    ("train.eps", 0.0, VARIANTS), ("train.lr", 0.0, VARIANTS), ("model.router", "sigmoid", VARIANTS),
    ("model.n_heads", 3, VARIANTS), ("train.seq_len", 10_000, VARIANTS), ("data.vocab_size", 256, VARIANTS),
    ("data.corpus", "wikipedia", VARIANTS), ("model.router_block", 3, ["linear"]), ("train.min_lr_ratio", 2.0, VARIANTS),
]
junk = st.one_of(st.none(), st.text(alphabet="xyz ?!", max_size=4), st.lists(st.none(), min_size=1, max_size=2),
                 st.dictionaries(st.just("a"), st.none(), max_size=1))


def wrong_type(default):
    """Values that are not of the field's type (ints stand for floats; bools are not ints)."""
    if isinstance(default, bool):
        return st.one_of(junk, st.integers(), st.floats())
    if isinstance(default, int):
        return st.one_of(junk, st.booleans(), st.floats().filter(lambda x: not float(x).is_integer()))
    if isinstance(default, float):
        return st.one_of(junk, st.booleans())
    if isinstance(default, str):
        return st.one_of(st.none(), st.integers(), st.floats(), st.booleans())
    return st.one_of(st.none(), st.floats(), st.lists(st.floats(), min_size=1, max_size=2))  # tuples of ints


def out_of_range(default):
    if isinstance(default, float):
        return st.sampled_from([math.nan, math.inf, -math.inf])
    return st.integers(max_value=-1) if isinstance(default, int) and not isinstance(default, bool) else wrong_type(default)


@st.composite
def invalid_overrides(draw):
    """1-3 bad entries, each a wrong type, a negative or non-finite number, a range violation or an
    unknown key; returns (variant, overrides, the keys that were made bad)."""
    variant = draw(st.sampled_from(VARIANTS))
    overrides, bad = {}, set()
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["type", "range", "relation", "unknown"]))
        if kind == "relation":
            key, value, where = draw(st.sampled_from([c for c in OUT_OF_RANGE if variant in c[2]]))
        elif kind == "unknown":
            key = f"{draw(st.sampled_from(['model', 'train', 'data']))}.{draw(st.text('abcxyz_', min_size=1))}"
            if key in FIELDS:
                continue
            value = draw(st.integers())
        else:
            key = draw(st.sampled_from(sorted(FIELDS)))
            value = draw((wrong_type if kind == "type" else out_of_range)(FIELDS[key]))
        section, name = key.split(".")
        overrides.setdefault(section, {})[name] = value
        bad.add(key)
    assume(bad)
    return variant, overrides, bad


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(invalid_overrides())
def test_fuzzed_invalid_configs_are_rejected_naming_a_bad_key(case):
    variant, overrides, bad = case
    with pytest.raises(ConfigError) as err:
        resolve(variant, "tiny", overrides=overrides)
    assert err.value.key in bad and err.value.key in str(err.value) and err.value.allowed


@settings(max_examples=60, deadline=None)
@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**63), st.floats(), st.text(max_size=3),
                 st.booleans(), st.none()))
def test_fuzzed_seeds_must_be_integers(seed):
    with pytest.raises(ConfigError, match="seed"):
        resolve("wide", "tiny", seed=seed)


# Small values, mostly valid ones: the property is about what validation lets through.
small = {"d_model": st.sampled_from([8, 12, 16, 32]), "n_heads": st.sampled_from([1, 2]), "n_layers": st.integers(1, 3),
         "n_experts": st.integers(0, 12), "top_k": st.integers(0, 12), "d_space": st.integers(0, 40),
         "hops": st.lists(st.integers(1, 3), min_size=1, max_size=1), "expert_rank": st.integers(0, 3),
         "expert_d_ff": st.integers(0, 8), "router_block": st.integers(0, 3), "router_lowrank": st.integers(0, 2),
         "router_hidden": st.integers(0, 8), "tau": st.floats(-1, 50), "magnitude_alpha": st.floats(-2, 4),
         "d_ff": st.integers(0, 8), "router": st.sampled_from(["cosine", "linear", "hash", "recurrent"]),
         "expert": st.sampled_from(["rank", "swiglu"]), "ffn": st.sampled_from(["moe", "dense"]),
         "expert_backend": st.sampled_from(["auto", "gather", "masked", "sorted", "loop"]),
         "router_per_hop": st.booleans(), "learn_tau": st.booleans(), "router_frozen": st.booleans(),
         "kinematic_vectors": st.booleans(), "residual": st.sampled_from(["accum", "literal"])}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.fixed_dictionaries({}, optional=small), st.sampled_from(VARIANTS))
def test_fuzzed_accepted_configs_build_and_train_a_step(model, variant):
    """Whatever validation accepts, torch accepts: no error from deep inside a forward pass."""
    try:
        cfg = resolve(variant, "tiny", overrides={"model": model})
    except ConfigError as e:
        event(f"rejected: {e.key}")
        return
    event("accepted")
    torch.manual_seed(0)
    net = MoETransformer(cfg.model)
    x = torch.randint(0, cfg.model.vocab_size, (2, 8))
    net(x, x).loss.backward()
    make_optimizer(net, cfg.train, torch.device("cpu")).step()


@pytest.mark.parametrize("argv,message", [
    (["train", "--variant", "wide", "--profile", "tiny", "--seed", "-1"], "seed"),
    (["train", "--variant", "wide", "--profile", "tiny", "--steps", "0"], "train.steps"),
    (["sweep", "--variant", "wide", "widest", "--profile", "tiny"], "valid variants:"),
    (["eval", "no/such/run"], "run_dir='no/such/run': does not exist"),
    (["train", "--variant", "wide", "--profile", "tiny", "--set", "train.lr=1e-3", "--set", "train.lr=2e-3"],
     "train.lr=0.002: set twice (first to 0.001)"),
    (["sweep", "--variant", "wide", "--profile", "tiny", "--steps", "5", "--set", "train.steps=10"],
     "train.steps=10: set twice (first to 5)"),
    (["sweep", "--variant", "wide", "widest", "--profile", "tiny", "--shard", "0/2"], "variant='widest'"),
    (["eval", "no/such/run", "--halt-eps", "-0.1"], "--halt-eps"),
    (["eval", "no/such/run", "--halt-eps", "nan"], "--halt-eps"),
])
def test_cli_rejects_bad_values_with_status_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOE_CORE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MOE_CORE_CACHE", str(tmp_path / "cache"))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid") and message in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()  # no data prepared either


@pytest.mark.parametrize("setting,message", [
    ("train.eval_batches=100000", "so at most {batches} batches of 8"),
    ("train.eval_batch_size=100000", "so at most {sequences} sequences per batch"),  # blamed, not eval_batches
    ("train.telemetry_seqs=100000", "so at most {sequences} sequences"),
])
def test_validation_settings_beyond_the_split_are_refused_by_name(setting, message, tmp_path, cache, capsys):
    """How many validation sequences exist depends on the corpus, so this is checked once the data is
    prepared, still before any model is built or run directory made."""
    from moe_core.data import count_val_batches, prepare_data

    sequences = count_val_batches(prepare_data("wiki-vital", 512, cache).validation, 32, 1)
    argv = ["train", "--variant", "wide", "--profile", "tiny", "--set", setting, "--run-root", str(tmp_path / "runs"),
            "--cache-dir", str(cache)]
    assert main(argv) == 2
    key, value = setting.split("=")
    assert (f"invalid {key}={value}: the validation split holds {sequences} sequences of 32 tokens, "
            + message.format(batches=sequences // 8, sequences=sequences)) in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_eval_of_an_unfinished_run_and_a_bad_rank_are_refused(tmp_path, cache, capsys, monkeypatch):
    (tmp_path / "run").mkdir()
    assert main(["eval", str(tmp_path / "run")]) == 2
    assert f"invalid run_dir='{tmp_path / 'run'}': holds no run (no config.json)" in capsys.readouterr().err
    cfg = resolve("wide", "tiny", overrides={"train": {"steps": 9, "checkpoint_every": 4}})
    train(cfg, tmp_path, cache, progress=False, stop_at=4)
    run = store.run_dir(cfg, tmp_path)
    assert main(["eval", str(tmp_path)]) == 2
    assert "is a run store, not a run: pass one of its runs (`runs` lists them)" in capsys.readouterr().err
    assert main(["eval", str(run)]) == 2
    assert "holds a run that has not finished (stopped at step 4 of 9); `train` with its settings finishes it" \
        in capsys.readouterr().err
    store.write_status(run, "failed", step=6, reason="non-finite loss", last_checkpoint=4)
    assert main(["eval", str(run)]) == 2
    assert "holds a run that failed at step 6 of 9 (status.json says why)" in capsys.readouterr().err
    (run / "config.json").write_text("{")
    assert main(["eval", str(run)]) == 2
    assert "holds a run whose files cannot be read (JSONDecodeError" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "x")
    assert main(["train", "--variant", "wide", "--profile", "tiny", "--run-root", str(tmp_path / "runs")]) == 2
    assert "invalid RANK='x': must be an integer (torchrun sets it)" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["train", "sweep"])
@pytest.mark.parametrize("where,name", [("flag", "--run-root"), ("flag", "--cache-dir"),
                                        ("env", "MOE_CORE_RUNS"), ("env", "MOE_CORE_CACHE")])
def test_run_and_cache_folders_that_are_files_are_rejected_before_any_work(command, where, name, tmp_path, capsys,
                                                                           monkeypatch):
    """Whether the folder comes from a flag or from the environment, the error names that source."""
    monkeypatch.setenv("MOE_CORE_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MOE_CORE_CACHE", str(tmp_path / "cache"))
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    argv = [command, "--variant", "wide", "--profile", "tiny", "--steps", "1"]
    if where == "flag":
        argv += [name, str(a_file)]
    else:
        monkeypatch.setenv(name, str(a_file))
    assert main(argv) == 2
    assert f"invalid {name}='{a_file}': must be a directory (it exists as a file)" in capsys.readouterr().err
    assert a_file.read_text() == "" and not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_a_run_root_that_cannot_be_made_is_rejected_before_any_work(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    assert main(["train", "--variant", "wide", "--profile", "tiny", "--run-root", str(a_file / "runs")]) == 2
    assert f"invalid --run-root='{a_file / 'runs'}': cannot be written: {a_file} is not a directory" in \
        capsys.readouterr().err


def test_a_failed_run_does_not_stop_the_rest_of_a_sweep(tmp_path, capsys, monkeypatch):
    """The other runs train; the JSON line lists the failure and the sweep exits 1."""
    def train(cfg, **options):
        if cfg.variant == "deep":
            raise RunFailed(f"{cfg.variant} s{cfg.seed}: non-finite loss")
        return {"run_dir": f"runs/{cfg.variant}_s{cfg.seed}", "variant": cfg.variant, "seed": cfg.seed,
                "val_loss": 5.0, "val_ppl": 148.4, "cached": False}
    monkeypatch.setattr("moe_core.train.train", train)
    argv = ["sweep", "--variant", "deep", "wide", "--seed", "1", "2", "--profile", "tiny", "--run-root", str(tmp_path)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    summary = json.loads(out.splitlines()[-1])
    assert [(r["variant"], r["seed"]) for r in summary["runs"]] == [("wide", 1), ("wide", 2)]
    assert [(f["variant"], f["seed"]) for f in summary["failed"]] == [("deep", 1), ("deep", 2)]
    assert err.count("error: deep s") == 2


def test_a_run_that_ends_inside_its_warm_up_is_noted(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("moe_core.train.train", lambda cfg, **options: dict.fromkeys(
        ("run_dir", "variant", "seed", "val_loss", "val_ppl", "cached")))  # trains nothing
    assert main(["train", "--variant", "wide", "--profile", "tiny", "--steps", "4", "--run-root", str(tmp_path)]) == 0
    assert ("note: train.steps=4 <= train.warmup_steps=5: the learning rate stays in its warm-up and peaks at "
            "0.0024, 80% of train.lr=0.003") in capsys.readouterr().err
    assert main(["sweep", "--variant", "wide", "deep", "--profile", "tiny", "--run-root", str(tmp_path)]) == 0
    assert "note:" not in capsys.readouterr().err  # 30 steps: past the warm-up


def test_an_interrupt_ends_with_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setattr("moe_core.__main__.cmd_train", interrupted)
    assert main(["train", "--variant", "wide", "--profile", "tiny"]) == 130
    assert capsys.readouterr().err == "\ninterrupted (rerun the same command: a run resumes from its last checkpoint)\n"


def test_runs_lists_the_store_with_each_runs_state(tmp_path, cache, capsys):
    finished = resolve("wide", "tiny", overrides={"train": {"steps": 4}})
    stopped = resolve("deep", "tiny", overrides={"train": {"steps": 8, "checkpoint_every": 4}})
    train(finished, tmp_path, cache, progress=False)
    train(stopped, tmp_path, cache, progress=False, stop_at=4)
    assert main(["runs", "--run-root", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    rows = {r["variant"]: r for r in json.loads(out.splitlines()[-1])["runs"]}
    assert rows["wide"]["state"] == "finished" and rows["wide"]["step"] == 4 and rows["wide"]["val_loss"] > 0
    assert rows["deep"]["state"] == "stopped" and rows["deep"]["step"] == 4 and rows["deep"]["val_loss"] is None
    assert all(r["corpus"] == "wiki-vital" for r in rows.values()) and "2 run(s) in" in err
    assert store.run_dir(finished, tmp_path).name in out.splitlines()[0] + out.splitlines()[1]
    with store.locked(store.run_dir(stopped, tmp_path)):  # as while a process trains it
        assert store.describe(store.run_dir(stopped, tmp_path))["state"] == "training"
    assert main(["runs", "--run-root", str(tmp_path), "--variant", "deep"]) == 0
    assert [r["variant"] for r in json.loads(capsys.readouterr().out.splitlines()[-1])["runs"]] == ["deep"]
    (store.run_dir(finished, tmp_path) / "results.json").write_text("{")
    assert main(["runs", "--run-root", str(tmp_path), "--variant", "deep"]) == 0  # a damaged run shows anyway
    out = capsys.readouterr().out
    assert [r["state"] for r in json.loads(out.splitlines()[-1])["runs"]] == ["stopped", "damaged"]
    assert "damaged   JSONDecodeError" in out


def test_params_takes_settings(capsys):
    counts = []
    for extra in ([], ["--set", "model.d_model=64"]):
        assert main(["params", "--variant", "wide", "--profile", "tiny", *extra]) == 0
        counts.append(json.loads(capsys.readouterr().out.splitlines()[-1])["total"])
    assert counts[1] > counts[0]


def test_a_bad_kernel_switch_is_rejected_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MOE_CORE_CPU_KERNELS", "yes")
    assert main(["train", "--variant", "wide", "--profile", "tiny", "--run-root", str(tmp_path)]) == 2
    assert "invalid MOE_CORE_CPU_KERNELS='yes': use 0 (off), 1 (required)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_is_rejected_where_there_is_none(tmp_path, capsys):
    argv = ["train", "--variant", "wide", "--profile", "tiny", "--device", "cuda", "--run-root", str(tmp_path)]
    assert main(argv) == 2 and "CUDA is not available" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,message", [
    (["train", "--variant", "wide", "--profile", "tiny", "--seed", "1.5"], "--seed: invalid int value: '1.5'"),
    (["sweep", "--variant", "wide", "--profile", "tiny", "--shard", "4/4"], "--shard: invalid shard '4/4'"),
    (["train", "--variant", "wide", "--profile", "tiny", "--device", "gpu"], "--device: invalid choice: 'gpu'"),
    (["eval", "x", "--device", "tpu"], "--device: invalid choice: 'tpu'"),
    (["eval", "x", "--freeze"], "unrecognized arguments: --freeze"),  # no abbreviations of flags
])
def test_cli_rejects_ill_typed_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_profile_and_variant_entries_are_checked():
    for name, spec in profiles().items():
        check_spec(f"profile {name}", spec, PROFILE_KEYS, required=("scale",))
    for name, spec in variants().items():
        check_spec(f"variant {name}", spec, VARIANT_KEYS)
    tiny = profiles()["tiny"]
    for bad, key in [({**tiny, "trian": {}}, "profile tiny.trian"), ({**tiny, "model": [1]}, "profile tiny.model"),
                     ({k: v for k, v in tiny.items() if k != "scale"}, "profile tiny.scale"),
                     ({**tiny, "scale": {**tiny["scale"], "M": "32"}}, "profile tiny.scale.M")]:
        with pytest.raises(ConfigError) as err:
            check_spec("profile tiny", bad, PROFILE_KEYS, required=("scale",))
        assert err.value.key == key


def test_resolve_rejects_a_misspelt_section_of_a_variant(monkeypatch):
    """A variant whose `model` section is misspelt would otherwise train the defaults (Wide) under its name."""
    bad = {**variants(), "deep": {"description": "Deep", "modle": {"hops": [3]}}}
    monkeypatch.setattr("moe_core.variants.variants", lambda: bad)
    with pytest.raises(ConfigError) as err:
        resolve("deep", "tiny")
    assert err.value.key == "variant deep.modle" and "valid keys: description, model, train, data" in str(err.value)


def test_eval_rejects_a_cache_dir_that_is_a_file_before_any_work(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.write_text("")
    assert main(["eval", str(tmp_path), "--cache-dir", str(cache)]) == 2
    assert "invalid --cache-dir" in capsys.readouterr().err and cache.read_text() == ""


def test_direct_configs_are_type_checked_too():
    cfg = resolve("wide", "tiny")
    with pytest.raises(ConfigError, match="train.steps"):
        validate(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps="10")))


# ------------------------------------------------------------------------ offline

def test_hub_corpus_fails_fast_offline_naming_the_offline_corpora(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "MOE_CORE_RUNS": str(tmp_path / "runs"), "MOE_CORE_CACHE": str(tmp_path / "cache")}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "moe_core", "train", "--variant", "wide", "--profile", "tiny",
                          "--corpus", "wikitext-2", "--no-progress"], capture_output=True, text=True, env=env)
    assert time.perf_counter() - start < 30
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "wiki-vital, wiki-vital-fr, wiki-vital-es" in out.stderr
