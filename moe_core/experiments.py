"""Grids of runs for the notebooks: train (or fetch from the run store) and tabulate.

A run is named by (variant, seed, overrides); `run_grid` trains the missing ones with one progress
bar over the grid and returns a table with one row per run. Notebooks that only read results call
the same function: finished runs come back from the store without training.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from . import store
from .config import RunConfig
from .train import default_run_root, train
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


def run_grid(specs: list[RunSpec], profile: str, run_root: str | Path | None = None) -> pd.DataFrame:
    """Train every spec that is not in the store yet; one row per run."""
    configs = [spec.config(profile) for spec in specs]  # every config is validated before any work
    rows = []
    for spec, cfg in zip(specs, tqdm(configs, desc=f"runs ({profile})", unit="run")):
        result = train(cfg, run_root, progress=False)
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
    from .data import prepare_data, val_batches
    from .evaluate import load_model
    from .train import default_cache_dir

    model, cfg = load_model(run_dir(spec, profile, run_root))
    t = cfg.train
    data = prepare_data(cfg.data.corpus, cfg.data.vocab_size, default_cache_dir())
    return model, val_batches(data.validation, t.seq_len, t.eval_batch_size, t.eval_batches)


def metrics(run: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(training log, evaluation log) of a run, one row per logged step."""
    records = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    train_log = pd.DataFrame([r for r in records if "loss" in r])
    eval_log = pd.DataFrame([r for r in records if "val_loss" in r])
    return train_log, eval_log


def batch_losses(run: str | Path) -> list[float]:
    """Per-batch validation losses of a run's final model (the bootstrap's paired units)."""
    return store.read_json(Path(run) / "val_batch_losses.json")


def summarise(table: pd.DataFrame, by: str = "label") -> pd.DataFrame:
    """Mean and std (ddof = 1, the paper's convention) of final PPL per group, in table order."""
    grouped = table.groupby(by, sort=False)["val_ppl"]
    return pd.DataFrame({"mean_ppl": grouped.mean(), "std_ppl": grouped.std(ddof=1), "n_seeds": grouped.size()})
