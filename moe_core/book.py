"""The executable book: run the notebooks of a plan with papermill, then build with jupyter-book.

A plan (`book/plans/<profile>.yaml`) lists notebooks in dependency order with their parameters.
Each notebook's executed copy (`executed/<name>.ipynb`, under `output_dir()`) records a key: a hash of the notebook,
its parameters, the moe_core sources, the torch version and the keys of every notebook before it.
An unchanged key skips the notebook, so a warm rebuild only re-renders; training runs are cached
separately in the run store. The HTML is built from a staged copy (`_build/src`) in which the
executed notebooks sit at their sources' paths (notebooks/), so launch buttons open the clean
notebook in the repository. papermill, nbformat and jupyter-book are imported only here.
"""
from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

import moe_core

from .config import ConfigError
from .data import CORPORA
from .store import atomic_write
from .variants import paper_reference, profiles, resolve, variants

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS, PLANS = ROOT / "notebooks", ROOT / "book" / "plans"
META_KEY = "moe_core_book"


# ------------------------------------------------------------------ parameters

def declared_parameters(notebook: Path) -> dict:
    """Name -> default of the assignments in the notebook's cell tagged `parameters`."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    for cell in cells:
        if "parameters" in cell.get("metadata", {}).get("tags", []):
            tree = ast.parse("".join(cell["source"]))
            return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
                    if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}
    raise ValueError(f"{notebook} has no cell tagged 'parameters'")


def _same_type(value, default) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return False
        scalar = {type(d) for d in default if not isinstance(d, (list, tuple, dict))}
        homogeneous = len(scalar) == 1 and len(default) == sum(1 for d in default if type(d) in scalar)
        return not homogeneous or all(_same_type(v, default[0]) for v in value)  # e.g. seeds: all ints
    return isinstance(value, type(default))


def _int_from(low: int):
    """Test: an integer (not a bool) >= low."""
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low


def _real_in(low: float, high: float = math.inf, open_low: bool = False):
    """Test: a finite real number in [low, high] (or (low, high] with open_low)."""
    return lambda v: (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      and (low < v if open_low else low <= v) and v <= high)


def _k_tau(pair) -> bool:
    """Whether pair is one cell of the K x tau grid: [top-k >= 1, tau > 0 or "learned"]."""
    return (isinstance(pair, (list, tuple)) and len(pair) == 2 and _int_from(1)(pair[0])
            and (pair[1] == "learned" or _real_in(0.0, open_low=True)(pair[1])))


_SEED, _COUNT = (_int_from(0), "a non-negative integer"), (_int_from(1), "a positive integer")
_POSITIVE = (_real_in(0.0, open_low=True), "a finite number > 0")
# Parameter name -> (test of its value, or of each element of a list, and what that must be). Names mean
# the same in every notebook; a name not listed here is only type-checked.
VALUE_RULES = {
    **dict.fromkeys(("seed", "seeds", "control_seeds", "baseline_seeds", "cost_seeds"), _SEED),
    **dict.fromkeys(("block", "blocks", "smoothing", "top_tokens", "top_paths", "n_sequences", "shuffle_draws",
                     "robustness_batches"), _COUNT),
    "n_resamples": (_int_from(100), "an integer >= 100 (a percentile interval needs resamples beyond its tails)"),
    **dict.fromkeys(("eps", "noise_sigmas"), (_real_in(0.0), "a finite number >= 0")),
    "token_fractions": (_real_in(0.0, 1.0), "a share of tokens in [0, 1]"),
    **dict.fromkeys(("deltas", "primary_delta"), _POSITIVE),
    "configs": (_k_tau, "a pair [top-k >= 1, tau > 0 or 'learned']"),
}
# Parameters that name things: name -> kind (the valid names are listed in the error).
NAME_KINDS = {**dict.fromkeys(("variant", "static_variant", "variants", "cosine_variants", "controls",
                               "core_variants", "baselines"), "variant"),
              "profile": "profile", "corpus": "corpus", "chapters": "chapter"}
NON_EMPTY = ("seeds", "control_seeds", "baseline_seeds", "cost_seeds", "variants", "cosine_variants",
             "core_variants", "configs", "eps", "deltas", "blocks", "chapters")


def _includes(*names):
    """Need: the list holds every one of names (the chapter's claims are about them)."""
    return lambda value, params: set(names) <= set(value), f"must include {', '.join(map(str, names))}"


def _at_least(n: int):
    """Need: the list holds n entries or more (the chapter pairs its first seeds)."""
    return lambda value, params: len(value) >= n, f"must hold at least {n} seeds"


# What one chapter reads by name or position, beyond the rules above: notebook -> [(parameter, test of its
# value and of all the parameters, what it must be)].
CHAPTER_NEEDS = {
    "exp_replication": [("variants", *_includes("wide", "deep"))],
    "fig_curves": [("cosine_variants", *_includes("wide", "deep")),
                   ("controls", *_includes("dense_iso_flop", "dense_iso_param")),
                   ("control_seeds", lambda value, params: value[0] in params["seeds"],
                    "must start with one of seeds (the figures of every configuration show that seed)")],
    "table3": [("cosine_variants", *_includes("wide")),
               ("controls", *_includes("linear", "cosine_iso341", "hash", "random_fixed", "top1", "rank2",
                                       "dense_iso_flop", "dense_iso_param"))],
    "tables_equivalence": [("cosine_variants", *_includes("wide", "deep")),
                           ("seeds", *_at_least(2)),
                           ("blocks", *_includes(1)),
                           ("primary_delta", lambda value, params: value in params["deltas"], "must be one of deltas")],
    "mech_experts": [("seeds", *_at_least(2))],
    "pathmoe_grid": [("core_variants", *_includes("indep", "indep_nolbl", "path_b4", "path_b4_lbl", "path_b2", "path_bL")),
                     ("baselines", *_includes("lowrank", "monob4", "rand"))],
    "pathmoe_paths": [("variants", *_includes("indep", "indep_nolbl", "path_b2", "path_b4", "path_bL")),
                      ("block", lambda value, params: all(resolve(v, params["profile"]).model.n_layers % value == 0
                                                          for v in params["variants"]),
                       "must divide the number of layers of every model in variants at the profile")],
}


def _valid_names(kind: str) -> list[str]:
    """The names a parameter of this kind may take (variants, profiles, corpora, chapters)."""
    if kind == "chapter":
        return sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb") if p.stem != "summary")
    return list({"variant": variants, "profile": profiles, "corpus": lambda: CORPORA}[kind]())


def _check_value(name: str, value, where: str) -> None:
    """Range and name checks of one parameter (VALUE_RULES, NAME_KINDS, NON_EMPTY)."""
    is_list = isinstance(value, (list, tuple))
    items = list(value) if is_list else [value]
    if name in NON_EMPTY and not items:
        raise ConfigError(where, value, "must not be empty")
    if name in NAME_KINDS:
        valid = _valid_names(NAME_KINDS[name])
        for item in items:
            if item not in valid:
                raise ConfigError(where, item, f"unknown {NAME_KINDS[name]}; valid: {', '.join(valid)}")
    if name in VALUE_RULES:
        test, what = VALUE_RULES[name]
        for item in items:
            if not test(item):
                raise ConfigError(where, item, f"each value of {name} must be {what}" if is_list else f"must be {what}")


def check_parameters(given: dict, declared: dict, notebook: str) -> None:
    """Reject unknown, ill-typed or out-of-range parameters before any work (papermill alone only warns)."""
    for name, value in given.items():
        where = f"{notebook}.{name}"
        if name not in declared:
            raise ConfigError(where, value, f"unknown parameter; valid: {', '.join(declared)}")
        if not _same_type(value, declared[name]):
            raise ConfigError(where, value,
                              f"must be of type {type(declared[name]).__name__} like the default {declared[name]!r}")
        _check_value(name, value, where)
    params = {**declared, **given}
    for name, need, what in CHAPTER_NEEDS.get(notebook, []):
        if not need(params[name], params):
            raise ConfigError(f"{notebook}.{name}", params[name], what)


@dataclass
class NotebookRun:
    """What a notebook knows about its own execution: its parameters and when it started."""

    name: str
    params: dict
    started: float = field(default_factory=time.perf_counter)

    def provenance(self) -> dict:
        """Commit, versions, device, profile and wall time, for the notebook's last cell."""
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
        return {"notebook": self.name, "profile": self.params.get("profile"), "git_commit": commit,
                "moe_core": moe_core.__version__, "torch": torch.__version__,
                "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                "wall_seconds": round(time.perf_counter() - self.started, 1)}


def notebook_parameters(namespace: dict, name: str) -> NotebookRun:
    """Called right after a notebook's parameters cell: validate what papermill injected.

    Unknown names show up as extra user variables in the kernel's namespace.
    """
    declared = declared_parameters(NOTEBOOKS / f"{name}.ipynb")
    hidden = set()
    try:
        hidden = set(get_ipython().user_ns_hidden)  # noqa: F821 (defined inside IPython)
    except NameError:
        pass
    user = {k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in hidden and not callable(v) and not isinstance(v, type(sys))}
    check_parameters(user, declared, name)
    return NotebookRun(name, {k: user.get(k, declared[k]) for k in declared})


# ----------------------------------------------------------------------- plans

def load_plan(profile: str) -> list[tuple[str, dict]]:
    """The (notebook, parameters) list of a profile's plan, validated before any work."""
    path = PLANS / f"{profile}.yaml"
    if not path.exists():
        plans = ", ".join(p.stem for p in sorted(PLANS.glob("*.yaml")))
        raise ConfigError("profile", profile, f"no book plan; valid plans: {plans}")
    plan = yaml.safe_load(path.read_text())
    steps = []
    for entry in plan["notebooks"]:
        name, params = entry["notebook"], {"profile": plan["profile"], **(entry.get("params") or {})}
        notebook = NOTEBOOKS / f"{name}.ipynb"
        if not notebook.exists():
            raise ConfigError(f"plan {profile}", name, f"no notebook {notebook.relative_to(ROOT)}")
        check_parameters(params, declared_parameters(notebook), name)
        steps.append((name, params))
    return steps


def output_dir() -> Path:
    """Where the book's products go: executed/ (the executed notebooks) and _build/ (the HTML). The
    repository root, or $MOE_BOOK_OUTPUT, relative to the root (the tests build the tiny book in a temporary
    folder, leaving the real one alone). Read from the environment so that the summary notebook's kernel,
    which collects the verdicts and runs in the root, sees the same folder."""
    return ROOT / os.environ.get("MOE_BOOK_OUTPUT", "")


def executed_dir() -> Path:
    return output_dir() / "executed"


def source_digest() -> str:
    """A hash of every moe_core source and data file, the C++ kernels included: any code change re-executes
    the book."""
    h = hashlib.sha256()
    for path in sorted(Path(moe_core.__file__).parent.rglob("*")):
        if path.suffix in (".py", ".yaml", ".cpp", ".h"):
            h.update(path.relative_to(ROOT).as_posix().encode() + path.read_bytes())
    return h.hexdigest()


def notebook_key(name: str, params: dict, upstream: str, digest: str) -> str:
    blob = json.dumps({"notebook": (NOTEBOOKS / f"{name}.ipynb").read_text(), "params": params,
                       "moe_core": digest, "torch": torch.__version__, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def executed_key(path: Path) -> str | None:
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("metadata", {}).get(META_KEY, {}).get("key")


@contextlib.contextmanager
def kernel_config():
    """The kernel settings for one notebook run: on POSIX, IPC sockets in a fresh private temporary folder
    (removed afterwards), so no TCP port is opened, ipykernel (>= 7) has nothing to warn about ("Kernel is
    running over TCP without encryption"), and two runs at once never share a socket path; TCP elsewhere."""
    from traitlets.config import Config

    if os.name != "posix":
        yield Config({"KernelManager": {"transport": "tcp"}})
        return
    with tempfile.TemporaryDirectory(prefix="moe-kernel-") as sockets:  # short: socket paths hold ~100 bytes
        yield Config({"KernelManager": {"transport": "ipc", "ip": os.path.join(sockets, "k")}})


def execute_plan(profile: str, log=print) -> list[dict]:
    """Run every notebook of the plan whose key changed; returns one record per notebook."""
    import nbformat
    import papermill

    steps = load_plan(profile)
    digest, upstream, records, executed = source_digest(), "", [], executed_dir()
    executed.mkdir(parents=True, exist_ok=True)
    for name, params in steps:
        key = notebook_key(name, params, upstream, digest)
        upstream += key
        out = executed / f"{name}.ipynb"
        if executed_key(out) == key:
            log(f"book: {name}: up to date")
            records.append({"notebook": name, "executed": False, "seconds": 0.0})
            continue
        log(f"book: {name}: executing with {params}")
        start = time.perf_counter()
        tmp = executed / f".{name}.running.ipynb"
        with kernel_config() as config:
            papermill.execute_notebook(NOTEBOOKS / f"{name}.ipynb", tmp, parameters=params, cwd=str(ROOT),
                                       kernel_name="python3", progress_bar=False, config=config)
        nb = nbformat.read(tmp, as_version=4)
        nb.metadata[META_KEY] = {"key": key, "profile": profile, "params": params}
        atomic_write(out, lambda path: nbformat.write(nb, path))
        tmp.unlink()
        seconds = time.perf_counter() - start
        log(f"book: {name}: done in {seconds:.0f} s")
        records.append({"notebook": name, "executed": True, "seconds": seconds})
    return records


def hosted_url(url: str) -> str | None:
    """An https or ssh git URL of a hosted repository as https://host/org/repo; None for anything else."""
    match = re.match(r"^(?:git@([^:]+):|https?://([^/]+)/)([^/]+/[^/]+?)(?:\.git)?/?$", url)
    return f"https://{match[1] or match[2]}/{match[3]}" if match else None


def repository_url() -> str | None:
    """The repository launch buttons point at: $MOE_BOOK_REPOSITORY (empty: none), else git's `origin`
    when it is a hosted repository, else None. A malformed $MOE_BOOK_REPOSITORY is an error."""
    url = os.environ.get("MOE_BOOK_REPOSITORY")
    if url is not None:
        if url and hosted_url(url) is None:
            raise ConfigError("MOE_BOOK_REPOSITORY", url, "write https://<host>/<org>/<repo> or "
                              "git@<host>:<org>/<repo>.git, or set it empty for no launch buttons")
        return hosted_url(url)
    found = subprocess.run(["git", "remote", "get-url", "origin"], cwd=ROOT, capture_output=True, text=True)
    return hosted_url(found.stdout.strip()) if found.returncode == 0 else None


def book_config(repository: str | None) -> dict:
    """_config.yml, plus launch buttons (Binder, Colab) and a repository button when the repository is known."""
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    if repository:
        config["repository"] = {"url": repository, "branch": "main", "path_to_book": ""}
        config["launch_buttons"] = {"notebook_interface": "jupyterlab", "binderhub_url": "https://mybinder.org",
                                    "colab_url": "https://colab.research.google.com"}
        config.setdefault("html", {})["use_repository_button"] = True
    return config


def stage_sources(stage: Path) -> None:
    """The book's sources as jupyter-book sees them: the chapters, and the executed notebooks under
    notebooks/, the path of their clean sources in the repository, which launch buttons open."""
    import shutil

    if stage.exists():
        shutil.rmtree(stage)
    shutil.copytree(ROOT / "book", stage / "book")
    shutil.copy2(ROOT / "_toc.yml", stage / "_toc.yml")
    (stage / "notebooks").mkdir()
    for notebook in executed_dir().glob("[!.]*.ipynb"):
        shutil.copy2(notebook, stage / "notebooks" / notebook.name)


def build_html(repository: str | None, log=print) -> Path:
    """jupyter-book build of the staged sources, execution off (the notebooks ran already), warnings as errors;
    launch buttons for `repository` (see repository_url)."""
    stage = output_dir() / "_build" / "src"
    stage_sources(stage)
    atomic_write(stage / "_config.yml", lambda tmp: Path(tmp).write_text(yaml.safe_dump(book_config(repository))))
    log(f"book: launch buttons for {repository}" if repository else
        "book: no launch buttons (MOE_BOOK_REPOSITORY is empty, or git's `origin` is missing or not a hosted "
        "repository; set MOE_BOOK_REPOSITORY=https://github.com/<org>/<repo>)")
    executable = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(executable if executable.exists() else "jupyter-book"), "build", str(stage), "--path-output", str(output_dir()),
           "--builder", "html", "-W", "-n", "--keep-going"]
    log("book: " + " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    html = output_dir() / "_build" / "html"
    removed = prune_unused_images(html)
    if removed:
        log(f"book: removed {removed} figure(s) of earlier builds that no page shows")
    return html / "index.html"


def shown_images(html: Path) -> set[str]:
    """The names of the files in html/_images that some page of the site refers to."""
    return {urllib.parse.unquote(name) for page in html.rglob("*.html")  # Sphinx writes the names %-quoted
            for name in re.findall(r"_images/([^\"'\s)?#]+)", page.read_text(encoding="utf-8"))}


def prune_unused_images(html: Path) -> int:
    """Delete the files in html/_images that no page refers to: Sphinx's incremental builds add a new file
    for every changed figure and never remove the old one, so a published site would carry them all."""
    images = html / "_images"
    if not images.is_dir():
        return 0
    used = shown_images(html)
    stale = [image for image in images.iterdir() if image.is_file() and image.name not in used]
    for image in stale:
        image.unlink()
    return len(stale)


def build_book(profile: str, html: bool = True, log=print) -> dict:
    start = time.perf_counter()
    repository = repository_url() if html else None  # a malformed MOE_BOOK_REPOSITORY fails here, before any work
    records = execute_plan(profile, log)
    index = build_html(repository, log) if html else None
    return {"profile": profile, "notebooks": records, "index": str(index) if index else None,
            "seconds": round(time.perf_counter() - start, 1)}


# ------------------------------------------------------------- notebook helpers

def glue_value(key: str, value) -> None:
    """Glue a number or string for {glue:text}; numpy scalars become Python ones (myst-nb formats those)."""
    from myst_nb import glue

    glue(key, value.item() if hasattr(value, "item") else value, display=False)


def glue_verdict(key: str, verdict) -> None:
    """Glue a claims.Verdict as Markdown, for {glue:md} in the narrative."""
    from IPython.display import Markdown
    from myst_nb import glue

    glue(key, Markdown(f"**{verdict.outcome}** ({verdict.reason})"), display=False)


_VERDICT = re.compile(r"^\*\*(?P<outcome>[a-z]+)\*\* \((?P<reason>.*)\)$", re.S)
_RECORD = "application/papermill.record/text/markdown"


def collect_verdicts(names: list[str], executed: Path | None = None):
    """Every verdict glued by the executed notebooks `names` (in `executed`, default executed_dir()), in
    order: a DataFrame, one row per claim, with the paper's claim it tests (moe_core/reference.yaml)."""
    import pandas as pd

    executed, rows = executed or executed_dir(), []
    for name in names:
        path = executed / f"{name}.ipynb"
        if not path.exists():
            raise FileNotFoundError(f"{path} has not been executed yet; run the book's plan first")
        for cell in json.loads(path.read_text())["cells"]:
            for output in cell.get("outputs", []):
                key = output.get("metadata", {}).get("scrapbook", {}).get("name", "")
                match = _VERDICT.match(output.get("data", {}).get(_RECORD, "")) if key.startswith("verdict_") else None
                if match:
                    rows.append({"chapter": name, "claim": key.removeprefix("verdict_"), **match.groupdict()})
    statements = paper_reference()["verdict_claims"]  # where each claim is made, and what it says
    for row in rows:
        row["paper_claim"], row["statement"] = statements.get(row["claim"], ("(not in moe_core/reference.yaml)", ""))
    return pd.DataFrame(rows, columns=["chapter", "claim", "paper_claim", "statement", "outcome", "reason"])


def glue_figure(key: str, fig) -> None:
    """Glue a figure for a numbered {glue:figure} and close it so it is not shown twice."""
    import matplotlib.pyplot as plt
    from myst_nb import glue

    glue(key, fig, display=False)
    plt.close(fig)
