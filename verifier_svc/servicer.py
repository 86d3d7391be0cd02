"""smartspec.v1.Generation: converts messages and hands off to the serving loop."""

from __future__ import annotations

import logging
from contextlib import aclosing

import grpc

from engine.output import FinishReason
from engine.scheduler import QueueFull
from protocol.generation import InvalidRequest, Limits, needs_tokenizer, response_to_pb, validate
from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc
from verifier_svc.loop import ServingLoop
from verifier_svc.prompts import PromptTokenizer

log = logging.getLogger(__name__)


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, loop: ServingLoop, prompts: PromptTokenizer, limits: Limits):
        self.loop = loop
        self.prompts = prompts
        self.limits = limits

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        metrics = self.loop.metrics
        # No refusal while the server drains: GOAWAY has told clients to go elsewhere, and a
        # call that arrived before it is in flight like any other (the grace period bounds it).
        try:
            if needs_tokenizer(request):
                valid = await self.prompts.run(validate, request, self.prompts.tokenize, self.limits)
            else:
                valid = validate(request, self.prompts.tokenize, self.limits)
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
        try:
            async with aclosing(self.loop.follow(valid.request_id, queue)) as outputs:
                async for out in outputs:
                    if out.finish_reason == FinishReason.ERROR:
                        await context.abort(grpc.StatusCode.INTERNAL, out.error)
                    yield response_to_pb(out, len(valid.prompt_ids))
        finally:
            if context.cancelled():  # the client cancelled or its deadline passed
                metrics.cancelled.inc()
