"""smartspec.v1.Proposer: one bidi stream per verifier connection; each request is answered in turn."""

from __future__ import annotations

import logging
import time

import grpc

from proposer_svc.ngram import NgramIndex
from proposer_svc.state import LengthMismatch, StateStore, UnknownRequest
from smartspec.v1 import proposer_pb2 as pb
from smartspec.v1 import proposer_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class InvalidPropose(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")


class NgramProposerServicer(pb_grpc.ProposerServicer):
    def __init__(self, n_min: int = 1, n_max: int = 4, max_k: int = 8, max_requests: int = 4096):
        self.max_k = max_k
        self.store = StateStore(lambda: NgramIndex(n_min, n_max), max_requests)
        self.num_items = 0  # items answered
        self.num_resyncs = 0  # items that arrived with their full context

    async def Propose(self, request_iterator, context: grpc.aio.ServicerContext):
        async for request in request_iterator:
            try:
                yield self.handle(request)
            except InvalidPropose as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def handle(self, request: pb.ProposeRequest) -> pb.ProposeResponse:
        start = time.perf_counter()
        self.validate(request)
        for request_id in request.released_request_ids:
            self.store.release(request_id)
        response = pb.ProposeResponse(step_id=request.step_id)
        for item in request.items:
            response.results.append(self.propose(item))
        response.draft_ms = (time.perf_counter() - start) * 1e3
        return response

    def validate(self, request: pb.ProposeRequest) -> None:
        if not request.items and not request.released_request_ids:
            raise InvalidPropose("items", "empty batch: no items and no released ids")
        for i, item in enumerate(request.items):
            if not item.request_id:
                raise InvalidPropose(f"items[{i}].request_id", "must not be empty")
            if not 0 <= item.k <= self.max_k:
                raise InvalidPropose(f"items[{i}].k", f"must be in [0, {self.max_k}], got {item.k}")
            if item.total_length < len(item.new_token_ids):
                raise InvalidPropose(f"items[{i}].total_length",
                                     f"{item.total_length} is less than the {len(item.new_token_ids)} new tokens")

    def propose(self, item: pb.ProposeItem) -> pb.ProposeResult:
        self.num_items += 1
        self.num_resyncs += item.full_context
        result = pb.ProposeResult(request_id=item.request_id)
        try:
            index = self.store.update(item.request_id, list(item.new_token_ids), item.total_length,
                                      item.full_context)
        except UnknownRequest:
            result.status = pb.PROPOSE_STATUS_UNKNOWN_REQUEST
            return result
        except LengthMismatch as exc:
            result.status = pb.PROPOSE_STATUS_LENGTH_MISMATCH
            result.known_length = exc.known
            return result
        result.status = pb.PROPOSE_STATUS_OK
        result.known_length = len(index)
        result.draft_token_ids.extend(index.propose(item.k))
        return result
