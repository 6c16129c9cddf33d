"""The run store: one directory per resolved config, atomic writes, checkpoints.

    runs/<variant>_<profile>_s<seed>_<hash>/
        config.json          the resolved RunConfig (+ versions that enter the hash)
        metrics.jsonl        one JSON object per logged step / evaluation
        ckpt-<step>.safetensors + ckpt-<step>.json   model, optimizer, RNG; JSON state + sha256
        final.safetensors    final weights
        val_batch_losses.json  per-batch validation losses of the final model (bootstrap units)
        telemetry.safetensors  expert ids per layer and hop on a fixed validation slice
        results.json         written last: its presence means the run finished

Everything is written to a temporary file and renamed into place, so a crash never leaves a
half-written file under a final name. Tensors go through safetensors, state through JSON:
loading a run never unpickles anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import moe_core

from .config import RunConfig, config_hash

KEEP_CHECKPOINTS = 2


def code_versions() -> dict:
    """Versions that change numbers; they enter the run hash."""
    return {"moe_core": moe_core.__version__, "torch": torch.__version__.split("+")[0]}


def run_dir(cfg: RunConfig, root: str | Path) -> Path:
    digest = config_hash(cfg, extra=code_versions())
    return Path(root) / f"{cfg.variant}_{cfg.profile}_s{cfg.seed}_{digest}"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file next to `path`, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; runs and caches are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_config(run: Path) -> RunConfig:
    return RunConfig.from_dict(read_json(Path(run) / "config.json")["config"])


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(run: Path, step: int, model, optimizer, extra_state: dict) -> None:
    """Model + optimizer tensors in safetensors, everything else (and its sha256) in JSON."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"opt.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    path = run / f"ckpt-{step:07d}.safetensors"
    write_tensors(path, tensors)
    write_json(path.with_suffix(".json"), {"step": step, "sha256": sha256(path),
                                           "param_groups": opt["param_groups"], **extra_state})
    for old in sorted(run.glob("ckpt-*.json"))[:-KEEP_CHECKPOINTS]:
        old.unlink()
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def latest_checkpoint(run: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The newest checkpoint whose tensors match their recorded hash (corrupt ones are skipped)."""
    for meta_path in sorted(run.glob("ckpt-*.json"), reverse=True):
        path = meta_path.with_suffix(".safetensors")
        try:
            meta = read_json(meta_path)
            if path.exists() and sha256(path) == meta["sha256"]:
                return meta, load_file(path)
        except (OSError, ValueError, KeyError):
            pass
        print(f"warning: skipping damaged checkpoint {path.name}", flush=True)
    return None


def restore_checkpoint(meta: dict, tensors: dict[str, torch.Tensor], model, optimizer) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
