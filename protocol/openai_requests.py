"""OpenAI-compatible request bodies -> smartspec.v1 GenerateRequests.

`/v1/completions` and `/v1/chat/completions` bodies are checked for shape and type here;
everything else is checked by `protocol.generation.validate`, the gRPC front door's own
checks, so both doors refuse the same requests. Its errors name gRPC fields: `param()`
gives the OpenAI parameter they came from.

Defaults follow OpenAI's: temperature 1 (0 is greedy), top_p 1, 16 tokens for a completion,
the rest of the context for a chat completion. SmartSpec's extensions: `speculation`
({"mode": "auto" | "off" | "fixed", "k": K}), `top_k` and `ignore_eos`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from protocol.generation import InvalidRequest
from protocol.v1 import generation_pb2 as pb

COMPLETION_DEFAULT_MAX_TOKENS = 16
MAX_TOP_LOGPROBS = 5
ROLES = ("system", "developer", "user", "assistant", "tool")
_INT32 = 2**31 - 1
_SPECULATION = {"auto": pb.SPECULATION_MODE_AUTO, "off": pb.SPECULATION_MODE_OFF, "fixed": pb.SPECULATION_MODE_FIXED}
# Accepted only at the value that changes nothing: clients and harnesses send them by default.
_NEUTRAL = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "best_of": (1, None),
    "echo": (False, None),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "user": None,  # any value: an end-user id for abuse tracking, which this server does not do
    "parallel_tool_calls": None,
}
_COMMON = {"model", "stream", "stream_options", "n", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos"}
_COMMON |= {"speculation", "logprobs", "max_tokens"}
_COMPLETION_FIELDS = _COMMON | {"prompt"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs"}


class NotFound(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class OpenAIRequest:
    chat: bool
    grpc: pb.GenerateRequest  # everything but a chat's prompt, which needs the chat template
    messages: list[dict] | None  # a chat's, to template and tokenize
    stream: bool
    include_usage: bool
    logprobs: bool
    max_tokens_param: str  # the parameter that set max_new_tokens, for errors
    max_tokens_set: bool  # False: a chat completion takes the rest of the context
    continuous_usage: bool = False  # usage so far in every streamed chunk (as vLLM's option)


def parse(raw: bytes, chat: bool, served_model: str) -> OpenAIRequest:
    """The body of a completion (`chat` False) or a chat completion request; raises
    InvalidRequest (its `field` is the OpenAI parameter) or NotFound (an unknown model)."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest("body", f"not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidRequest("body", "must be a JSON object")
    allowed = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name, value in body.items():
        if name in _NEUTRAL:
            if _NEUTRAL[name] is not None and value not in _NEUTRAL[name]:
                raise InvalidRequest(name, "not supported by this server (only its neutral value)")
        elif name not in allowed:
            raise InvalidRequest(name, "unrecognized request argument")
    model = body.get("model")
    if not isinstance(model, str):
        raise InvalidRequest("model", "required, a string")
    if model != served_model:
        raise NotFound("model", f"the model {model!r} does not exist; this server serves {served_model!r}")
    if _opt(body, "n", int, 1) != 1:
        raise InvalidRequest("n", "only n = 1 is supported")
    req = pb.GenerateRequest()
    max_param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _opt(body, max_param, int, None)
    req.max_new_tokens = max_tokens if max_tokens is not None else (0 if chat else COMPLETION_DEFAULT_MAX_TOKENS)
    _sampling(body, req.sampling)
    req.stop.extend(_stop(body))
    req.ignore_eos = _opt(body, "ignore_eos", bool, False)
    _speculation(body.get("speculation"), req.speculation)
    logprobs = _logprobs(body, chat, req)
    messages = _messages(body) if chat else None
    if not chat:
        _prompt(body.get("prompt"), req)
    stream = _opt(body, "stream", bool, False)
    options = _opt(body, "stream_options", dict, None) or {}
    if options and not stream:
        raise InvalidRequest("stream_options", "only with stream: true")
    unknown = set(options) - {"include_usage", "continuous_usage_stats"}
    if unknown:
        raise InvalidRequest("stream_options", f"unknown option {sorted(unknown)[0]!r}")
    include_usage = _opt(options, "include_usage", bool, False, "stream_options.include_usage")
    continuous = _opt(options, "continuous_usage_stats", bool, False, "stream_options.continuous_usage_stats")
    return OpenAIRequest(
        chat, req, messages, stream, include_usage, logprobs, max_param, max_tokens is not None, continuous
    )


