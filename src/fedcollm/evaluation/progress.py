"""A line every so often from a long evaluation loop, with an estimate of what is left:
scoring a 1.5B model on a CPU takes minutes, and a silent minute looks like a hang. On
stderr: stdout may be a result someone parses (`evaluate --json`)."""

from __future__ import annotations

import sys
import time

EVERY_SECONDS = 20.0


class Progress:
    """`advance(n)` after each batch; prints only once `EVERY_SECONDS` have passed since the
    start or the last line, so that quick loops stay silent."""

    def __init__(self, what: str, total: int) -> None:
        self.what, self.total, self.done = what, total, 0
        self.start = self.last = time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last < EVERY_SECONDS or self.done >= self.total:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed * (self.total - self.done) / self.done
        print(
            f"  {self.what}: {self.done}/{self.total} in {elapsed:.0f} s, about {left:.0f} s left",
            file=sys.stderr,
            flush=True,
        )
