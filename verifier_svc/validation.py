"""GenerateRequest -> engine inputs, or InvalidRequest naming the offending field."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass

from smartspec.v1 import generation_pb2 as pb
from verifier_svc.planner import MAX_K
from verifier_svc.sampler import SamplingParams

MAX_REQUEST_ID_CHARS = 128
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 64
MAX_STOP_TOKEN_IDS = 32


class InvalidRequest(ValueError):
    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    vocab_size: int
    max_model_len: int
    max_spec_k: int = MAX_K


@dataclass(frozen=True)
class ValidRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    speculation_mode: int  # a pb.SpeculationMode value
    speculation_k: int


def validate(req: pb.GenerateRequest, tokenize, limits: Limits) -> ValidRequest:
    """`tokenize(text, chat) -> ids` is only called for text prompts."""
    request_id = req.request_id or uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidRequest("request_id", f"longer than {MAX_REQUEST_ID_CHARS} characters")
    prompt_ids = _prompt(req, tokenize, limits)
    if req.max_new_tokens <= 0:
        raise InvalidRequest("max_new_tokens", f"must be > 0, got {req.max_new_tokens}")
    if len(prompt_ids) + req.max_new_tokens > limits.max_model_len:
        raise InvalidRequest(
            "max_new_tokens",
            f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds "
            f"the model's context of {limits.max_model_len} tokens")
    params = SamplingParams(
        max_new_tokens=req.max_new_tokens,
        stop=_stop_strings(req),
        stop_token_ids=_stop_token_ids(req, limits),
        ignore_eos=req.ignore_eos,
        **_sampling(req.sampling),
    )
    mode, k = _speculation(req.speculation, limits)
    return ValidRequest(request_id, prompt_ids, params, mode, k)


def _prompt(req: pb.GenerateRequest, tokenize, limits: Limits) -> list[int]:
    which = req.WhichOneof("prompt")
    if which == "prompt_token_ids":
        if req.chat:
            raise InvalidRequest("chat", "applies to prompt_text only")
        ids = list(req.prompt_token_ids.ids)
        bad = [t for t in ids if not 0 <= t < limits.vocab_size]
        if bad:
            raise InvalidRequest(
                "prompt_token_ids", f"token id {bad[0]} is outside the vocabulary [0, {limits.vocab_size})")
    elif which == "prompt_text":
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


def _speculation(s: pb.Speculation, limits: Limits) -> tuple[int, int]:
    if s.mode not in pb.SpeculationMode.values():
        raise InvalidRequest("speculation.mode", f"unknown speculation mode {s.mode}")
    if s.mode == pb.SPECULATION_MODE_FIXED and not 1 <= s.k <= limits.max_spec_k:
        raise InvalidRequest("speculation.k", f"must be in [1, {limits.max_spec_k}] for fixed mode, got {s.k}")
    return s.mode, s.k
