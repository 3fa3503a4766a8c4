"""Progress of long CLI commands (export, rebuild) on stderr, drawn by rich."""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)


class ProgressBar:
    """A `progress(done, total)` callback: label, bar, done/total events, rate and time left."""

    def __init__(self, label: str, *, stream: TextIO | None = None) -> None:
        # Not a terminal (a pipe, a test): rich draws no live bar, and finish() prints the
        # final line once, so logs get one line per command rather than control codes.
        console = Console(file=stream or sys.stderr, width=100)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("events"),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            TextColumn("left"),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._label = label

    def __call__(self, done: int, total: int) -> None:
        if self._task is None:
            self._progress.start()
            self._task = self._progress.add_task(self._label, total=total, rate="")
        speed = self._progress.tasks[0].speed or 0.0
        self._progress.update(self._task, completed=done, total=total, rate=f"{speed:,.0f}/s")

    def finish(self) -> None:
        if self._task is not None:
            self._progress.stop()
