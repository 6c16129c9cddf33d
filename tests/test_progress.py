"""Progress bars: redrawn in place on a terminal or in a notebook, one line per update in a log file or a pipe."""
import io

import pytest

from moe_core import progress
from moe_core.progress import progress_bar, redraws_in_place


class Terminal(io.StringIO):
    def isatty(self):
        return True


class KernelStream(io.StringIO):
    """Stands for ipykernel's OutStream, which says it is no terminal but shows carriage returns as redraws."""


KernelStream.__module__ = "ipykernel.iostream"


def test_only_terminals_and_notebooks_redraw_in_place():
    assert redraws_in_place(Terminal()) and redraws_in_place(KernelStream())
    assert not redraws_in_place(io.StringIO())


def test_a_bar_in_a_log_file_writes_whole_lines(monkeypatch):
    monkeypatch.setattr(progress, "LOG_INTERVAL", 0.0)  # every update may print
    log = io.StringIO()
    with progress_bar(4, "wide/tiny/s0", "step", stream=log, mininterval=0.0) as bar:
        for _ in range(4):
            bar.set_postfix(loss="3.210", refresh=False)
            bar.update(1)
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and text.endswith("\n") and all(line.strip() for line in lines)
    assert lines[0].startswith("wide/tiny/s0:   0%") and "4/4" in lines[-1] and "loss=3.210" in lines[-1]
    assert [f"{n}/4" in line for n, line in enumerate(lines[:5])] == [True] * 5  # the empty bar, then each update


def test_a_bar_in_a_log_file_waits_its_interval(monkeypatch):
    log = io.StringIO()
    with progress_bar(1000, "run", "step", stream=log, mininterval=1.0) as bar:
        for _ in range(1000):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and "1000/1000" in lines[-1]  # the start and the end: the loop took well under 30 s


def test_a_bar_on_a_terminal_redraws_in_place():
    screen = Terminal()
    with progress_bar(3, "run", "step", stream=screen, mininterval=0.0) as bar:
        bar.update(3)
    assert "\r" in screen.getvalue()


@pytest.mark.parametrize("missing", [0, 2])
def test_a_grid_with_nothing_to_train_prints_no_bar(missing, capsys):
    with progress_bar(missing, "runs (smoke)", "run", disable=not missing) as bar:
        bar.update(missing)
    assert ("runs (smoke)" in capsys.readouterr().err) == bool(missing)
