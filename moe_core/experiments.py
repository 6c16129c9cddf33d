"""Grids of runs for the notebooks: train (or fetch from the run store) and tabulate.

A run is named by (variant, seed, overrides); `run_grid` trains the missing ones with one progress
bar over the grid (several at once on a multi-core CPU when the profile trains each run on fewer
threads than there are cores) and returns a table with one row per run. Notebooks that only read results call
the same function: finished runs come back from the store without training.
"""
from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from . import store
from .config import RunConfig
from .data import prepare_data
from .progress import progress_bar
from .train import default_cache_dir, default_run_root, train
from .variants import resolve


@dataclass(frozen=True)
class RunSpec:
    variant: str
    seed: int = 42
    overrides: dict = field(default_factory=dict, hash=False)
    label: str = ""  # how tables name the run (defaults to the variant)

    def config(self, profile: str) -> RunConfig:
        return resolve(self.variant, profile, self.seed, self.overrides)


def grid(variants, seeds) -> list[RunSpec]:
    return [RunSpec(v, s) for v in variants for s in seeds]


def k_tau_spec(k: int, tau: float | str, seed: int = 42) -> RunSpec:
    """Wide with top-k = k and a fixed temperature tau, or tau = "learned" (starting from 30): one cell
    of the K x tau grid (paper Table 11)."""
    if tau != "learned" and (isinstance(tau, bool) or not isinstance(tau, (int, float))):
        raise ValueError(f"tau={tau!r}: give a number or 'learned'")
    model = {"top_k": k, "tau": 30.0 if tau == "learned" else float(tau), "learn_tau": tau == "learned"}
    return RunSpec("wide", seed, {"model": model}, label=f"K={k}, tau={tau}")


def grid_workers(configs: list[RunConfig]) -> int:
    """How many runs train at once: on a CPU, cores // train.threads (1 when threads is 0); on CUDA, 1."""
    threads = {cfg.train.threads for cfg in configs}
    if torch.cuda.is_available() or len(threads) != 1 or 0 in threads:
        return 1  # one GPU trains one run at a time; a run on torch's default threads takes every core
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // threads.pop())


def train_missing(configs: list[RunConfig], root: Path, workers: int, desc: str) -> dict[str, dict]:
    """Train the configs that have no results in the run store `root` yet, `workers` at a time in
    fresh processes. Returns the results of the runs trained now, by run directory."""
    missing = {str(store.run_dir(cfg, root)): cfg for cfg in configs}  # a spec listed twice trains once
    missing = {run: cfg for run, cfg in missing.items() if not (Path(run) / "results.json").exists()}
    trained = {}
    with progress_bar(len(missing), desc, "run", disable=not missing) as bar:  # silent when all are stored
        if workers <= 1 or len(missing) <= 1:
            for run, cfg in missing.items():
                trained[run] = train(cfg, root, progress=False)
                bar.update(1)
            return trained
        for corpus, vocab in {(cfg.data.corpus, cfg.data.vocab_size) for cfg in missing.values()}:
            prepare_data(corpus, vocab, default_cache_dir())  # tokenizers once, before the workers read them
        context = multiprocessing.get_context("spawn")  # not fork: a forked OpenMP runtime can deadlock
        with ProcessPoolExecutor(min(workers, len(missing)), mp_context=context) as pool:
            futures = {pool.submit(train, cfg, root, cache_dir=None, progress=False): run for run, cfg in missing.items()}
            for future in as_completed(futures):
                trained[futures[future]] = future.result()  # re-raises a worker's error here
                bar.update(1)
    return trained


def run_grid(specs: list[RunSpec], profile: str, run_root: str | Path | None = None,
             workers: int | None = None) -> pd.DataFrame:
    """Train every spec that is not in the store yet (`workers` at a time, default `grid_workers`);
    one row per run, in the order of `specs` (`cached`: it was in the store before this call)."""
    configs = [spec.config(profile) for spec in specs]  # every config is validated before any work
    root = Path(run_root) if run_root else default_run_root()
    trained = train_missing(configs, root, grid_workers(configs) if workers is None else workers, f"runs ({profile})")
    rows = []
    for spec, cfg in zip(specs, configs):
        result = trained.get(str(store.run_dir(cfg, root))) or train(cfg, root, progress=False)
        rows.append({"label": spec.label or spec.variant, "variant": spec.variant, "seed": spec.seed,
                     "val_loss": result["val_loss"], "val_ppl": result["val_ppl"],
                     "train_seconds": result["train_seconds"], "tokens_per_s": result["tokens_per_s"],
                     "params_total": result["params_total"], "params_routing": result["params_routing"],
                     "cached": result["cached"], "run_dir": result["run_dir"]})
    return pd.DataFrame(rows)


