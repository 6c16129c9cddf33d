"""The book: every notebook executes under papermill at the tiny profile, the HTML builds with -W,
every glue key a chapter references exists, and bad parameters are rejected before any work."""
import json
import os
import re

import pytest

from moe_core import book
from moe_core.config import ConfigError
from moe_core.variants import paper_reference

GLUE_REF = re.compile(r"\{glue:(?:text|md)\}`([A-Za-z0-9_]+)|```\{glue:figure\}\s+([A-Za-z0-9_]+)")


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_cache):
    """The tiny book, built in a temporary folder: the checkout's own executed/, _build/, runs and data cache
    stay as they are."""
    out = tmp_path_factory.mktemp("book")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MOE_CORE_RUNS", str(out / "runs"))
        mp.setenv("MOE_CORE_CACHE", str(shared_cache))
        mp.setenv("MOE_BOOK_OUTPUT", str(out))
        yield book.build_book("tiny")


def glued_keys(notebook) -> set[str]:
    keys = set()
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            scrap = output.get("metadata", {}).get("scrapbook")
            if scrap:
                keys.add(scrap["name"])
    return keys


def test_every_notebook_executes_and_the_book_builds(built):
    assert [r["notebook"] for r in built["notebooks"]] == [name for name, _ in book.load_plan("tiny")]
    assert book.output_dir() != book.ROOT and built["index"] == str(book.output_dir() / "_build" / "html" / "index.html")
    assert (book.output_dir() / "_build" / "html" / "index.html").exists()
    for name, _ in book.load_plan("tiny"):
        assert (book.output_dir() / "_build" / "html" / "notebooks" / f"{name}.html").exists()


def test_the_site_holds_exactly_the_figures_its_pages_show(built):
    html = book.output_dir() / "_build" / "html"
    shown = book.shown_images(html)
    assert shown and shown == {image.name for image in (html / "_images").iterdir()}


def test_figures_of_earlier_builds_are_pruned(tmp_path):
    (tmp_path / "_images").mkdir()
    for name in ("old.png", "new.png", "diagram.svg", "my fig+1.png", "résumé.svg"):
        (tmp_path / "_images" / name).write_bytes(b"x")
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "a.html").write_text('<img src="../_images/new.png" alt="">'
                                                   '<img srcset="../_images/my%20fig%2B1.png 2x">')
    (tmp_path / "index.html").write_text("<object data='_images/diagram.svg#frag'></object>"
                                         "<img src='_images/r%C3%A9sum%C3%A9.svg'>", encoding="utf-8")
    assert book.prune_unused_images(tmp_path) == 1
    assert sorted(p.name for p in (tmp_path / "_images").iterdir()) == ["diagram.svg", "my fig+1.png", "new.png",
                                                                        "résumé.svg"]
    assert book.prune_unused_images(tmp_path / "missing") == 0


def test_every_glue_reference_exists(built):
    for name, _ in book.load_plan("tiny"):
        executed = json.loads((book.executed_dir() / f"{name}.ipynb").read_text())
        available = glued_keys(executed)
        referenced = {a or b for cell in executed["cells"] if cell["cell_type"] == "markdown"
                      for a, b in GLUE_REF.findall("".join(cell["source"]))}
        assert referenced, f"{name} glues nothing into its narrative"
        assert referenced <= available, f"{name}: missing glue keys {referenced - available}"
        assert "provenance" in available


def test_summary_gathers_every_verdict(built):
    """The summary page lists exactly the verdicts the chapters glued, each a known outcome."""
    chapters = book.declared_parameters(book.NOTEBOOKS / "summary.ipynb")["chapters"]
    verdicts = book.collect_verdicts(chapters)
    expected = {(name, key.removeprefix("verdict_")) for name, _ in book.load_plan("tiny") if name != "summary"
                for key in glued_keys(json.loads((book.executed_dir() / f"{name}.ipynb").read_text()))
                if key.startswith("verdict_")}
    assert set(zip(verdicts.chapter, verdicts.claim)) == expected and len(verdicts) == len(expected)
    assert set(verdicts.outcome) <= {"agrees", "disagrees", "undecided"} and verdicts.reason.str.len().min() > 0
    known = paper_reference()["verdict_claims"]  # every verdict says which claim of which paper it tests
    assert set(verdicts.claim) <= set(known), set(verdicts.claim) - set(known)
    assert list(verdicts.statement) == [known[c][1] for c in verdicts.claim] and verdicts.statement.str.len().min() > 0


