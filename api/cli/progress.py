from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """A one-line progress bar on stderr: done of total, rate and time left."""

    def __init__(self, label: str, *, stream: TextIO = sys.stderr, every: float = 0.2) -> None:
        self._label = label
        self._stream = stream
        self._every = every
        self._started = time.monotonic()
        self._shown = 0.0
        self._line = ""

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self._shown < self._every and done < total:
            return
        self._shown = now
        self._line = render(self._label, done, total, now - self._started)
        self._stream.write("\r" + self._line)
        self._stream.flush()

    def finish(self) -> None:
        if self._line:
            self._stream.write("\n")
            self._stream.flush()


def render(label: str, done: int, total: int, seconds: float, width: int = 24) -> str:
    """`label [#####-----] 1,000/2,000 events  500/s  0:02 left`."""
    fraction = min(done / total, 1.0) if total else 1.0
    filled = int(fraction * width)
    rate = done / seconds if seconds > 0 else 0.0
    left = (total - done) / rate if rate > 0 and total > done else 0.0
    minutes, secs = divmod(int(left), 60)
    bar = "#" * filled + "-" * (width - filled)
    return f"{label} [{bar}] {done:,}/{total:,} events  {rate:,.0f}/s  {minutes}:{secs:02d} left"
