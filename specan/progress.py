"""Progress of long work: a Rich bar on a terminal, one plain line per checkpoint elsewhere.

Both implement `specan.pipeline.Progress`; the library calls them and never prints.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class BarProgress:
    """Checkpoints done, views per checkpoint, MB/s, time left; warnings printed above the bar."""

    def __init__(
        self, console: Console, label: str = "ingest", translate: Callable[[str], str] = str
    ) -> None:
        self.console = console
        self.label = label
        self.translate = translate  # library wording -> the caller's (the CLI: argument -> flag)
        self._bar: Progress | None = None
        self._task: TaskID | None = None
        self._bytes = 0
        self._t0 = 0.0

    def start(self, checkpoints: int, views: int, nbytes: int) -> None:
        self._t0 = time.perf_counter()
        self._bar = Progress(
            TextColumn(f"[bold]{self.label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("checkpoints · {task.fields[views]} views · {task.fields[rate]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(self.label, total=checkpoints, views=views, rate="… MB/s")

    def advance(self, checkpoint: str, views: int, nbytes: int) -> None:
        self._bytes += nbytes
        rate = self._bytes / 2**20 / max(time.perf_counter() - self._t0, 1e-9)
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1, rate=f"{rate:.1f} MB/s")

    def warn(self, message: str) -> None:
        text = escape(self.translate(message))
        self.console.print(f"[yellow]warning:[/] {text}", highlight=False)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class LineProgress:
    """For logs and CI: a line per checkpoint with running totals, no control characters."""

    def __init__(
        self, console: Console, label: str = "ingest", translate: Callable[[str], str] = str
    ) -> None:
        self.console = console
        self.label = label
        self.translate = translate
        self._n = self._total = self._bytes = 0
        self._t0 = 0.0

    def start(self, checkpoints: int, views: int, nbytes: int) -> None:
        self._total, self._t0 = checkpoints, time.perf_counter()
        self.console.print(
            f"{self.label}: {checkpoints} checkpoints × {views} views, {nbytes / 2**20:.1f} MB",
            highlight=False,
            markup=False,
        )

    def advance(self, checkpoint: str, views: int, nbytes: int) -> None:
        self._n += 1
        self._bytes += nbytes
        dt = max(time.perf_counter() - self._t0, 1e-9)
        self.console.print(
            f"{self.label}: {self._n}/{self._total} {checkpoint} "
            f"({self._bytes / 2**20 / dt:.1f} MB/s, {dt:.1f} s)",
            highlight=False,
            markup=False,
        )

    def warn(self, message: str) -> None:
        self.console.print(f"warning: {self.translate(message)}", highlight=False, markup=False)

    def finish(self) -> None:
        pass


def for_console(
    console: Console, label: str = "ingest", translate: Callable[[str], str] = str
) -> BarProgress | LineProgress:
    """The bar on an interactive terminal, plain lines when output goes to a file or pipe;
    warnings pass through ``translate`` (the CLI's names its flags where the library names
    arguments)."""
    kind = BarProgress if console.is_terminal else LineProgress
    return kind(console, label, translate)
