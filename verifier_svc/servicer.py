"""smartspec.v1.Generation: converts messages and hands off to the serving loop."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from engine.output import FinishReason
from engine.scheduler import QueueFull
from protocol.generation import InvalidRequest, Limits, needs_tokenizer, response_to_pb, validate
from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from verifier_svc.loop import ServingLoop

log = logging.getLogger(__name__)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, loop: ServingLoop, tokenizer, limits: Limits):
        self.loop = loop
        self.tokenizer = tokenizer
        self.limits = limits
        # Tokenizing a long prompt takes milliseconds to tens of them: on the event loop it would
        # stall every stream. One thread, because a tokenizer is not safe to share between threads.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")

    def tokenize(self, text: str, chat: bool) -> list[int]:
        if chat:
            return list(
                self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
                )
            )
        return self.tokenizer(text).input_ids

    def close(self) -> None:
        self._tokenizer_thread.shutdown(wait=False, cancel_futures=True)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        metrics = self.loop.metrics
        # No refusal while the server drains: GOAWAY has told clients to go elsewhere, and a
        # call that arrived before it is in flight like any other (the grace period bounds it).
        try:
            if needs_tokenizer(request):
                valid = await asyncio.get_running_loop().run_in_executor(
                    self._tokenizer_thread, validate, request, self.tokenize, self.limits
                )
            else:
                valid = validate(request, self.tokenize, self.limits)
            queue = self.loop.submit(valid.request_id, valid.prompt_ids, valid.params, valid.policy, valid.trace)
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
                if out.finish_reason == FinishReason.ERROR:
                    finished = True  # the engine dropped it already
                    await context.abort(grpc.StatusCode.INTERNAL, out.error)
                finished = out.finish_reason is not None
                yield response_to_pb(out, len(valid.prompt_ids))
                if finished:
                    return
        finally:
            if not finished:  # client cancelled, deadline passed or the server is stopping
                self.loop.abort(valid.request_id)
                if context.cancelled():
                    metrics.cancelled.inc()
