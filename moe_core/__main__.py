"""Command line: `python -m moe_core {list,params,train,sweep,runs,eval,book}`.

Commands that produce results end their standard output with one JSON line, the stable
interface scripts and CI read (under torchrun, rank 0 alone prints it). Bad names and values
are rejected before any work, with exit status 2; a run that fails (a non-finite loss) exits 1.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
import textwrap
from pathlib import Path

from .config import ConfigError
from .variants import check_name, paper_reference, profiles, resolve, variants


def cmd_list(args) -> dict:
    from .data import CORPORA, OFFLINE_CORPORA

    print("variants:")
    for name, spec in variants().items():
        print(f"  {name:16s} {spec.get('description', '')}")
    print("profiles:")
    for name, spec in profiles().items():
        print(textwrap.fill(spec.get("description", ""), 110, initial_indent=f"  {name:16s} ", subsequent_indent=" " * 19))
    print("corpora:")
    for name in CORPORA:
        print(f"  {name:16s} {'offline (bundled)' if name in OFFLINE_CORPORA else 'Hugging Face hub via datasets'}")
    return {"variants": list(variants()), "profiles": list(profiles()), "corpora": list(CORPORA)}


def cmd_params(args) -> dict:
    from .params import count_parameters

    cfg = resolve(args.variant, args.profile, overrides=overrides_from(args.set or ()))
    counts = count_parameters(cfg.model)
    result = {"variant": args.variant, "profile": args.profile, **counts}
    paper = paper_reference()["equifinality_table3"].get(args.variant, {})
    if args.profile == "paper" and paper:
        result["paper_routing"] = paper.get("routing_params")
        result["paper_total"] = paper.get("total_params")
    return result


def run_overrides(args) -> dict:
    """The overrides of --steps, --device, --corpus and every --set, as {section: {key: value}}."""
    flags = [("train", "steps", args.steps), ("train", "device", args.device), ("data", "corpus", args.corpus)]
    if args.corpus is not None:
        from .data import CORPORA

        check_name("corpus", args.corpus, CORPORA)
    return overrides_from([flag for flag in flags if flag[2] is not None] + list(args.set or ()))


def overrides_from(settings) -> dict:
    """{section: {key: value}} from (section, key, value) settings; a key set twice (by --set or a flag) is an error."""
    overrides, seen = {}, {}
    for section, key, value in settings:
        if (section, key) in seen:
            raise ConfigError(f"{section}.{key}", value, f"set twice (first to {seen[section, key]!r}); keep one")
        seen[section, key] = value
        overrides.setdefault(section, {})[key] = value
    return overrides


def require_directories(paths: dict, writable: bool = True) -> None:
    """Each path a command will use (flag -> the path given, or None for the flag's default) is a directory
    or does not exist yet, and (`writable`) could be written, checked before any work. A default is named by
    where it came from: the environment variable that set it, or the flag whose default it is."""
    from .train import CACHE_ENV, RUNS_ENV, default_cache_dir, default_run_root

    defaults = {"--run-root": (RUNS_ENV, default_run_root), "--cache-dir": (CACHE_ENV, default_cache_dir)}
    for flag, path in paths.items():
        name = flag
        if path is None:
            env, default = defaults[flag]
            name, path = (env if env in os.environ else f"{flag}'s default"), default()
        if path.exists() and not path.is_dir():
            raise ConfigError(name, str(path), "must be a directory (it exists as a file)")
        nearest = next(p for p in (path, *path.absolute().parents) if p.exists())  # what a mkdir would start from
        if not nearest.is_dir() or (writable and not os.access(nearest, os.W_OK | os.X_OK)):
            kind = "a writable directory" if nearest.is_dir() else "a directory"
            raise ConfigError(name, str(path), f"cannot be written: {nearest} is not {kind}")


def train_options(args) -> dict:
    """The keyword arguments of `train` that the train and sweep commands share."""
    require_directories({"--run-root": args.run_root, "--cache-dir": args.cache_dir})
    return {"run_root": args.run_root, "cache_dir": args.cache_dir, "progress": not args.no_progress}


def cmd_train(args) -> dict | None:
    from .train import train

    cfg = resolve(args.variant, args.profile, args.seed, run_overrides(args))
    note_short_schedule([cfg])
    return train(cfg, **train_options(args))


def note_short_schedule(configs) -> None:
    """Say so when a run ends inside its warm-up (`--steps 30` at the paper profile, say): its learning rate
    never reaches train.lr, which a reader of its loss should know. Allowed: short runs time the trainer."""
    for t in dict.fromkeys(cfg.train for cfg in configs):
        if t.steps <= t.warmup_steps:
            print(f"note: train.steps={t.steps} <= train.warmup_steps={t.warmup_steps}: the learning rate stays in its "
                  f"warm-up and peaks at {t.lr * t.steps / t.warmup_steps:.3g}, {100 * t.steps / t.warmup_steps:.0f}% of "
                  f"train.lr={t.lr:g}", file=sys.stderr)


def cmd_sweep(args) -> dict | None:
    """Train this machine's slice of variants x seeds: run j of the product when j % N == I."""
    from .train import RunFailed, train

    index, count = args.shard
    overrides = run_overrides(args)
    # every run of every shard is resolved, so a bad name or value fails on each machine alike, before any work
    everything = [resolve(v, args.profile, s, overrides) for v in dict.fromkeys(args.variant)
                  for s in dict.fromkeys(args.seed)]  # dict.fromkeys: a name or seed given twice counts once
    configs = everything[index::count]
    note_short_schedule(configs)
    if not configs:
        print(f"sweep: shard {index}/{count} holds none of the {len(everything)} runs", file=sys.stderr)
    options, results, failed = train_options(args), [], []
    for cfg in configs:  # a failed run does not stop the others; the sweep then exits 1, listing it
        try:
            results.append(train(cfg, **options))
        except RunFailed as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            failed.append({"variant": cfg.variant, "seed": cfg.seed, "error": str(e)})
    keys = ("run_dir", "variant", "seed", "val_loss", "val_ppl", "cached")
    return {"profile": args.profile, "shard": f"{index}/{count}",
            "runs": [{k: r[k] for k in keys} for r in results if r is not None], "failed": failed}


def cmd_runs(args) -> dict:
    """The run store, one line per run, filtered by variant and profile."""
    from .store import describe
    from .train import default_run_root

    require_directories({"--run-root": args.run_root}, writable=False)
    root = args.run_root or default_run_root()
    rows = [describe(config.parent) for config in sorted(root.glob("*/config.json"))]
    rows = [r for r in rows if r["state"] == "damaged"  # shown whatever the filters
            or args.variant in (None, r["variant"]) and args.profile in (None, r["profile"])]
    for r in rows:
        name = Path(r["run_dir"]).name
        if r["state"] == "damaged":
            print(f"{name:56s} damaged   {r['error']}")
            continue
        loss = f"val loss {r['val_loss']:.4f}" if r["val_loss"] is not None else ""
        print(f"{name:56s} {r['state']:9s} {r['step']:>6}/{r['steps']:<6} {r['corpus']:14s} {loss}")
    print(f"{len(rows)} run(s) in {root}", file=sys.stderr)
    return {"run_root": str(root), "runs": rows}


def cmd_eval(args) -> dict:
    from .evaluate import evaluate
    from .experiments import load_run_dir
    from .store import load_config
    from .train import require_device
    from .trajectory import Interventions

    run = Path(args.run_dir)
    if not (math.isfinite(args.halt_eps) and args.halt_eps >= 0):
        raise ConfigError("--halt-eps", args.halt_eps, "must be a finite number >= 0")
    if args.device:
        require_device("--device", args.device)
    require_directories({"--cache-dir": args.cache_dir}, writable=False)
    if not run.is_dir():
        raise ConfigError("run_dir", str(run), "is not a directory" if run.exists() else "does not exist")
    if not (run / "final.safetensors").exists():
        raise ConfigError("run_dir", str(run), unfinished(run))
    check_interventions(args, run, load_config(run).model)
    model, cfg, batches = load_run_dir(run, args.device or training_device(run), args.cache_dir)
    iv = Interventions(halt_eps=args.halt_eps, freeze_routing=args.freeze_routing, zero_moe=args.zero_moe)
    result = evaluate(model, batches, next(model.parameters()).device, cfg.train.precision, iv)
    result.pop("batch_losses")
    return {"run_dir": str(run), "variant": cfg.variant, "seed": cfg.seed, "halt_eps": iv.halt_eps,
            "freeze_routing": iv.freeze_routing, "zero_moe": iv.zero_moe, **result}


def training_device(run: Path) -> str:
    """Where a finished run trained (so eval sees the precision it trained in), or the CPU if that was CUDA
    and this machine has none (then the loss may differ from results.json by the bf16 rounding)."""
    import torch

    from .store import read_json

    trained = read_json(run / "results.json").get("device", "cpu").split(":")[0]
    if trained == "cuda" and not torch.cuda.is_available():
        print("eval: the run trained on CUDA and this machine has none; evaluating on the CPU (with precision auto: "
              "in fp32, where training used bf16 autocast)", file=sys.stderr)
        return "cpu"
    return trained


def unfinished(run: Path) -> str:
    """Why a directory without final weights cannot be evaluated, and what to do."""
    from .store import describe

    if (run / "config.json").exists():
        r = describe(run)
        where = f"at step {r['step']} of {r['steps']}"
        if r["state"] == "damaged":
            return f"holds a run whose files cannot be read ({r['error']})"
        if r["state"] == "failed":
            return f"holds a run that failed {where} (status.json says why); `train` with its settings says what to do"
        if r["state"] == "training":
            return f"holds a run that a process is training now ({where}); wait for it to finish"
        return f"holds a run that has not finished ({r['state']} {where}); `train` with its settings finishes it"
    if any(run.glob("*/config.json")):
        return "is a run store, not a run: pass one of its runs (`runs` lists them)"
    return "holds no run (no config.json)"


def check_interventions(args, run: Path, model) -> None:
    """A dense model has nothing to intervene on (an error); on one hop per layer, halting and frozen routing
    change nothing (a note, so that a loop over variants still runs)."""
    asked = [flag for flag, on in (("--halt-eps", args.halt_eps > 0), ("--freeze-routing", args.freeze_routing),
                                   ("--zero-moe", args.zero_moe)) if on]
    if model.ffn == "dense" and asked:
        raise ConfigError("run_dir", str(run), f"a dense model, with no MoE layer for {' and '.join(asked)} to act on")
    multi_hop = [flag for flag in asked if flag != "--zero-moe"]
    if multi_hop and max(model.hops_per_layer()) == 1:
        verb = "changes" if len(multi_hop) == 1 else "change"
        print(f"eval: {' and '.join(multi_hop)} {verb} nothing on a model with one hop per layer", file=sys.stderr)


def cmd_book(args) -> dict:
    from .book import build_book

    return build_book(args.profile, html=not args.no_html)


def shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N."""
    match = re.fullmatch(r"(\d+)/(\d+)", text)
    if not match or not int(match[1]) < int(match[2]):
        raise argparse.ArgumentTypeError(f"invalid shard {text!r}: write I/N with 0 <= I < N, e.g. 0/4")
    return int(match[1]), int(match[2])


def setting(text: str) -> tuple[str, str, object]:
    """'section.key=value' -> (section, key, value), the value read as YAML (true, [1, 2], 0.5), except that
    a number in exponent form that YAML 1.1 leaves as a string (3e-4, 1.5e3) is a float."""
    import yaml

    match = re.fullmatch(r"(\w+)\.(\w+)=(.*)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"invalid setting {text!r}: write section.key=value, e.g. train.eval_batches=16")
    value = yaml.safe_load(match[3])
    if isinstance(value, bool) and match[3].lower() not in ("true", "false"):
        value = match[3]  # YAML 1.1 reads on/off/yes/no as booleans; train.compile=on means the word
    elif isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        value = float(value)
    return match[1], match[2], value


RUN_ROOT_HELP = "where run directories live (default $MOE_CORE_RUNS, else ./runs)"
CACHE_HELP = "tokenizer and token cache (default $MOE_CORE_CACHE, else ./.cache/moe_core)"


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, help="override the profile's number of steps")
    p.add_argument("--corpus", help="override the profile's corpus (see `list`)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"),
                   help="where to train (default: the config's train.device, auto: CUDA if there is a GPU)")
    p.add_argument("--run-root", type=Path, help=RUN_ROOT_HELP)
    p.add_argument("--cache-dir", type=Path, help=CACHE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set_flag(p)


def add_set_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", type=setting, action="append", metavar="SECTION.KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set train.eval_batches=16; the run's hash "
                        "covers it")


def add_names(p: argparse.ArgumentParser, many: bool = False) -> None:
    p.add_argument("--variant", required=True, nargs="+" if many else None,
                   help="variant name(s)" if many else "variant name (`list` prints them)")
    p.add_argument("--profile", required=True, help="profile name: the scale (`list` prints them)")


def parser() -> argparse.ArgumentParser:
    """The command line; no flag may be abbreviated (--freeze is not --freeze-routing)."""
    p = argparse.ArgumentParser(prog="python -m moe_core", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    command = functools.partial(sub.add_parser, allow_abbrev=False)
    command("list", help="print the variants, profiles and corpora")
    params = command("params", help="parameter counts of a variant at a profile")
    add_names(params)
    add_set_flag(params)
    train = command("train", help="train a run, or return the stored results of a finished one")
    add_names(train)
    train.add_argument("--seed", type=int, default=42, help="(default 42)")
    add_run_flags(train)
    sweep = command("sweep", help="train one machine's slice (--shard I/N) of variants x seeds")
    add_names(sweep, many=True)
    sweep.add_argument("--seed", type=int, nargs="+", default=[42], help="(default 42)")
    sweep.add_argument("--shard", type=shard, default=(0, 1), help="I/N: train runs j with j %% N == I (default 0/1)")
    add_run_flags(sweep)
    runs = command("runs", help="list the run store: each run's state, step and validation loss")
    runs.add_argument("--variant", help="only this variant's runs")
    runs.add_argument("--profile", help="only this profile's runs")
    runs.add_argument("--run-root", type=Path, help=RUN_ROOT_HELP)
    ev = command("eval", help="re-evaluate a finished run on its validation batches")
    ev.add_argument("run_dir", help="a run's directory, e.g. runs/deep_smoke_s42_<hash> (`runs` lists them)")
    ev.add_argument("--device", choices=("auto", "cpu", "cuda"),
                    help="default: where the run trained (so in its precision), the CPU if that was CUDA and there "
                         "is none here")
    ev.add_argument("--cache-dir", type=Path, help=CACHE_HELP)
    ev.add_argument("--halt-eps", type=float, default=0.0, help="relative-norm halting threshold (default 0: off)")
    ev.add_argument("--freeze-routing", action="store_true", help="reuse the hop-0 routing at every hop")
    ev.add_argument("--zero-moe", action="store_true", help="set every MoE layer's expert update to zero")
    book = command("book", help="execute the book's notebooks for a profile and build the HTML")
    book.add_argument("--profile", default="smoke", help="(default smoke)")
    book.add_argument("--no-html", action="store_true", help="execute the notebooks only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from . import cpu_kernels
    from .data import CorpusUnavailable
    from .train import RunFailed, World

    commands = {"list": cmd_list, "params": cmd_params, "train": cmd_train, "sweep": cmd_sweep, "runs": cmd_runs,
                "eval": cmd_eval, "book": cmd_book}
    try:
        reports = World.from_env().main
        cpu_kernels.checked_switch()
        result = commands[args.command](args)
    except (ConfigError, CorpusUnavailable) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        again = " (rerun the same command: a run resumes from its last checkpoint)" if args.command in (
            "train", "sweep", "book") else ""
        print(f"\ninterrupted{again}", file=sys.stderr)
        return 130
    if result is not None and reports:
        print(json.dumps(result))
    return 1 if result and result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
