"""`smartspec bench --endpoint openai`: the same requests, on the same schedule, through the
OpenAI-compatible HTTP door, so one sweep compares the two doors.

Each request streams (server-sent events) with `stream_options.continuous_usage_stats`,
whose running token count says how many tokens each chunk carries: time to first token
and inter-token latencies are measured as over gRPC. Acceptance traces are gRPC-only.
"""

from __future__ import annotations

import json
import ssl

import aiohttp

from protocol.v1 import generation_pb2 as pb
from smartspec.dial import Dial
from smartspec.report import RequestRecord, StreamClock

_MODES = {pb.SPECULATION_MODE_AUTO: "auto", pb.SPECULATION_MODE_OFF: "off", pb.SPECULATION_MODE_FIXED: "fixed"}


def request_body(request: pb.GenerateRequest, model: str) -> tuple[str, dict]:
    """The path and JSON body of the HTTP request equivalent to a gRPC one."""
    body = {
        "model": model,
        "max_tokens": request.max_new_tokens,
        "temperature": request.sampling.temperature,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        "speculation": {"mode": _MODES[request.speculation.mode]},
    }
    if request.sampling.HasField("seed"):
        body["seed"] = request.sampling.seed
    if request.speculation.mode == pb.SPECULATION_MODE_FIXED:
        body["speculation"]["k"] = request.speculation.k
    if request.chat:
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": request.prompt_text}]}
    return "/v1/completions", body | {"prompt": request.prompt_text}


class OpenAITarget:
    """An HTTP session to one server; `async with` finds the model it serves."""

    def __init__(self, target: str, how: Dial = Dial()):
        scheme = "https://" if how.tls.tls_ca else "http://"
        self.base = target if target.startswith(("http://", "https://")) else scheme + target
        self.headers = {"Authorization": f"Bearer {how.token}"} if how.token else {}
        self.ssl: ssl.SSLContext | bool = True
        if how.tls.tls_ca:
            self.ssl = ssl.create_default_context(cafile=how.tls.tls_ca)
            if how.tls.tls_client_cert:
                self.ssl.load_cert_chain(how.tls.tls_client_cert, how.tls.tls_client_key)
        self.model = ""

    async def __aenter__(self) -> OpenAITarget:
        connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl)
        self.session = aiohttp.ClientSession(
            connector=connector, headers=self.headers, timeout=aiohttp.ClientTimeout(total=None)
        )
        async with self.session.get(self.base + "/v1/models") as response:
            response.raise_for_status()
            self.model = (await response.json())["data"][0]["id"]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def send(self, request: pb.GenerateRequest, record: RequestRecord, start: float) -> None:
        path, body = request_body(request, self.model)
        clock = StreamClock(record, start)
        try:
            async with self.session.post(self.base + path, json=body) as response:
                if response.status != 200:
                    error = (await response.json()).get("error", {})
                    record.error = f"HTTP_{response.status}" + (f"_{error['code']}" if error.get("code") else "")
                else:
                    async for line in response.content:
                        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                            continue
                        chunk = json.loads(line[len(b"data: ") :])
                        if "error" in chunk:
                            record.error = "INTERNAL"
                            break
                        record.request_id = record.request_id or chunk["id"]
                        if chunk.get("usage"):
                            clock.tokens_arrived(chunk["usage"]["completion_tokens"] - clock.tokens)
                        choice = chunk["choices"][0] if chunk["choices"] else {}
                        if choice.get("finish_reason"):
                            _record_last_chunk(record, chunk)
        except aiohttp.ClientError as exc:
            record.error = type(exc).__name__
        clock.ended()


def _record_last_chunk(record: RequestRecord, chunk: dict) -> None:
    record.finish_reason = "FINISH_REASON_" + chunk["choices"][0]["finish_reason"].upper()
    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
    record.completion_tokens = chunk["usage"]["completion_tokens"]
    spec = chunk.get("speculation") or {}
    record.proposed_tokens = spec.get("proposed_tokens", 0)
    record.accepted_tokens = spec.get("accepted_tokens", 0)
    timings = chunk.get("timings") or {}
    if timings:
        record.server_timings = {
            "queue_ms": timings["queue_ms"],
            "ttft_ms": timings["time_to_first_token_ms"],
            "e2e_ms": timings["e2e_ms"],
        }
