"""A minimal progress line on a terminal (stderr); silent when stderr is not a TTY.

The bar never goes backwards, and ``done()`` clears its line, so whatever is printed
next starts on a clean line."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, min_seconds: float = 0.3, stream=None):
        self.label, self.stream = label, stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.start = time.monotonic()
        self.min_seconds = min_seconds
        self.shown = False
        self.fraction = 0.0

    def __call__(self, what: str, fraction: float) -> None:
        self.fraction = max(self.fraction, min(1.0, fraction))
        if not self.enabled or time.monotonic() - self.start < self.min_seconds:
            return
        width = 30
        filled = int(self.fraction * width)
        self.stream.write(f"\r{self.label} [{'#' * filled}{' ' * (width - filled)}] "
                          f"{self.fraction * 100:3.0f}% {what:<20}")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 79 + "\r")
            self.stream.flush()
            self.shown = False
