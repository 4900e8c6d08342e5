"""Messages a guest can trigger as often as it likes, logged a few times and then
counted, so that a hostile guest cannot flood standard error."""

from __future__ import annotations

import logging
import threading


class LogLimit:
    """``limit(level, msg, *args)`` logs the first ``first`` messages; the next one says
    that further ones are counted, and :meth:`close` logs the count."""

    def __init__(self, logger: logging.Logger, first: int = 3):
        self.logger, self.first = logger, first
        self.count = 0
        self._lock = threading.Lock()

    def __call__(self, level: int, msg: str, *args) -> None:
        with self._lock:
            self.count += 1
            n = self.count
        if n <= self.first:
            self.logger.log(level, msg, *args)
        if n == self.first:
            self.logger.log(level, "(further messages like this are counted, not shown)")

    def close(self) -> None:
        """Log how many were not shown (once)."""
        with self._lock:
            hidden, self.count = self.count - self.first, min(self.count, self.first)
        if hidden > 0:
            self.logger.warning("%d more messages like the above were not shown", hidden)
