"""Progress bars that read well wherever they are written.

A terminal or a notebook redraws a bar in place ("\\r"); a log file or a pipe would collect every
redraw on one ever-growing line. There each redraw becomes a line of its own, at most one every
`LOG_INTERVAL` seconds. Bars are text (tqdm's plain bar): a static book cannot show widgets.
"""
from __future__ import annotations

import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between two lines of a bar written to a file or a pipe


def redraws_in_place(stream) -> bool:
    """Whether `stream` shows a carriage return as a redraw: a terminal, or a Jupyter kernel's output."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or type(stream).__module__.split(".")[0] == "ipykernel"


class LineStream:
    """A file for tqdm that writes each redraw as one line: no carriage returns, no padding, no blank lines."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(total: int, desc: str, unit: str, stream=None, disable: bool = False, **kwargs) -> tqdm:
    """A tqdm bar on `stream` (default stderr) that redraws in place on a terminal or in a notebook and
    writes one line per update, at most every `LOG_INTERVAL` seconds, anywhere else."""
    stream = sys.stderr if stream is None else stream
    if redraws_in_place(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=disable, dynamic_ncols=True, **kwargs)
    kwargs["mininterval"] = kwargs["maxinterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL)
    return tqdm(total=total, desc=desc, unit=unit, file=LineStream(stream), disable=disable, ncols=0, **kwargs)
