"""smartspec.v1.Generation: converts messages and hands off to the async engine."""

from __future__ import annotations

import logging
import time

import grpc

from smartspec.v1 import generation_pb2 as pb
from smartspec.v1 import generation_pb2_grpc as pb_grpc
from verifier_svc.async_engine import AsyncEngine, EngineError
from verifier_svc.engine import FinishReason, RequestOutput
from verifier_svc.planner import SpecMode
from verifier_svc.scheduler import QueueFull
from verifier_svc.validation import InvalidRequest, Limits, validate

log = logging.getLogger(__name__)

_SPEC_MODE = {
    pb.SPECULATION_MODE_AUTO: SpecMode.AUTO,
    pb.SPECULATION_MODE_OFF: SpecMode.OFF,
    pb.SPECULATION_MODE_FIXED: SpecMode.FIXED,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: AsyncEngine, tokenizer, limits: Limits):
        self.engine = engine
        self.tokenizer = tokenizer
        self.limits = limits
        self.draining = False

    def tokenize(self, text: str, chat: bool) -> list[int]:
        if chat:
            return list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                return_dict=False))
        return self.tokenizer(text).input_ids

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        metrics = self.engine.metrics
        if self.draining:
            metrics.rejected.labels("UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        try:
            valid = validate(request, self.tokenize, self.limits)
            queue = self.engine.submit(valid.request_id, valid.prompt_ids, valid.params,
                                       _SPEC_MODE[valid.speculation_mode], valid.speculation_k)
        except InvalidRequest as exc:
            metrics.rejected.labels("INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except QueueFull as exc:
            metrics.rejected.labels("RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        except ValueError as exc:  # duplicate request id
            metrics.rejected.labels("ALREADY_EXISTS").inc()
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        finished = False
        try:
            while True:
                out = await queue.get()
                if isinstance(out, EngineError):
                    await context.abort(grpc.StatusCode.INTERNAL, str(out))
                finished = out.finish_reason is not None
                yield _response(out, len(valid.prompt_ids))
                if finished:
                    return
        finally:
            if not finished:  # client cancelled, deadline passed or the server is stopping
                self.engine.abort(valid.request_id)
                if context.cancelled():
                    metrics.cancelled.inc()


def _response(out: RequestOutput, prompt_tokens: int) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text)
    if out.finish_reason is None:
        return msg
    seq = out.seq
    now = time.monotonic()
    msg.finish_reason = _FINISH[out.finish_reason]
    msg.matched_stop = out.matched_stop
    msg.usage.prompt_tokens = prompt_tokens
    msg.usage.completion_tokens = len(seq.output_ids)
    msg.speculation.proposed_tokens = seq.num_proposed
    msg.speculation.accepted_tokens = seq.num_accepted
    msg.speculation.speculative_steps = seq.num_spec_steps
    if seq.num_spec_steps:
        msg.speculation.mean_accepted_length = (seq.num_accepted + seq.num_spec_steps) / seq.num_spec_steps
    started = seq.first_scheduled_time or now
    msg.timings.queue_ms = (started - seq.arrival_time) * 1e3
    msg.timings.time_to_first_token_ms = ((seq.first_token_time or now) - seq.arrival_time) * 1e3
    msg.timings.e2e_ms = (now - seq.arrival_time) * 1e3
    return msg
