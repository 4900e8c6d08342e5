"""Messages a guest can trigger as often as it likes, logged a few times and then
counted, so that a hostile guest cannot flood standard error."""

from __future__ import annotations

import logging
import threading


class LogLimit:
    """``limit(level, msg, *args)`` logs the first ``first`` messages; the next one says
    that further ones are counted, and :meth:`close` logs the count. ``say`` (one line
    of text) replaces the logger where the user is told another way (a CLI's note)."""

    def __init__(self, logger: logging.Logger | None = None, first: int = 3, say=None):
        self.logger, self.first, self.say = logger, first, say
        self.count = 0
        self._lock = threading.Lock()

    def _out(self, level: int, msg: str, *args) -> None:
        if self.say is not None:
            self.say(msg % args if args else msg)
        else:
            self.logger.log(level, msg, *args)

    def __call__(self, level: int, msg: str, *args) -> None:
        with self._lock:
            self.count += 1
            n = self.count
        if n <= self.first:
            self._out(level, msg, *args)
        if n == self.first:
            self._out(level, "(further messages like this are counted, not shown)")

    def close(self) -> None:
        """Log how many were not shown (once)."""
        with self._lock:
            hidden, self.count = self.count - self.first, min(self.count, self.first)
        if hidden > 0:
            self._out(logging.WARNING, "%d more messages like the above were not shown",
                      hidden)
