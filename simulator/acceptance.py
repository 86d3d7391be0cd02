"""Acceptance of drafted tokens, as a per-request random process.

Each request draws its own rate once, from Beta(mean * c, (1 - mean) * c): requests
differ (a chat turn and a code edit do), and `concentration` c says how much (c large:
all alike). Each drafted token is then kept with that rate, independently, up to the
first rejection: the geometric model the goodput maths assumes. Draws come from the
simulation's seeded generator, so a run is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AcceptanceModel:
    mean: float = 0.7
    concentration: float = 20.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.mean <= 1.0:
            raise ValueError(f"acceptance mean must be in [0, 1], got {self.mean}")
        if self.concentration <= 0:
            raise ValueError(f"acceptance concentration must be positive, got {self.concentration}")

    def draw_rate(self, rng: np.random.Generator) -> float:
        if self.mean in (0.0, 1.0):
            return self.mean
        return float(rng.beta(self.mean * self.concentration, (1.0 - self.mean) * self.concentration))


def accepted_prefix(rng: np.random.Generator, rate: float, k: int) -> int:
    """How many of k drafted tokens the target keeps: the leading successes of k trials."""
    kept = rng.random(k) < rate
    return int(k if kept.all() else kept.argmin())