def test_collect_verdicts_names_a_missing_chapter(tmp_path):
    with pytest.raises(FileNotFoundError, match="exp_k_tau"):
        book.collect_verdicts(["exp_k_tau"], tmp_path)


def test_unchanged_notebooks_are_not_executed_again(built):
    again = book.execute_plan("tiny", log=lambda *_: None)
    assert not any(r["executed"] for r in again)


def test_executed_notebooks_record_provenance_and_key(built):
    executed = json.loads((book.executed_dir() / "table3.ipynb").read_text())
    assert executed["metadata"][book.META_KEY]["profile"] == "tiny"
    assert len(executed["metadata"][book.META_KEY]["key"]) == 16


def test_plan_parameters_are_validated():
    declared = book.declared_parameters(book.NOTEBOOKS / "exp_convergence.ipynb")
    assert declared["seeds"] == [42, 137, 7] and declared["profile"] == "smoke"
    with pytest.raises(ConfigError, match="unknown parameter; valid: profile, cosine_variants, seeds"):
        book.check_parameters({"sedes": [1]}, declared, "exp_convergence")
    with pytest.raises(ConfigError, match="must be of type list"):
        book.check_parameters({"seeds": 42}, declared, "exp_convergence")
    with pytest.raises(ConfigError, match="must be of type list"):
        book.check_parameters({"seeds": ["42"]}, declared, "exp_convergence")
    with pytest.raises(ConfigError, match="no book plan; valid plans: paper, smoke, tiny"):
        book.load_plan("huge")


def test_every_notebook_default_passes_the_value_rules():
    for notebook in sorted(book.NOTEBOOKS.glob("*.ipynb")):
        declared = book.declared_parameters(notebook)
        book.check_parameters(declared, declared, notebook.stem)


@pytest.mark.parametrize("notebook,given,message", [
    ("pathmoe_paths", {"token_fractions": [0.1, 1.5]}, "token_fractions=1.5: each value of token_fractions must be a share"),
    ("pathmoe_paths", {"noise_sigmas": [-0.1]}, "noise_sigmas=-0.1: each value of noise_sigmas must be a finite number >= 0"),
    ("pathmoe_paths", {"shuffle_draws": 0}, "shuffle_draws=0: must be a positive integer"),
    ("pathmoe_paths", {"block": 3}, "block=3: must divide the number of layers of every model in variants"),
    ("pathmoe_paths", {"cost_seeds": []}, r"cost_seeds=\[\]: must not be empty"),
    ("pathmoe_paths", {"variants": ["indep", "indpe"]}, "variants='indpe': unknown variant; valid: wide, deep"),
    ("pathmoe_paths", {"seed": -1}, "seed=-1: must be a non-negative integer"),
    ("mech_halting", {"eps": [0.1, float("nan")]}, "eps=nan: each value of eps must be a finite number >= 0"),
    ("mech_halting", {"static_variant": "static"}, "static_variant='static': unknown variant"),
    ("exp_replication", {"corpus": "wiki"}, "corpus='wiki': unknown corpus; valid: wiki-vital,"),
    ("exp_k_tau", {"configs": [[12, 30], [12, "fixed"]]}, r"configs=\[12, 'fixed'\]: each value of configs must be a pair"),
    ("exp_k_tau", {"configs": [[0, 30]]}, r"configs=\[0, 30\]"),
    ("tables_equivalence", {"n_resamples": 10}, "n_resamples=10: must be an integer >= 100"),
    ("tables_equivalence", {"deltas": [0.02, 0.05]}, "primary_delta=0.03: must be one of deltas"),
    ("tables_equivalence", {"seeds": [42]}, r"seeds=\[42\]: must hold at least 2 seeds"),
    ("tables_equivalence", {"blocks": [5, 10]}, r"blocks=\[5, 10\]: must include 1"),
    ("pathmoe_grid", {"core_variants": ["indep", "path_b2"]}, "core_variants=.*: must include indep, indep_nolbl, path_b4"),
    ("pathmoe_grid", {"baseline_seeds": []}, r"baseline_seeds=\[\]: must not be empty"),
    ("fig_curves", {"control_seeds": [1]}, r"control_seeds=\[1\]: must start with one of seeds"),
    ("table3", {"controls": ["linear"]}, r"controls=\['linear'\]: must include linear, cosine_iso341"),
    ("summary", {"chapters": ["table3", "table4"]}, "chapters='table4': unknown chapter; valid: exp_convergence"),
    ("table3", {"profile": "huge"}, "profile='huge': unknown profile; valid: paper, small, smoke, tiny"),
])
def test_out_of_range_parameters_are_rejected_with_the_valid_choices(notebook, given, message):
    declared = book.declared_parameters(book.NOTEBOOKS / f"{notebook}.ipynb")
    with pytest.raises(ConfigError, match=f"invalid {notebook}.{message}"):
        book.check_parameters(given, declared, notebook)


