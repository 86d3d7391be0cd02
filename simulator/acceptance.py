"""Acceptance of drafted tokens, as a per-request random process.

A simulated request gets a `RequestProcess` when it arrives: the chance that the
target keeps the draft token at each position (given it kept the ones before; the
last rate holds for deeper positions), and the context lengths at which the proposer
offers nothing (an n-gram lookup that finds no match there). Drafted tokens are kept
up to the first rejection. Two sources:

- `AcceptanceModel`: each request draws one rate from Beta(mean * c, (1 - mean) * c);
  requests differ (a chat turn and a code edit do), and the concentration c says how
  much. The geometric model the goodput maths assumes.
- `TraceAcceptance`: each request replays one recorded request's rates per position,
  estimated from the rounds a live run traced, and the contexts where its proposer
  found nothing (`simulator.trace`).

Draws come from the simulation's seeded generator, so a run is reproducible.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestProcess:
    rates: tuple[float, ...]  # P(keep position j | kept the ones before); the last holds beyond
    no_match: frozenset[int] = frozenset()  # context lengths (prompt + output) with no draft on offer

    def accepted(self, rng: np.random.Generator, k: int) -> int:
        """How many of k drafted tokens the target keeps: the leading successes of k trials."""
        if len(self.rates) == 1:  # geometric: P(at least j kept) = rate^j, from one draw
            rate = self.rates[0]
            if rate <= 0.0 or rate >= 1.0:
                return k if rate >= 1.0 else 0
            return min(k, int(math.log(1.0 - rng.random()) / self._log_rate))
        rates = self.rates[:k] if len(self.rates) >= k else self.rates + self.rates[-1:] * (k - len(self.rates))
        kept = rng.random(k) < np.asarray(rates)
        return int(k if kept.all() else kept.argmin())

    @functools.cached_property
    def _log_rate(self) -> float:  # asked at every verification of the request's drafts
        return math.log(self.rates[0])


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

    def draw(self, rng: np.random.Generator, index: int) -> RequestProcess:
        return RequestProcess((self.draw_rate(rng),))


@dataclass(frozen=True)
class TraceAcceptance:
    """Request i of the workload replays `processes[i % len(processes)]`."""

    processes: tuple[RequestProcess, ...]

    def __post_init__(self) -> None:
        if not self.processes:
            raise ValueError("an acceptance trace needs at least one request")

    @property
    def mean(self) -> float:
        """The mean first-position rate: what a table tuned for this workload assumes."""
        return float(np.mean([p.rates[0] for p in self.processes]))

    def draw(self, rng: np.random.Generator, index: int) -> RequestProcess:
        return self.processes[index % len(self.processes)]


def accepted_prefix(rng: np.random.Generator, rate: float, k: int) -> int:
    """How many of k drafted tokens the target keeps at one rate for every position."""
    return RequestProcess((rate,)).accepted(rng, k)