def param(exc: InvalidRequest, request: OpenAIRequest | None) -> str:
    """The OpenAI parameter a validation error is about."""
    prompt = "messages" if request is not None and request.chat else "prompt"
    names = {
        "max_new_tokens": request.max_tokens_param if request is not None else "max_tokens",
        "prompt_text": prompt,
        "prompt_token_ids": prompt,
        "prompt": prompt,
        "logprobs": "top_logprobs" if request is not None and request.chat else "logprobs",
    }
    return names.get(exc.field, exc.field.removeprefix("sampling."))


def _opt(body: dict, name: str, kind: type, default, label: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise InvalidRequest(label or name, f"must be {_KIND[kind]}, got {json.dumps(value)[:40]}")
    if kind is int and abs(value) > _INT32 and name != "seed":
        raise InvalidRequest(label or name, f"out of range: {value}")
    return value


_KIND = {int: "an integer", float: "a number", bool: "a boolean", str: "a string", dict: "an object", list: "a list"}


def _sampling(body: dict, s: pb.SamplingParams) -> None:
    temperature = _opt(body, "temperature", float, 1.0)
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("temperature", f"must be finite and >= 0, got {temperature}")
    s.temperature = temperature
    top_p = _opt(body, "top_p", float, None)
    if top_p is not None:
        s.top_p = top_p
    s.top_k = _opt(body, "top_k", int, 0)
    seed = _opt(body, "seed", int, None)
    if seed is not None:
        if not 0 <= seed < 2**64:
            raise InvalidRequest("seed", f"must be in [0, 2^64), got {seed}")
        s.seed = seed


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise InvalidRequest("stop", "must be a string or a list of strings")
    return stops


def _speculation(spec, out: pb.Speculation) -> None:
    if spec is None:
        return
    if not isinstance(spec, dict) or set(spec) - {"mode", "k"}:
        raise InvalidRequest("speculation", 'must be an object {"mode": "auto" | "off" | "fixed", "k": K}')
    mode = spec.get("mode", "auto")
    if mode not in _SPECULATION:
        raise InvalidRequest("speculation.mode", f"one of {', '.join(_SPECULATION)}, got {json.dumps(mode)[:40]}")
    out.mode = _SPECULATION[mode]
    k = _opt(spec, "k", int, None, "speculation.k")
    if k is not None:
        out.k = k


def _logprobs(body: dict, chat: bool, req: pb.GenerateRequest) -> bool:
    if chat:
        wanted = _opt(body, "logprobs", bool, False)
        top = _opt(body, "top_logprobs", int, None)
        if top is not None and not wanted:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        if wanted:
            req.logprobs = top or 0
        return wanted
    top = _opt(body, "logprobs", int, None)
    if top is not None:
        req.logprobs = top
    return top is not None


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages", "required, a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise InvalidRequest(where, "must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role", f"one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}")
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    return out


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InvalidRequest(where, "only text content parts ({'type': 'text', 'text': ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise InvalidRequest(where, "must be a string or a list of text parts")


def _prompt(prompt, req: pb.GenerateRequest) -> None:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        req.prompt_text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t <= _INT32 for t in prompt):
            raise InvalidRequest("prompt", "token ids must be >= 0")
        req.prompt_token_ids.ids.extend(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise InvalidRequest("prompt", "one prompt per request (send several requests)")
    else:
        raise InvalidRequest("prompt", "required: a string, or a list of token ids")


def chat_prompt_bytes(messages: list[dict]) -> int:
    return sum(len(m["content"].encode()) for m in messages)
