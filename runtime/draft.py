"""The proposal phase of a step: what the engine asks a proposer, and what comes back.

Every proposer (n-gram lookup or a draft model in the verifier's process, or
replicas over gRPC) satisfies one `Proposer` protocol, so the engine's step
has one proposal phase whatever drafts the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from runtime.sampler import SamplingParams


@dataclass
class Draft:
    token_ids: list[int]  # k drafted tokens
    # Per drafted token, the draft's distribution as (token ids, probabilities); None = one-hot.
    probs: list[tuple[list[int], list[float]]] | None = None
    # The draft model's confidence stop ended it before k: it could have gone on.
    stopped_early: bool = False


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
    failures: int = 0  # replicas that failed (their requests got None)


class Proposer(Protocol):
    async def propose(self, requests: list[DraftRequest]) -> Proposal:
        """Drafts for each request; a failure costs only that request's drafts (None)."""
        ...

    def release(self, request_ids: list[str]) -> None:
        """The requests finished: their draft state may go."""
        ...
