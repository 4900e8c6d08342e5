"""A minimal progress line on a terminal (stderr); silent when stderr is not a TTY."""

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

    def __call__(self, what: str, fraction: float) -> None:
        if not self.enabled or time.monotonic() - self.start < self.min_seconds:
            return
        width = 30
        filled = int(max(0.0, min(1.0, fraction)) * width)
        self.stream.write(f"\r{self.label} [{'#' * filled}{' ' * (width - filled)}] {what:<20}")
        self.stream.flush()
        self.shown = True

    def done(self) -> None:
        if self.shown:
            self.stream.write("\r" + " " * 70 + "\r")
            self.stream.flush()
