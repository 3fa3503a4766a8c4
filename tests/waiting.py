"""Bounded waits on a condition, for tests that watch another thread or process make progress."""

from __future__ import annotations

import time
from collections.abc import Callable

FIRST_PAUSE = 0.005
LONGEST_PAUSE = 0.1


def wait_until(condition: Callable[[], object], *, timeout: float, what: str) -> None:
    """Return once `condition()` is true; raise AssertionError naming `what` after `timeout` s.

    Polls with a short, doubling back-off. A condition may raise to stop the wait early (a
    process that exited, a thread that died).
    """
    deadline = time.monotonic() + timeout
    pause = FIRST_PAUSE
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, LONGEST_PAUSE)
