"""The proposal phase of a step: what the engine asks a proposer, and what comes back.

Every proposer (n-gram lookup or a draft model in the verifier's process, or
replicas over gRPC) satisfies one `Proposer` protocol, so the engine's step
has one proposal phase whatever drafts the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from runtime.sampler import SamplingParams

PROB_SLACK = 1e-3  # float rounding in a draft distribution's sum that is still a distribution


@dataclass
class Draft:
    token_ids: list[int]  # k drafted tokens
    # Per drafted token, the draft's distribution as (token ids, probabilities); None = one-hot.
    probs: list[tuple[list[int], list[float]]] | None = None
    # The draft model's confidence stop ended it before k: it could have gone on.
    stopped_early: bool = False

    def well_formed(self, vocab_size: int) -> bool:
        """A proposer's bug (or a rogue proposer) must not reach the target or bias sampling:
        ids in the vocabulary, one distribution per id, each a sub-probability vector (finite,
        non-negative, summing to at most 1) in whose support its drafted token lies."""
        if not all(0 <= t < vocab_size for t in self.token_ids):
            return False
        if self.probs is None:
            return True
        if len(self.probs) != len(self.token_ids):
            return False
        for token, (ids, ps) in zip(self.token_ids, self.probs):
            if len(ids) != len(ps):
                return False
            ids, ps = np.asarray(ids, dtype=np.int64), np.asarray(ps, dtype=np.float64)  # supports run to 10^4
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                return False
            if not np.isfinite(ps).all() or (ps < 0).any() or ps.sum() > 1.0 + PROB_SLACK:
                return False
            if not (ps[ids == token] > 0).any():
                return False
        return True


@dataclass(frozen=True)
class DraftRequest:
    """What a proposer needs to draft for one request."""

    request_id: str
    token_ids: list[int]  # the whole context: prompt + output so far
    k: int
    params: SamplingParams


@dataclass
class Proposal:
    drafts: list[Draft | None] = field(default_factory=list)  # per request in order; None: none this step
    draft_ms: float = 0.0  # drafting time the proposer reports, without any network hop
    # Drafting time summed over the replicas that served the step (draft_ms is the slowest
    # one's, what the step waited for); None: one proposer, the same as draft_ms.
    busy_ms: float | None = None
    failures: int = 0  # replicas that failed (their requests got None)


class Proposer(Protocol):
    async def propose(self, requests: list[DraftRequest]) -> Proposal:
        """Drafts for each request; a failure costs only that request's drafts (None)."""
        ...

    def release(self, request_ids: list[str]) -> None:
        """The requests finished: their draft state may go."""
        ...

    async def flush(self) -> None:
        """Completes what `release` may have deferred: called when the engine goes idle, when no
        proposal will follow to carry it."""
        ...
