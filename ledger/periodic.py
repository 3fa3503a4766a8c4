"""A pass every interval on a thread of its own: the shape of the expiry sweeper and the Shared
Signals pusher."""

from __future__ import annotations

import logging
import threading
from typing import Self

from ledger.errors import LedgerError


class Periodic:
    """Calls `one_pass` every `interval_seconds` in `run` until `stop`; a pass that fails with a
    LedgerError (the database away, a lost race) is logged and the next one tries again."""

    def __init__(self, interval_seconds: float, *, name: str, log: logging.Logger) -> None:
        self._interval = interval_seconds
        self._name = name
        self._log = log
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def one_pass(self) -> object:
        raise NotImplementedError

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.one_pass()
            except LedgerError as e:
                self._log.warning("%s failed: %s; trying again", self._name, e)
            self.stopping.wait(self._interval)

    def start(self) -> Self:
        """Run in a thread of its own."""
        self._thread = threading.Thread(target=self.run, name=self._name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Ask `run` to return, and wait (up to `timeout`) for a pass in progress to finish."""
        self.stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
