"""Drafting demand and proposer capacity, for sizing the proposer fleet.

Fed every verifier's steps as the controller receives them, this answers three rates over a
sliding window of wall-clock time (`window_s`, 30 s by default) and the replica count they imply:

- demand: draft tokens per second the verifiers' planners asked for, sum(planned_k) of every
  step that ended in the window, over all known verifiers, divided by the window. Planned, not
  proposed: a proposer that times out or falls behind serves less than was asked, and sizing the
  fleet on what it served would hide the shortfall that more replicas would fix. When the planner
  turns speculation off (k = 0, as it does at large batches where drafting no longer pays), demand
  falls to 0.
- served: draft tokens the proposers returned per second, over the same steps (cheap, and the
  gap to demand shows drafts lost to timeouts and to proposers that found nothing to propose).
- capacity: draft tokens ONE proposer replica serves per second of drafting: the tokens proposed
  in steps that reported a drafting time, divided by the sum of those times (draft_busy_ms, the
  proposer's own time for the exchange, without the network or queueing), over the steps that
  ended within `window_s` of the latest such step. That is the rate of a replica busy 100% of
  the time, at the exchange sizes the window saw.
  Its limits:
    * Batching: a draft model drafts a whole exchange in lockstep, so larger exchanges (bigger
      batches per verifier step) serve more tokens per second. Capacity measured at light load
      understates a replica at heavy load (more replicas are asked for than needed) until the
      window sees the larger exchanges.
    * Several verifiers on one replica: a replica answers one exchange at a time, and each
      exchange's time counts once, so their times add up as the replica's busy time does; no
      batching across verifiers is assumed (none happens).
    * One step's requests spread over several replicas (verifiers pin each request to a replica
      by rendezvous hashing): the step reports the replicas' drafting times summed
      (draft_busy_ms), so tokens drafted in parallel are counted against the time each replica
      spent. A step from a verifier that reports only the slowest replica's time (draft_ms)
      is counted with that, which overstates capacity when its requests spread over replicas.
  Its window ends at the latest drafting, not now: while nothing is drafted (speculation turned
  off) capacity keeps the value of the last full window of drafting, as the replicas did not get
  slower meanwhile, instead of thinning out to the last few steps. Drafting time that yielded no
  token (prompt lookup finding no match) counts; a window of only that measures nothing and the
  value stays. None until a first measurement.
- replicas wanted: ceil(demand / (capacity * target_utilization)), at least `min_replicas`;
  `min_replicas` whenever demand is 0 (no capacity needed), None while demand is positive and
  capacity was never measured (an autoscaler should then hold, not act on a guess).

Step times: a report carries the steps since the previous one (verifiers report every 0.25 s),
with no clock of their own. Each step is placed by its own duration: the last one ended when the
report arrived, and each earlier one ended step_ms before the one after it. The rates read steps
up to the last report, up to a report interval late (under 1% of a 30 s window).

The window always divides by `window_s`: for one window after the controller starts (or after a
verifier first reports), demand reads low while the window fills. An autoscaler's scale-down
stabilisation longer than the window keeps that from shrinking the fleet.

Pure Python; observe, forget and rates may be called from different threads (the metrics
server scrapes on its own).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass

from controller.step import StepRecord


@dataclass(frozen=True)
class DemandRates:
    demand_tps: float  # draft tokens per second the planners asked for
    served_tps: float  # draft tokens per second the proposers returned
    capacity_tps: float | None  # draft tokens per second one busy replica serves (None: never measured)
    replicas_wanted: int | None  # None: demand but no capacity measured yet


class _Sums:
    """Steps in a window, oldest first, and their sums (of the fields after the end time)."""

    def __init__(self):
        self.steps: deque[tuple[float, int, int | float]] = deque()  # (end time s, a, b)
        self.a, self.b = 0, 0

    def add(self, end: float, a: int, b: int | float) -> None:
        self.steps.append((end, a, b))
        self.a += a
        self.b += b

    def drop_until(self, start: float) -> None:
        """Drops the steps that ended at or before `start`."""
        while self.steps and self.steps[0][0] <= start:
            _, a, b = self.steps.popleft()
            self.a -= a
            self.b -= b
        if not self.steps:  # no float rounding left behind
            self.a, self.b = 0, 0


class ProposerDemand:
    def __init__(self, window_s: float = 30.0, target_utilization: float = 0.7, min_replicas: int = 1):
        """Raises ValueError naming the bad setting."""
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"proposer_window_s: must be > 0, got {window_s}")
        if not 0 < target_utilization <= 1:
            raise ValueError(f"proposer_target_utilization: must be in (0, 1], got {target_utilization}")
        if min_replicas < 0:
            raise ValueError(f"min_proposers: must be >= 0, got {min_replicas}")
        self.window_s = window_s
        self.target_utilization = target_utilization
        self.min_replicas = min_replicas
        self._asked: dict[str, _Sums] = {}  # per verifier: (end, planned tokens, proposed tokens)
        self._drafted = _Sums()  # steps that reported drafting time: (end, proposed tokens, draft_ms)
        self._capacity: float | None = None
        self._lock = threading.Lock()

    def observe(self, verifier_id: str, steps: list[StepRecord], arrived: float) -> None:
        """One report's steps, in order; `arrived`: when it came (s, the clock `rates` is given)."""
        with self._lock:
            asked = self._asked.setdefault(verifier_id, _Sums())
            ends, end = [], arrived
            for step in reversed(steps):
                ends.append(end)
                end -= step.step_ms / 1e3
            for end, step in zip(reversed(ends), steps):
                proposed = sum(p for _, p, _ in step.drafts)
                asked.add(end, sum(step.planned_k), proposed)
                busy_ms = step.draft_busy_ms or step.draft_ms
                if busy_ms > 0:
                    self._drafted.add(end, proposed, busy_ms)
            asked.drop_until(arrived - self.window_s)
            if self._drafted.steps:
                self._drafted.drop_until(self._drafted.steps[-1][0] - self.window_s)
                if self._drafted.a > 0:
                    self._capacity = 1e3 * self._drafted.a / self._drafted.b

    def forget(self, verifier_id: str) -> bool:
        """Drops a verifier's demand (it disconnected or went silent); False if unknown. What its
        steps measured of the proposers stays: the replicas did not change."""
        with self._lock:
            return self._asked.pop(verifier_id, None) is not None

    @property
    def verifiers(self) -> int:
        return len(self._asked)

    def rates(self, now: float) -> DemandRates:
        with self._lock:
            for asked in self._asked.values():
                asked.drop_until(now - self.window_s)
            demand = sum(w.a for w in self._asked.values()) / self.window_s
            served = sum(w.b for w in self._asked.values()) / self.window_s
            capacity = self._capacity
        return DemandRates(demand, served, capacity, self.replicas_for(demand, capacity))

    def replicas_for(self, demand_tps: float, capacity_tps: float | None) -> int | None:
        if demand_tps <= 0:
            return self.min_replicas
        if capacity_tps is None:
            return None
        # A hair above an integer (float rounding of demand / capacity) is that integer.
        wanted = math.ceil(demand_tps / (capacity_tps * self.target_utilization) - 1e-9)
        return max(self.min_replicas, wanted)
