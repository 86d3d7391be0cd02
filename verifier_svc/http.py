"""The OpenAI-compatible HTTP front door, in the verifier's process and on its serving loop.

Routes: POST /v1/completions, POST /v1/chat/completions (server-sent events with
`stream: true`), GET /v1/models, GET /health. Requests are checked by the gRPC door's own
validation (`protocol.openai_requests`), so both refuse the same inputs; errors are
OpenAI-style JSON: 400 naming the parameter, 401 without a known API key (when the
verifier has `--api-keys-file`), 404 for another model, 413 past `--max-message-bytes`,
429 on a full queue, 503 while draining. A client that disconnects aborts its request:
its KV is freed at the end of the running step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
import weakref
from contextlib import aclosing

from aiohttp import web

from engine.output import FinishReason
from engine.scheduler import QueueFull
from protocol.auth import TokenFile
from protocol.generation import InvalidRequest, Limits, ValidRequest, needs_tokenizer, validate
from protocol.openai_requests import NotFound, OpenAIRequest, chat_prompt_bytes, param, parse
from protocol.openai_responses import Choice, error_body, sse
from verifier_svc.loop import ServingLoop
from verifier_svc.prompts import PromptTokenizer

log = logging.getLogger(__name__)
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def model_name(model: str) -> str:
    """What the API calls a --model value by default: its file or directory name."""
    return os.path.basename(os.path.normpath(model)).removesuffix(".gguf")


def _error(status: int, message: str, kind: str, param_: str | None = None, code: str | None = None, **headers):
    return web.json_response(error_body(message, kind, param_, code), status=status, headers=headers or None)


class OpenAIFront:
    def __init__(
        self,
        loop: ServingLoop,
        prompts: PromptTokenizer,
        limits: Limits,
        model: str,
        api_keys: TokenFile | None = None,
        draining=lambda: False,
        max_connection_age_s: float = 0.0,
    ):
        self.loop, self.prompts, self.limits, self.model = loop, prompts, limits, model
        self.api_keys = api_keys
        self.draining = draining
        self.created = int(time.time())
        # Like gRPC's GOAWAY at --max-connection-age-s: a keep-alive connection older than this is
        # closed after its current response, so clients reconnect and spread over new replicas.
        self.max_connection_age_s = max_connection_age_s
        self._opened: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(client_max_size=max_body_bytes, middlewares=[self._age, self._errors, self._auth])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException as exc:  # routing (404, 405) and a body past the limit (413)
            kind = "invalid_request_error" if exc.status < 500 else "server_error"
            return _error(exc.status, exc.reason, kind, code=str(exc.status))

    @web.middleware
    async def _age(self, request: web.Request, handler):
        transport = request.transport  # the connection's; None once the client has gone
        opened = self._opened.setdefault(transport, time.monotonic()) if transport is not None else None
        response = await handler(request)
        if self.max_connection_age_s and opened is not None and time.monotonic() - opened > self.max_connection_age_s:
            response.force_close()
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if self.api_keys is None or not request.path.startswith("/v1/"):
            return await handler(request)
        header = request.headers.get("Authorization", "")
        token = header[len("Bearer ") :].strip() if header.startswith("Bearer ") else ""
        if not token or not self.api_keys.accepts(token):
            self.loop.metrics.rejected.labels("UNAUTHENTICATED").inc()
            return _error(401, "missing or unknown API key", "invalid_request_error", code="invalid_api_key")
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        if self.loop.failed.is_set() or self.draining():
            return web.Response(status=503, text="not serving")
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        entry = {"id": self.model, "object": "model", "created": self.created, "owned_by": "smartspec"}
        entry["max_model_len"] = self.limits.max_model_len
        return web.json_response({"object": "list", "data": [entry]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        metrics = self.loop.metrics
        if self.draining():
            return _error(503, "the server is draining; retry on another replica", "server_error", code="draining",
                          Connection="close")  # fmt: skip
        parsed = None
        try:
            parsed = parse(await request.read(), chat, self.model)
            valid = await self._validate(parsed)
            queue = self.loop.submit(valid.request_id, valid.prompt_ids, valid.params, valid.policy)
        except InvalidRequest as exc:
            metrics.rejected.labels("INVALID_ARGUMENT").inc()
            name = param(exc, parsed) if parsed is not None else exc.field
            return _error(400, f"{name}: {exc.problem}", "invalid_request_error", name)
        except NotFound as exc:
            metrics.rejected.labels("NOT_FOUND").inc()
            return _error(404, str(exc), "invalid_request_error", exc.param, "model_not_found")
        except QueueFull as exc:
            metrics.rejected.labels("RESOURCE_EXHAUSTED").inc()
            return _error(429, str(exc), "rate_limit_error", code="queue_full", **{"Retry-After": "1"})
        choice = Choice(valid.request_id, chat, self.model, self.prompts.token_text, parsed.logprobs)
        prompt_tokens = len(valid.prompt_ids)
        try:
            async with aclosing(self.loop.follow(valid.request_id, queue)) as outputs:
                if parsed.stream:
                    return await self._stream(request, outputs, choice, parsed, prompt_tokens)
                async for out in outputs:
                    if out.finish_reason == FinishReason.ERROR:
                        return _error(500, out.error, "server_error", code="engine_error")
                    choice.add(out, prompt_tokens)
                return web.json_response(choice.response())
        except (ConnectionError, asyncio.CancelledError):  # the client went: its request was aborted
            metrics.cancelled.inc()
            raise

    async def _validate(self, parsed: OpenAIRequest) -> ValidRequest:
        req = parsed.grpc
        if parsed.chat:
            size = chat_prompt_bytes(parsed.messages)
            if size > self.limits.max_prompt_bytes:
                raise InvalidRequest(
                    "messages", f"{size} bytes; this server takes at most {self.limits.max_prompt_bytes}"
                )
            try:
                ids = await self.prompts.run(self.prompts.chat, parsed.messages)
            except Exception as exc:  # the model's template refuses some conversations (role order, say)
                raise InvalidRequest("messages", f"the model's chat template refused them: {exc}") from None
            req.prompt_token_ids.ids.extend(ids)
            if not parsed.max_tokens_set:  # the rest of the context, within the server's cap
                room = self.limits.max_model_len - len(ids)
                req.max_new_tokens = max(1, min(room, self.limits.max_new_tokens or room))
        if needs_tokenizer(req):
            return await self.prompts.run(validate, req, self.prompts.tokenize, self.limits)
        return validate(req, self.prompts.tokenize, self.limits)

    async def _stream(self, request, outputs, choice: Choice, parsed: OpenAIRequest, prompt_tokens: int):
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        first = True
        async for out in outputs:
            if out.finish_reason == FinishReason.ERROR:
                await response.write(sse(error_body(out.error, "server_error", code="engine_error")))
                break
            text, entries = choice.add(out, prompt_tokens)
            if text or entries or first or out.finish_reason is not None or parsed.continuous_usage:
                chunk = choice.chunk(text, entries, first=first)
                if parsed.continuous_usage:
                    chunk["usage"] = choice.usage_so_far(prompt_tokens)
                await response.write(sse(chunk))
                first = False
        if parsed.include_usage and choice.usage is not None:
            await response.write(sse(choice.usage_chunk()))
        await response.write(sse("[DONE]"))
        await response.write_eof()
        return response


class HttpServer:
    """The front door's aiohttp server on the verifier's event loop."""

    def __init__(self, front: OpenAIFront, max_body_bytes: int, grace_s: float):
        # handler_cancellation: a client that disconnects cancels its handler at once, which
        # aborts its request (otherwise only the next write would notice).
        self.runner = web.AppRunner(
            front.app(max_body_bytes), handler_cancellation=True, access_log=None, shutdown_timeout=grace_s
        )
        self.port = 0

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> int:
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self.port

    async def stop(self) -> None:
        """Stops listening at once; requests in flight get the grace period, then are cancelled."""
        await self.runner.cleanup()
