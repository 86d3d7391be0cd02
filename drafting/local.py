"""A proposer backend inside the verifier's process: n-gram lookup, or a draft model on one node.

Lookup costs microseconds, less than any network hop; a small draft model next
to the target saves the hop and, on shared CPU cores, the contention of a
second process (BENCHMARKS.md, "Speculation at batch 1 (built-in draft pair)").
The per-request state follows the verifier's committed context (it only grows,
so the new tokens are its tail).
"""

from __future__ import annotations

import time

from drafting.state import DraftCall, StateStore
from runtime import model_thread
from runtime.draft import Draft, DraftRequest, Proposal


class LocalProposer:
    def __init__(self, backend, max_requests: int = 4096):
        """`backend`: an NgramBackend or a DraftModelBackend."""
        self.backend = backend
        self.store = StateStore(backend.new_state, max_requests, on_evict=backend.release)

    async def propose(self, requests: list[DraftRequest]) -> Proposal:
        # On the model thread: a draft model's forwards must not stall the event loop, and
        # they share the process's one OpenMP team with the target's (runtime.model_thread).
        return await model_thread.run(self._draft, requests)

    def _draft(self, requests: list[DraftRequest]) -> Proposal:
        start = time.perf_counter()
        drafts: list[Draft | None] = list(
            self.backend.propose([DraftCall(self._state(r.request_id, r.token_ids), r.k, r.params) for r in requests])
        )
        return Proposal(drafts, draft_ms=(time.perf_counter() - start) * 1e3)

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.store.release(request_id)

    async def flush(self) -> None:
        pass  # releases here are immediate

    def __len__(self) -> int:
        return len(self.store)

    def _state(self, request_id: str, token_ids: list[int]):
        known = self.store.length(request_id)
        if known is None or known > len(token_ids):  # unknown, or its context was replaced
            return self.store.update(request_id, list(token_ids), len(token_ids), full_context=True)
        return self.store.update(request_id, token_ids[known:], len(token_ids), full_context=False)
