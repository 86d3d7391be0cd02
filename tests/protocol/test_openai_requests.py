"""OpenAI request bodies -> GenerateRequests: shapes, types, defaults and the parameter named."""

from __future__ import annotations

import json

import pytest

from protocol.generation import InvalidRequest, Limits, validate
from protocol.openai_requests import COMPLETION_DEFAULT_MAX_TOKENS, NotFound, param, parse
from protocol.v1 import generation_pb2 as pb

LIMITS = Limits(vocab_size=100, max_model_len=64, max_spec_k=8)


def body(**fields) -> bytes:
    return json.dumps({"model": "m", **fields}).encode()


def refused(raw: bytes, chat: bool = False) -> str:
    with pytest.raises(InvalidRequest) as info:
        parsed = parse(raw, chat, "m")
        validate(parsed.grpc, lambda text, chat: [1, 2, 3], LIMITS)
    return info.value.field


def test_completion_defaults_follow_openai():
    parsed = parse(body(prompt="hi"), False, "m")
    req = parsed.grpc
    assert req.prompt_text == "hi" and req.max_new_tokens == COMPLETION_DEFAULT_MAX_TOKENS
    assert req.sampling.temperature == 1.0 and not req.sampling.HasField("top_p") and not req.HasField("logprobs")
    assert req.speculation.mode == pb.SPECULATION_MODE_AUTO
    assert not parsed.stream and not parsed.logprobs and parsed.max_tokens_param == "max_tokens"


def test_prompt_forms():
    assert parse(body(prompt=["one"]), False, "m").grpc.prompt_text == "one"
    assert list(parse(body(prompt=[5, 6]), False, "m").grpc.prompt_token_ids.ids) == [5, 6]
    assert list(parse(body(prompt=[[5, 6]]), False, "m").grpc.prompt_token_ids.ids) == [5, 6]
    for bad in (None, 3, [], [True], [-1], ["a", "b"], {"text": "a"}):
        assert refused(body(prompt=bad)) == "prompt"


def test_chat_fields():
    parsed = parse(
        body(
            messages=[{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "text", "text": "a"}]}],
            max_completion_tokens=7, logprobs=True, top_logprobs=3, seed=9, stop="x",
            stream=True, stream_options={"include_usage": True}, speculation={"mode": "fixed", "k": 2},
        ),
        True, "m",
    )  # fmt: skip
    assert parsed.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]
    req = parsed.grpc
    assert req.max_new_tokens == 7 and parsed.max_tokens_param == "max_completion_tokens" and parsed.max_tokens_set
    assert req.logprobs == 3 and parsed.logprobs and req.sampling.seed == 9 and list(req.stop) == ["x"]
    assert parsed.stream and parsed.include_usage
    assert (req.speculation.mode, req.speculation.k) == (pb.SPECULATION_MODE_FIXED, 2)
    assert not parse(body(messages=[{"role": "user", "content": "a"}]), True, "m").max_tokens_set


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "a"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "a"}], "logprobs": 3}, "logprobs"),  # chat: a boolean
        ({"messages": [{"role": "user", "content": "a"}], "prompt": "a"}, "prompt"),  # not a chat field
    ],
)
def test_chat_refusals_name_the_field(fields, named):
    with pytest.raises(InvalidRequest) as info:
        parse(body(**fields), True, "m")
    assert info.value.field == named


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"temperature": True}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**64}, "seed"),
        ({"max_tokens": 2**40}, "max_tokens"),
        ({"stop": [1]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
        ({"stream": True, "stream_options": {"whatever": 1}}, "stream_options"),
        ({"speculation": "fixed"}, "speculation"),
        ({"speculation": {"mode": "fixed", "k": "3"}}, "speculation.k"),
        ({"n": 3}, "n"),
        ({"best_of": 2}, "best_of"),
        ({"echo": True}, "echo"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
        ({"frequency_penalty": {}}, "frequency_penalty"),
    ],
)
def test_completion_refusals_name_the_field(fields, named):
    assert refused(body(prompt="a", **fields)) == named


def test_neutral_values_of_unsupported_fields_are_accepted():
    fields = dict(frequency_penalty=0, presence_penalty=0.0, best_of=1, echo=False, logit_bias={}, user="u", n=1)
    assert parse(body(prompt="a", **fields), False, "m").grpc.prompt_text == "a"


def test_validation_errors_map_to_openai_parameters():
    parsed = parse(body(messages=[{"role": "user", "content": "a"}], max_completion_tokens=0), True, "m")
    parsed.grpc.prompt_token_ids.ids.extend([1, 2])
    with pytest.raises(InvalidRequest) as info:
        validate(parsed.grpc, None, LIMITS)
    assert param(info.value, parsed) == "max_completion_tokens"
    assert param(InvalidRequest("prompt_token_ids", "x"), parsed) == "messages"
    assert param(InvalidRequest("sampling.top_p", "x"), parsed) == "top_p"
    assert param(InvalidRequest("logprobs", "x"), parsed) == "top_logprobs"


def test_body_and_model_problems():
    for raw in (b"{", b"[1]", b"\xff"):
        assert refused(raw) == "body"
    assert refused(json.dumps({"prompt": "a"}).encode()) == "model"
    with pytest.raises(NotFound):
        parse(json.dumps({"model": "other", "prompt": "a"}).encode(), False, "m")
