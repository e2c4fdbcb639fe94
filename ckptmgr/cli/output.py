"""The CLI's one output object: data on stdout (human or ``--json``), diagnostics on stderr."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class Output:
    def __init__(self, *, as_json: bool):
        self.as_json = as_json
        self._console = None
        self._err_console = None

    @property
    def console(self):
        if self._console is None:
            from rich.console import Console

            self._console = Console(highlight=False, soft_wrap=True)
        return self._console

    @property
    def err(self):
        if self._err_console is None:
            from rich.console import Console

            self._err_console = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err_console

    @property
    def styled(self) -> bool:
        """Rich styling on a terminal; off one (a pipe, Modal's logs, CI) every line is printed whole."""
        return sys.stdout.isatty()

    def line(self, text: str, *, style: str | None = None) -> None:
        """One line for people: styled by rich on a terminal, plain otherwise (rich is not even imported)."""
        text = printable(text)
        if self.styled:
            self.console.print(text, style=style, markup=False)
        else:
            sys.stdout.write(text + "\n")

    def result(self, data: Any, render: Callable[[Any], None]) -> None:
        """Emit the command's result: JSON for machines, ``render`` for people."""
        if self.as_json:
            sys.stdout.write(json.dumps(_finite(data), indent=2, sort_keys=True, default=str, allow_nan=False) + "\n")
        else:
            render(data)

    def warn(self, message: str) -> None:
        message = printable(message)
        if not self.as_json and sys.stderr.isatty():
            self.err.print("warning:", style="yellow", end=" ")
            self.err.print(message, markup=False)
        else:
            sys.stderr.write(f"warning: {message}\n")

    @contextmanager
    def progress(self, description: str, total_bytes: int) -> Iterator[Callable[[int], None]]:
        """A byte progress bar on a terminal; a no-op callback otherwise. Thread-safe."""
        if self.as_json or not sys.stderr.isatty() or total_bytes < 64 * 1024 * 1024:
            yield lambda n: None
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                      TransferSpeedColumn(), console=self.err, transient=True) as bar:
            task = bar.add_task(description, total=total_bytes)
            yield lambda n: bar.advance(task, n)


class LazyBar:
    """A byte progress bar whose total is known only once work is planned (export)."""

    def __init__(self, out: Output, description: str):
        self.out, self.description = out, description
        self._context: Any = None
        self._advance: Callable[[int], None] = lambda n: None

    def start(self, total_bytes: int) -> None:
        self._context = self.out.progress(self.description, total_bytes)
        self._advance = self._context.__enter__()

    def advance(self, n: int) -> None:
        self._advance(n)

    def close(self) -> None:
        if self._context is not None:
            self._context.__exit__(None, None, None)


def _finite(data: Any) -> Any:
    """JSON has no NaN or infinity: such a number is written as null."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data


def printable(text: str) -> str:
    """``text`` as stdout can encode it: a file name that is not UTF-8 shows as escapes, never a traceback."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding, "replace")


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def human_age(unix: float | None) -> str:
    if unix is None:
        return "-"
    seconds = max(0.0, time.time() - unix)
    for limit, unit in ((120, "s"), (7200, "min"), (172800, "h")):
        if seconds < limit:
            divisor = {"s": 1, "min": 60, "h": 3600}[unit]
            return f"{seconds / divisor:.0f} {unit}"
    return f"{seconds / 86400:.1f} d"
