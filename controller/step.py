"""One engine step, as everything downstream of the engine sees it.

The engine fills a `StepRecord` once per step. The cost model fits on it, the
acceptance estimates learn from its drafts, the verifier's metrics read it, and
the controller receives it (protocol.controller converts it to and from
`StepMetrics`). Step-time profiles are rows of the same record with no drafts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class StepRecord:
    batch_size: int  # requests in the step, prefilling ones included
    num_batched_tokens: int  # tokens fed to the target, drafts included
    num_kv_tokens: int  # KV tokens attended over
    verify_ms: float  # the target's forward pass and sampling
    sample_ms: float = 0.0  # of verify_ms, the sampling and rejection sampling
    num_prefill_tokens: int = 0
    num_preempted: int = 0
    planned_k: tuple[int, ...] = ()  # k the planner chose, per scheduled request
    # Per request that speculated: (request id, drafts proposed, drafts accepted).
    # Ids stay in the verifier: the controller receives "" for each.
    drafts: tuple[tuple[str, int, int], ...] = ()
    propose_ms: float = 0.0  # proposal time the engine waited
    draft_ms: float = 0.0  # drafting time the proposers reported (0: none, e.g. a timeout)
    # The same summed over the replicas that drafted (draft_ms is the slowest one's, what the
    # step waited for); 0 from a verifier that does not report it.
    draft_busy_ms: float = 0.0
    proposer_failures: int = 0  # proposers (replicas) that failed this step; not sent to the controller
    step_ms: float = 0.0  # the whole step, scheduling to emitted tokens
    emitted_tokens: int = 0
    step_id: int = 0

    # Cached: the cost fit reads them for every step in its window at every refit.
    @functools.cached_property
    def draft_steps(self) -> int:
        """Lockstep draft-model steps the proposal needed: the deepest k (0: nothing proposed)."""
        return max(self.planned_k, default=0)

    @functools.cached_property
    def draft_tokens(self) -> int:
        return sum(self.planned_k)