def run_dir(spec: RunSpec, profile: str, run_root: str | Path | None = None) -> Path:
    return store.run_dir(spec.config(profile), Path(run_root) if run_root else default_run_root())


def load_run(spec: RunSpec, profile: str, run_root: str | Path | None = None):
    """(model, its validation batches) of a finished run, for the inference-time analyses."""
    model, _, batches = load_run_dir(run_dir(spec, profile, run_root))
    return model, batches


def load_run_dir(run: str | Path, device: str = "cpu", cache_dir: str | Path | None = None):
    """(model, its config, its validation batches) of the finished run stored in `run`."""
    from .data import val_batches
    from .evaluate import load_model

    model, cfg = load_model(run, device)
    t = cfg.train
    data = prepare_data(cfg.data.corpus, cfg.data.vocab_size, cache_dir or default_cache_dir())
    return model, cfg, val_batches(data.validation, t.seq_len, t.eval_batch_size, t.eval_batches)


def metrics(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training log, evaluation log) of a run, one row per logged step."""
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    train_log = pd.DataFrame([r for r in records if "loss" in r])
    eval_log = pd.DataFrame([r for r in records if "val_loss" in r])
    return train_log, eval_log


def step_losses(train_log: pd.DataFrame) -> pd.Series:
    """The training loss of every step, indexed by step, from a run's training log (`metrics(run)[0]`): each
    line holds the losses of the steps since the line before. Lines written before they held them give
    their own step's loss only."""
    if train_log.empty:
        return pd.Series(dtype=float, name="loss")
    windows = train_log["step_losses"] if "step_losses" in train_log else [None] * len(train_log)
    steps, losses = [], []
    for step, loss, window in zip(train_log["step"], train_log["loss"], windows):
        window = window if isinstance(window, list) and window else [loss]
        steps += range(int(step) - len(window) + 1, int(step) + 1)
        losses += window
    return pd.Series(losses, index=steps, name="loss")


def loss_spikes(loss: pd.Series, ratio: float = 1.1) -> int:
    """Spike events in a training-loss log: runs of consecutive points above `ratio` times the running
    minimum (one spike that lasts several steps counts once)."""
    above = loss > ratio * loss.cummin()
    return int((above & ~above.shift(fill_value=False)).sum())


def batch_losses(run: str | Path) -> list[float]:
    """Per-batch validation losses of a run's final model (the bootstrap's paired units)."""
    return store.read_json(Path(run) / "val_batch_losses.json")


def loss_differences(first: RunSpec, second: RunSpec, profile: str):
    """Per validation batch, first's loss minus second's on the same batches: the paired bootstraps' units."""
    from .stats import paired_differences

    return paired_differences(batch_losses(run_dir(first, profile)), batch_losses(run_dir(second, profile)))


def paired_gap(first: str, second: str, seeds: list[int], profile: str,
               minus: tuple[str, str] | None = None) -> dict:
    """first minus second in validation loss, each seed's runs paired on the same batches. With two or more
    seeds: the t interval of the per-seed mean differences (stats.seed_interval); with one, the paired
    bootstrap over that seed's batches. 'basis' names which, for the verdict's text. `minus`, a second
    (first, second) pair, turns it into a difference of two gaps (an interaction), paired the same way."""
    from . import stats

    def diffs(a: str, b: str) -> list:
        return [loss_differences(RunSpec(a, s), RunSpec(b, s), profile) for s in seeds]

    gaps = diffs(first, second)
    if minus is not None:
        gaps = [g - h for g, h in zip(gaps, diffs(*minus))]
    if len(seeds) == 1:
        return {**stats.paired_bootstrap(gaps[0]), "basis": f"seed {seeds[0]}, bootstrap over its validation batches"}
    return {**stats.seed_interval([g.mean() for g in gaps]), "basis": f"{len(seeds)} seeds, t interval over seeds"}


def summarise(table: pd.DataFrame, by: str = "label") -> pd.DataFrame:
    """Mean and std (ddof = 1, the paper's convention) of final PPL per group, in table order."""
    grouped = table.groupby(by, sort=False)["val_ppl"]
    return pd.DataFrame({"mean_ppl": grouped.mean(), "std_ppl": grouped.std(ddof=1), "n_seeds": grouped.size()})
