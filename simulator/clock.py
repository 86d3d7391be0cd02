"""Simulated time: the engine reads it where a live one reads the wall clock."""

from __future__ import annotations


class VirtualClock:
    """Seconds since the simulation began; calling it reads it (like `time.monotonic`)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance_ms(self, ms: float) -> None:
        self.now += ms / 1e3

    def advance_to(self, t: float) -> None:
        self.now = max(self.now, t)
