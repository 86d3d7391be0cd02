"""n-gram prompt lookup inside the verifier process.

Lookup costs microseconds, less than any network hop, so the verifier can
draft n-grams itself; one index per request, kept in step with its context.
"""

from __future__ import annotations

from collections import OrderedDict

from proposer_svc.ngram import NgramIndex
from verifier_svc.rejection import Draft


class LocalNgramProposer:
    def __init__(self, n_min: int = 1, n_max: int = 4, max_requests: int = 4096):
        self.n_min, self.n_max = n_min, n_max
        self.max_requests = max_requests
        self._indices: OrderedDict[str, NgramIndex] = OrderedDict()

    def propose(self, requests) -> list[Draft]:
        """requests: items with request_id, token_ids (whole context) and k."""
        return [Draft(self._index(r.request_id, r.token_ids).propose(r.k)) for r in requests]

    def release(self, request_ids) -> None:
        for request_id in request_ids:
            self._indices.pop(request_id, None)

    def _index(self, request_id: str, token_ids: list[int]) -> NgramIndex:
        idx = self._indices.pop(request_id, None)
        if idx is None or len(idx) > len(token_ids):  # unknown, or its context was replaced
            idx = NgramIndex(self.n_min, self.n_max)
        idx.extend(token_ids[len(idx):])
        self._indices[request_id] = idx  # most recently used last
        while len(self._indices) > self.max_requests:
            self._indices.popitem(last=False)
        return idx
