"""smartspec.v1.Proposer: one bidi stream per verifier connection; each request is answered in turn.

The servicer keeps per-request state (with the length check) and hands a
step's items to a backend: n-gram lookup or a draft model. Request ids belong to
their stream: two verifiers may use the same id, and when a stream ends (the
verifier went, or dropped the stream after a failure and will resend full
contexts on a new one) everything it held is released.
"""

from __future__ import annotations

import itertools
import logging
import time

import grpc

from controller.policy import MAX_K
from drafting.state import DraftCall, LengthMismatch, StateStore, UnknownRequest
from protocol.proposer import draft_to_pb, params_from_pb
from protocol.v1 import proposer_pb2 as pb
from protocol.v1 import proposer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class InvalidPropose(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")


class ProposerServicer(pb_grpc.ProposerServicer):
    def __init__(self, backend, max_k: int = MAX_K, max_requests: int = 4096, idle_s: float | None = None):
        self.backend = backend
        self.max_k = max_k
        self.store = StateStore(backend.new_state, max_requests, on_evict=backend.release, idle_s=idle_s)
        self.num_items = 0  # items answered
        self.num_resyncs = 0  # items that arrived with their full context
        self.streams: set[int] = set()
        self._stream_ids = itertools.count()
        self.on_exchange = None  # called with each exchange's seconds (the metrics' histogram)

    async def Propose(self, request_iterator, context: grpc.aio.ServicerContext):
        stream = next(self._stream_ids)
        self.streams.add(stream)
        try:
            async for request in request_iterator:
                try:
                    yield self.handle(request, stream)
                except InvalidPropose as exc:
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        finally:
            self.streams.discard(stream)
            released = self.store.release_owner(stream)
            if released:
                log.info("a verifier stream ended: released its %d draft states", released)

    def handle(self, request: pb.ProposeRequest, stream: int) -> pb.ProposeResponse:
        start = time.perf_counter()
        self.validate(request)
        for request_id in request.released_request_ids:
            self.store.release((stream, request_id))
        response = pb.ProposeResponse(step_id=request.step_id)
        calls, call_results = [], []
        for item in request.items:
            result = response.results.add(request_id=item.request_id)
            state = self._update(stream, item, result)
            if state is not None and item.k > 0:
                calls.append(DraftCall(state, item.k, params_from_pb(item.sampling)))
                call_results.append(result)
        for result, draft in zip(call_results, self.backend.propose(calls)):
            draft_to_pb(draft, result)
        elapsed = time.perf_counter() - start
        response.draft_ms = elapsed * 1e3
        if self.on_exchange is not None:
            self.on_exchange(elapsed)
        return response

    def validate(self, request: pb.ProposeRequest) -> None:
        if not request.items and not request.released_request_ids:
            raise InvalidPropose("items", "empty batch: no items and no released ids")
        seen = set()
        vocab = self.backend.vocab_size or 1 << 31  # None: any id (n-gram lookup)
        for i, item in enumerate(request.items):
            if not item.request_id:
                raise InvalidPropose(f"items[{i}].request_id", "must not be empty")
            if item.request_id in seen:
                raise InvalidPropose(f"items[{i}].request_id", f"{item.request_id!r} appears twice")
            seen.add(item.request_id)
            if not 0 <= item.k <= self.max_k:
                raise InvalidPropose(f"items[{i}].k", f"must be in [0, {self.max_k}], got {item.k}")
            if any(not 0 <= t < vocab for t in item.new_token_ids):
                raise InvalidPropose(f"items[{i}].new_token_ids", f"token ids must be in [0, {vocab})")
            if item.total_length < len(item.new_token_ids):
                raise InvalidPropose(
                    f"items[{i}].total_length",
                    f"{item.total_length} is less than the {len(item.new_token_ids)} new tokens",
                )
            s = item.sampling
            if not s.temperature >= 0 or (s.HasField("top_p") and not 0 < s.top_p <= 1) or s.top_k < 0:
                raise InvalidPropose(f"items[{i}].sampling", "temperature >= 0, top_p in (0, 1], top_k >= 0")

    def _update(self, stream: int, item: pb.ProposeItem, result: pb.ProposeResult):
        """Applies the item to its state; sets the result's status. None when it must resync."""
        self.num_items += 1
        self.num_resyncs += item.full_context
        key, tokens = (stream, item.request_id), list(item.new_token_ids)
        try:
            state = self.store.update(key, tokens, item.total_length, item.full_context)
        except UnknownRequest:
            result.status = pb.PROPOSE_STATUS_UNKNOWN_REQUEST
            return None
        except LengthMismatch as exc:
            result.status = pb.PROPOSE_STATUS_LENGTH_MISMATCH
            result.known_length = exc.known
            return None
        result.status = pb.PROPOSE_STATUS_OK
        result.known_length = len(state)
        return state
