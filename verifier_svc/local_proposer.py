"""A proposer backend inside the verifier process: n-gram lookup, or a draft model on one node.

Lookup costs microseconds, less than any network hop; a small draft model next
to the target saves the hop and, on shared CPU cores, the contention of a
second process (BENCHMARKS.md, "Speculation at batch 1 (built-in draft pair)"). The backends and their
per-request states are the proposer service's own; the state follows the
verifier's committed context (it only grows, so the new tokens are its tail).
"""

from __future__ import annotations

import time

from proposer_svc.draft_model import DraftCall
from proposer_svc.state import StateStore
from verifier_svc.rejection import Draft


class LocalProposer:
    def __init__(self, backend, max_requests: int = 4096):
        """`backend`: proposer_svc's NgramBackend or DraftModelBackend."""
        self.backend = backend
        self.store = StateStore(backend.new_state, max_requests, on_evict=backend.release)
        self.last_draft_ms = 0.0  # the engine's cost fit reads it as drafting time (no hop here)

    def propose(self, requests) -> list[Draft]:
        """requests: items with request_id, token_ids (whole context), k and params."""
        start = time.perf_counter()
        calls = [DraftCall(self._state(r.request_id, r.token_ids), r.k, r.params) for r in requests]
        drafts = self.backend.propose(calls)
        self.last_draft_ms = (time.perf_counter() - start) * 1e3
        return drafts

    def release(self, request_ids) -> None:
        for request_id in request_ids:
            self.store.release(request_id)

    def __len__(self) -> int:
        return len(self.store)

    def _state(self, request_id: str, token_ids: list[int]):
        known = self.store.length(request_id)
        if known is None or known > len(token_ids):  # unknown, or its context was replaced
            return self.store.update(request_id, list(token_ids), len(token_ids), full_context=True)
        return self.store.update(request_id, token_ids[known:], len(token_ids), full_context=False)