def test_injected_unknown_parameter_is_rejected_inside_the_notebook():
    namespace = {"profile": "smoke", "seeds": [42], "sedes": [1]}
    with pytest.raises(ConfigError, match="exp_convergence.sedes"):
        book.notebook_parameters(namespace, "exp_convergence")
    run = book.notebook_parameters({"profile": "tiny", "seeds": [42]}, "exp_convergence")
    assert run.params["profile"] == "tiny" and run.params["control_seeds"] == [42]
    assert {"git_commit", "moe_core", "torch", "device", "profile", "wall_seconds"} <= run.provenance().keys()


@pytest.mark.skipif(os.name != "posix", reason="IPC sockets are a POSIX transport")
def test_notebook_kernels_listen_on_ipc_sockets(tmp_path):
    nbformat, papermill = pytest.importorskip("nbformat"), pytest.importorskip("papermill")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "from ipykernel.kernelapp import IPKernelApp\nprint(IPKernelApp.instance().transport)")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "in.ipynb")
    with book.kernel_config() as config:
        sockets = os.path.dirname(config.KernelManager.ip)
        papermill.execute_notebook(tmp_path / "in.ipynb", tmp_path / "out.ipynb", kernel_name="python3",
                                   progress_bar=False, config=config, cwd=str(tmp_path))
        with book.kernel_config() as other:
            assert os.path.dirname(other.KernelManager.ip) != sockets  # two runs at once never share sockets
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[0].outputs[0]["text"].strip() == "ipc"  # no TCP port, no ipykernel warning about one
    assert not os.path.exists(sockets) and not list(tmp_path.glob("*ipc*"))  # nothing left behind


def test_every_plan_is_valid():
    for profile in ("tiny", "smoke", "paper"):
        assert book.load_plan(profile)


@pytest.mark.parametrize("remote,url", [
    ("git@github.com:org/moe-book.git", "https://github.com/org/moe-book"),
    ("https://gitlab.com/org/moe-book.git", "https://gitlab.com/org/moe-book"),
    ("https://github.com/org/moe-book", "https://github.com/org/moe-book"),
    ("", None),  # set empty: no launch buttons
])
def test_launch_buttons_follow_the_repository(monkeypatch, remote, url):
    monkeypatch.setenv("MOE_BOOK_REPOSITORY", remote)
    assert book.repository_url() == url
    config = book.book_config(url)
    if url:
        assert config["repository"]["url"] == url and config["launch_buttons"]["binderhub_url"]
        assert config["html"]["use_repository_button"]
    else:
        assert "launch_buttons" not in config and "repository" not in config


def test_a_local_remote_gives_no_launch_buttons_but_a_malformed_setting_is_an_error(monkeypatch):
    assert book.hosted_url("/srv/git/moe-book") is None  # git's origin may be a local path: no buttons
    monkeypatch.setenv("MOE_BOOK_REPOSITORY", "/srv/git/moe-book")
    with pytest.raises(ConfigError, match="MOE_BOOK_REPOSITORY='/srv/git/moe-book'.*https://<host>"):
        book.repository_url()
    executed = []
    monkeypatch.setattr(book, "execute_plan", lambda *a, **k: executed.append(a))
    with pytest.raises(ConfigError):
        book.build_book("tiny")
    assert not executed, "the setting is checked before any notebook runs"


def test_source_digest_covers_the_cpp_kernels(tmp_path, monkeypatch):
    """A change to a C++ kernel re-executes the book, as a change to a Python file does."""
    package = tmp_path / "moe_core"
    (package / "csrc").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.setattr(book.moe_core, "__file__", str(package / "__init__.py"))
    monkeypatch.setattr(book, "ROOT", tmp_path)
    digests = []
    for name, text in (("csrc/kernel.cpp", "int a;"), ("csrc/kernel.cpp", "int b;"), ("csrc/kernel.h", "#pragma once"),
                       ("model.py", "x = 1")):
        (package / name).write_text(text)
        digests.append(book.source_digest())
    assert len(set(digests)) == 4
