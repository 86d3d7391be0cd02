"""smartspec.v1.Generation messages <-> the engine's requests and outputs.

A GenerateRequest becomes a `ValidRequest` or an InvalidRequest naming the
offending field; a `RequestOutput` becomes a GenerateResponse.
"""

from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from controller.policy import MAX_K, Mode, Policy
from engine.output import FinishReason, RequestOutput
from protocol.v1 import generation_pb2 as pb
from runtime.sampler import SamplingParams

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 64
MAX_STOP_TOKEN_IDS = 32
MAX_LOGPROBS = 5


class InvalidRequest(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field, self.problem = field, problem


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_spec_k: int = MAX_K
    max_prompt_bytes: int = 1 << 20  # checked before tokenizing: the tokenizer's work grows with it
    max_new_tokens: int | None = None  # the server's cap (None: the context bounds it)


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    policy: Policy | None  # the request's own speculation; None follows the server's
    trace: bool = False  # return its speculative rounds with the last chunk


def validate(req: pb.GenerateRequest, tokenize, limits: Limits) -> ValidRequest:
    """`tokenize(text, chat) -> ids` is only called for text prompts, after every check that
    does not need the tokens."""
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    if req.max_new_tokens <= 0:
        raise InvalidRequest("max_new_tokens", f"must be > 0, got {req.max_new_tokens}")
    if limits.max_new_tokens is not None and req.max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(
            "max_new_tokens", f"this server generates at most {limits.max_new_tokens}, got {req.max_new_tokens}"
        )
    stop, stop_token_ids = _stop_strings(req), _stop_token_ids(req, limits)
    sampling, policy = _sampling(req.sampling), _speculation(req.speculation, limits)
    logprobs = req.logprobs if req.HasField("logprobs") else None
    if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
        raise InvalidRequest("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {logprobs}")
    prompt_ids = _prompt(req, tokenize, limits)
    if len(prompt_ids) + req.max_new_tokens > limits.max_model_len:
        raise InvalidRequest(
            "max_new_tokens",
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds "
            f"the model's context of {limits.max_model_len} tokens",
        )
    params = SamplingParams(
        max_new_tokens=req.max_new_tokens,
        stop=stop,
        stop_token_ids=stop_token_ids,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        **sampling,
    )
    return ValidRequest(request_id, prompt_ids, params, policy, req.trace_speculation)


def needs_tokenizer(req: pb.GenerateRequest) -> bool:
    return req.WhichOneof("prompt") == "prompt_text" and bool(req.prompt_text)


def _prompt(req: pb.GenerateRequest, tokenize, limits: Limits) -> list[int]:
    which = req.WhichOneof("prompt")
    if which == "prompt_token_ids":
        if req.chat:
            raise InvalidRequest("chat", "applies to prompt_text only")
        if len(req.prompt_token_ids.ids) >= limits.max_model_len:
            raise InvalidRequest(
                "prompt_token_ids",
                f"{len(req.prompt_token_ids.ids)} tokens; the model's context is {limits.max_model_len}",
            )
        ids = list(req.prompt_token_ids.ids)
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequest(
                "prompt_token_ids", f"token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})"
            )
    elif which == "prompt_text":
        size = len(req.prompt_text.encode())
        if size > limits.max_prompt_bytes:
            raise InvalidRequest("prompt_text", f"{size} bytes; this server takes at most {limits.max_prompt_bytes}")
        ids = tokenize(req.prompt_text, req.chat) if req.prompt_text else []
    else:
        raise InvalidRequest("prompt", "set prompt_text or prompt_token_ids")
    if not ids:
        raise InvalidRequest(which, "the prompt is empty")
    return ids


def _sampling(s: pb.SamplingParams) -> dict:
    if not math.isfinite(s.temperature) or s.temperature < 0:
        raise InvalidRequest("sampling.temperature", f"must be finite and >= 0, got {s.temperature}")
    top_p = s.top_p if s.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):  # also rejects NaN
        raise InvalidRequest("sampling.top_p", f"must be in (0, 1], got {top_p}")
    if s.top_k < 0:
        raise InvalidRequest("sampling.top_k", f"must be >= 0, got {s.top_k}")
    return {
        "temperature": float(s.temperature),
        "top_p": float(top_p),
        "top_k": int(s.top_k),
        "seed": int(s.seed) if s.HasField("seed") else None,
    }


def _stop_strings(req: pb.GenerateRequest) -> tuple[str, ...]:
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(req.stop)}")
    for s in req.stop:
        if not s:
            raise InvalidRequest("stop", "stop strings must not be empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest("stop", f"each stop string has at most {MAX_STOP_STRING_CHARS} characters")
    return tuple(req.stop)


def _stop_token_ids(req: pb.GenerateRequest, limits: Limits) -> tuple[int, ...]:
    if len(req.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidRequest("stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids")
    for t in req.stop_token_ids:
        if not 0 <= t < limits.vocab_size:
            raise InvalidRequest("stop_token_ids", f"token id {t} is outside the vocabulary [0, {limits.vocab_size})")
    return tuple(req.stop_token_ids)


def _speculation(s: pb.Speculation, limits: Limits) -> Policy | None:
    if s.mode not in pb.SpeculationMode.values():
        raise InvalidRequest("speculation.mode", f"unknown speculation mode {s.mode}")
    if s.mode == pb.SPECULATION_MODE_FIXED:
        if not 1 <= s.k <= limits.max_spec_k:
            raise InvalidRequest("speculation.k", f"must be in [1, {limits.max_spec_k}] for fixed mode, got {s.k}")
        return Policy(Mode.FIXED, s.k)
    return Policy() if s.mode == pb.SPECULATION_MODE_OFF else None


_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


def response_to_pb(out: RequestOutput, prompt_tokens: int) -> pb.GenerateResponse:
    """New tokens and text; the usage, speculation and timing summary with the last one."""
    msg = pb.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text)
    for entry in out.logprobs or ():
        msg.logprobs.add(logprob=entry.logprob, top=[pb.TopLogprob(token_id=t, logprob=lp) for t, lp in entry.top])
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
    for k, proposed, accepted in seq.rounds or ():
        msg.speculation.rounds.add(k=k, proposed=proposed, accepted=accepted)
    started = seq.first_scheduled_time or now
    msg.timings.queue_ms = (started - seq.arrival_time) * 1e3
    msg.timings.time_to_first_token_ms = ((seq.first_token_time or now) - seq.arrival_time) * 1e3
    msg.timings.e2e_ms = (now - seq.arrival_time) * 1e3
    return msg
