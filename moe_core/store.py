"""The run store: one directory per resolved config, atomic writes, checkpoints, a lock, a status.

    runs/<variant>_<profile>_s<seed>_<hash>/
        .lock                held (fcntl.flock) by the one process training the run
        config.json          the resolved RunConfig (+ versions that enter the hash)
        status.json          running | paused | failed (with the reason) | finished
        metrics.jsonl        one JSON object per logged step (with every step's loss since the last) / evaluation
        ckpt-<step>.safetensors + ckpt-<step>.json   model and optimizer; JSON state + sha256
        final.safetensors    final weights
        val_batch_losses.json  per-batch validation losses of the final model (bootstrap units)
        telemetry.safetensors  token ids, and expert ids and weights per layer and hop, on a fixed validation slice
        results.json         written last: its presence means the run finished

Every file but the training log is written to a temporary file and renamed into place, so a crash
never leaves a half-written file under a final name (metrics.jsonl is appended to, and a resumed run
cuts it back to its checkpoint's step); what a killed writer does leave (temporary files, a
checkpoint's tensors without its JSON) is removed by `clean_partial`. A checkpoint's sha256
covers its tensors and its JSON state, so damage to either is detected. Tensors go through
safetensors, state through JSON: loading a run never unpickles anything.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import moe_core

from .config import RunConfig, config_hash

KEEP_CHECKPOINTS = 2


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, or does not match its recorded hash."""


def code_versions() -> dict:
    """Versions that change numbers; they enter the run hash."""
    return {"moe_core": moe_core.__version__, "torch": torch.__version__.split("+")[0]}


def run_dir(cfg: RunConfig, root: str | Path) -> Path:
    digest = config_hash(cfg, extra=code_versions())
    return Path(root) / f"{cfg.variant}_{cfg.profile}_s{cfg.seed}_{digest}"


def _fsync(path) -> None:
    """Have the kernel write a closed file's data to disk (os.replace alone orders nothing)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file next to `path`, flush it to disk, then rename it into place.

    A crash leaves either the old file or the whole new one, never a torn or empty file under `path`.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes owner-only files; runs and caches are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)

    atomic_write(path, write)


def read_json(path: Path):
    with open(path) as f:
        return json.load(f)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp))


def load_config(run: Path) -> RunConfig:
    return RunConfig.from_dict(read_json(Path(run) / "config.json")["config"])


# ------------------------------------------------------------ lock and status

@contextlib.contextmanager
def locked(run: Path):
    """Hold the run's exclusive lock; wait (saying so) while another process holds it.

    The lock is an fcntl.flock on `run/.lock`, released by the kernel when its holder exits,
    killed or not, so a crashed trainer never leaves a stale lock.
    """
    run.mkdir(parents=True, exist_ok=True)
    with open(run / ".lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another process that holds {run.name}", file=sys.stderr, flush=True)
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def read_status(run: Path) -> dict:
    path = run / "status.json"
    return read_json(path) if path.exists() else {}


def write_status(run: Path, state: str, **fields) -> None:
    write_json(run / "status.json", {"state": state, **fields})


def is_locked(run: Path) -> bool:
    """Whether a process holds the run's lock now, i.e. trains it (a killed one holds nothing)."""
    if not (run / ".lock").exists():
        return False
    with open(run / ".lock") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def describe(run: Path) -> dict:
    """What a run directory holds, in one row: its labels, corpus, state and step, and the final validation
    loss once finished. State: finished, failed, training (a process holds the lock), stopped (paused, or its
    process died: `train` resumes it), new, or damaged (a file that cannot be read: `error` says which)."""
    try:
        cfg = read_json(run / "config.json")["config"]
        status = read_status(run)
        results = read_json(run / "results.json") if (run / "results.json").exists() else {}
    except (OSError, ValueError, KeyError) as e:
        return {"run_dir": str(run), "variant": None, "profile": None, "seed": None, "corpus": None,
                "state": "damaged", "step": None, "steps": None, "val_loss": None, "error": f"{type(e).__name__}: {e}"}
    checkpoints = checkpoint_steps(run)
    if results:
        state = "finished"
    elif status.get("state") == "failed":
        state = "failed"
    else:
        state = "training" if is_locked(run) else "stopped" if status or checkpoints else "new"
    step = results.get("steps", status.get("step", max(checkpoints, default=0)))
    return {"run_dir": str(run), "variant": cfg["variant"], "profile": cfg["profile"], "seed": cfg["seed"],
            "corpus": cfg["data"]["corpus"], "state": state, "step": step, "steps": cfg["train"]["steps"],
            "val_loss": results.get("val_loss")}


def clean_partial(run: Path) -> list[str]:
    """Remove what a killed writer leaves behind: temporary files and checkpoint tensors whose
    JSON was never written. Call it only while holding the run's lock. Returns the names removed."""
    leftovers = list(run.glob(".*.tmp"))
    leftovers += [p for p in run.glob("ckpt-*.safetensors") if not p.with_suffix(".json").exists()]
    for path in leftovers:
        path.unlink()
    return sorted(p.name for p in leftovers)


# ---------------------------------------------------------------- checkpoints

def _checkpoint_path(run: Path, step: int) -> Path:
    return run / f"ckpt-{step:07d}.safetensors"


def checkpoint_digest(path: Path, meta: dict) -> str:
    """sha256 of a checkpoint's tensors file and of its JSON state (without the digest itself)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    h.update(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def save_checkpoint(run: Path, step: int, model, optimizer, extra_state: dict) -> None:
    """Model + optimizer tensors in safetensors, everything else (and the sha256) in JSON; the JSON
    is written last, so a checkpoint without it is incomplete. Keeps the newest KEEP_CHECKPOINTS."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, state in opt["state"].items():
        for name, value in state.items():
            tensors[f"opt.{pid}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    path = _checkpoint_path(run, step)
    write_tensors(path, tensors)
    meta = {"step": step, "param_groups": opt["param_groups"], **extra_state}
    write_json(path.with_suffix(".json"), {**meta, "sha256": checkpoint_digest(path, meta)})
    for old in sorted(run.glob("ckpt-*.json"))[:-KEEP_CHECKPOINTS]:
        old.unlink()  # the JSON first: a kill in between leaves tensors that clean_partial removes
        old.with_suffix(".safetensors").unlink(missing_ok=True)


def load_checkpoint(run: Path, step: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """The checkpoint of `step` after checking its hash; CheckpointError if it is damaged."""
    path = _checkpoint_path(run, step)
    try:
        meta = read_json(path.with_suffix(".json"))
        intact = meta["step"] == step and checkpoint_digest(path, meta) == meta["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path.name} is unreadable ({type(e).__name__}: {e})") from e
    if not intact:
        raise CheckpointError(f"checkpoint {path.name} does not match its recorded sha256 (truncated or corrupted)")
    return meta, load_file(path)


def checkpoint_steps(run: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in run.glob("ckpt-*.json"))


def latest_checkpoint(run: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The newest intact checkpoint. Damaged ones are reported on stderr and removed, so the
    previous good one is used. Call it only while holding the run's lock."""
    for step in reversed(checkpoint_steps(run)):
        try:
            return load_checkpoint(run, step)
        except CheckpointError as e:
            print(f"warning: {e}; removed it, falling back to the previous checkpoint", file=sys.stderr, flush=True)
            path = _checkpoint_path(run, step)
            path.with_suffix(".json").unlink()
            path.unlink(missing_ok=True)
    return None


def restore_checkpoint(meta: dict, tensors: dict[str, torch.Tensor], model, optimizer) -> None:
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
