"""A one-line progress display on stderr (stdout is kept for the final report).

On a terminal the line is rewritten in place; in a pipe or log, only finished
lines (``done``) and at most one status line every few seconds are written, so
logs stay readable. No dependency needed.
"""

from __future__ import annotations

import sys
import time


class Progress:
    """The status line of a long run; ``status`` rewrites it, ``done`` leaves a line."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.width = 0
        self.last_plain = 0.0

    def status(self, text: str) -> None:
        """Replace the current status line."""
        if self.tty:
            pad = max(0, self.width - len(text))
            sys.stderr.write("\r" + text + " " * pad)
            self.width = len(text)
        elif time.monotonic() - self.last_plain >= 5:
            sys.stderr.write(text + "\n")
            self.last_plain = time.monotonic()
        sys.stderr.flush()

    def done(self, text: str) -> None:
        """Finish the current line with a permanent message."""
        if self.tty:
            sys.stderr.write("\r" + text + " " * max(0, self.width - len(text)) + "\n")
            self.width = 0
        else:
            sys.stderr.write(text + "\n")
        sys.stderr.flush()
