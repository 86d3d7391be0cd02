import math

import pytest

from controller.policy import Mode, Policy
from protocol.generation import (
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_STRING_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    InvalidRequest,
    Limits,
    validate,
)
from protocol.v1 import generation_pb2 as pb
from runtime.sampler import SamplingParams

LIMITS = Limits(vocab_size=100, max_model_len=64, max_spec_k=8)


class Tokenizer:
    def __init__(self):
        self.calls = []

    def __call__(self, text, chat):
        self.calls.append((text, chat))
        return [ord(c) % 100 for c in text]


def request(**kw) -> pb.GenerateRequest:
    kw.setdefault("max_new_tokens", 8)
    if "prompt_text" not in kw and "prompt_token_ids" not in kw:
        kw["prompt_token_ids"] = pb.TokenIds(ids=[1, 2, 3])
    return pb.GenerateRequest(**kw)


def invalid(req: pb.GenerateRequest, tokenize=None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        validate(req, tokenize or Tokenizer(), LIMITS)
    err = info.value
    assert err.field in str(err)  # the message names the field too
    return err


# --- prompt ----------------------------------------------------------------------


def test_empty_prompt_text():
    tok = Tokenizer()
    assert invalid(request(prompt_text=""), tok).field == "prompt_text"


def test_prompt_text_that_tokenizes_to_nothing():
    assert invalid(request(prompt_text="hi"), lambda text, chat: []).field == "prompt_text"


def test_empty_prompt_token_ids():
    assert invalid(request(prompt_token_ids=pb.TokenIds())).field == "prompt_token_ids"


def test_no_prompt():
    assert invalid(pb.GenerateRequest(max_new_tokens=8)).field == "prompt"


@pytest.mark.parametrize("bad", [-1, 100, 2**31 - 1])
def test_prompt_token_ids_outside_vocab(bad):
    err = invalid(request(prompt_token_ids=pb.TokenIds(ids=[1, bad, 2])))
    assert err.field == "prompt_token_ids"
    assert str(bad) in str(err)


def test_chat_with_token_ids():
    assert invalid(request(chat=True)).field == "chat"


# --- lengths ---------------------------------------------------------------------


@pytest.mark.parametrize("max_new_tokens", [0, -1])
def test_max_new_tokens_not_positive(max_new_tokens):
    assert invalid(request(max_new_tokens=max_new_tokens)).field == "max_new_tokens"


def test_prompt_plus_max_new_tokens_beyond_context():
    assert invalid(request(max_new_tokens=62)).field == "max_new_tokens"  # 3 + 62 > 64
    assert validate(request(max_new_tokens=61), Tokenizer(), LIMITS).params.max_new_tokens == 61


def test_long_text_prompt_beyond_context():
    assert invalid(request(prompt_text="x" * 60, max_new_tokens=5)).field == "max_new_tokens"


# --- sampling --------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [-0.1, math.nan, math.inf, -math.inf])
def test_bad_temperature(temperature):
    req = request(sampling=pb.SamplingParams(temperature=temperature))
    assert invalid(req).field == "sampling.temperature"


@pytest.mark.parametrize("top_p", [0.0, -0.5, 1.01, 2.0, math.nan, math.inf])
def test_bad_top_p(top_p):
    req = request(sampling=pb.SamplingParams(temperature=1.0, top_p=top_p))
    assert invalid(req).field == "sampling.top_p"


def test_negative_top_k():
    req = request(sampling=pb.SamplingParams(temperature=1.0, top_k=-1))
    assert invalid(req).field == "sampling.top_k"


# --- stops -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 100])
def test_stop_token_ids_outside_vocab(bad):
    assert invalid(request(stop_token_ids=[5, bad])).field == "stop_token_ids"


def test_too_many_stop_token_ids():
    req = request(stop_token_ids=list(range(MAX_STOP_TOKEN_IDS + 1)))
    assert invalid(req).field == "stop_token_ids"


def test_too_many_stop_strings():
    req = request(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    assert invalid(req).field == "stop"


def test_too_long_stop_string():
    assert invalid(request(stop=["x" * (MAX_STOP_STRING_CHARS + 1)])).field == "stop"


def test_empty_stop_string():
    assert invalid(request(stop=["ok", ""])).field == "stop"


def test_stop_limits_are_inclusive():
    req = request(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS, stop_token_ids=[99] * MAX_STOP_TOKEN_IDS)
    valid = validate(req, Tokenizer(), LIMITS)
    assert len(valid.params.stop) == MAX_STOP_STRINGS
    assert len(valid.params.stop_token_ids) == MAX_STOP_TOKEN_IDS


# --- speculation -----------------------------------------------------------------


def test_unknown_speculation_mode():
    req = request()
    req.speculation.mode = 7
    assert invalid(req).field == "speculation.mode"


@pytest.mark.parametrize("k", [0, -1, 9])
def test_fixed_mode_k_out_of_range(k):
    req = request(speculation=pb.Speculation(mode=pb.SPECULATION_MODE_FIXED, k=k))
    assert invalid(req).field == "speculation.k"


@pytest.mark.parametrize("k", [1, 8])
def test_fixed_mode_k_in_range(k):
    req = request(speculation=pb.Speculation(mode=pb.SPECULATION_MODE_FIXED, k=k))
    valid = validate(req, Tokenizer(), LIMITS)
    assert valid.policy == Policy(Mode.FIXED, k)


def test_k_is_ignored_outside_fixed_mode():
    req = request(speculation=pb.Speculation(mode=pb.SPECULATION_MODE_OFF, k=99))
    assert validate(req, Tokenizer(), LIMITS).policy == Policy()


# --- request id ------------------------------------------------------------------


def test_request_id_too_long():
    assert invalid(request(request_id="r" * (MAX_REQUEST_ID_CHARS + 1))).field == "request_id"


def test_request_id_at_the_limit_is_kept():
    rid = "r" * MAX_REQUEST_ID_CHARS
    assert validate(request(request_id=rid), Tokenizer(), LIMITS).request_id == rid


def test_empty_request_id_is_generated_and_unique():
    a = validate(request(), Tokenizer(), LIMITS).request_id
    b = validate(request(), Tokenizer(), LIMITS).request_id
    assert a and b and a != b
    assert len(a) <= MAX_REQUEST_ID_CHARS


# --- valid requests --------------------------------------------------------------


def test_valid_token_id_request_defaults():
    valid = validate(request(request_id="abc", prompt_token_ids=pb.TokenIds(ids=[0, 99, 5])), Tokenizer(), LIMITS)
    assert valid.request_id == "abc"
    assert valid.prompt_ids == [0, 99, 5]
    assert valid.params == SamplingParams(max_new_tokens=8)
    assert valid.params.greedy
    assert valid.params.top_p == 1.0 and valid.params.seed is None
    assert valid.policy is None


def test_valid_sampling_request():
    req = request(
        prompt_text="hello",
        chat=True,
        max_new_tokens=20,
        sampling=pb.SamplingParams(temperature=0.7, top_k=40, top_p=0.5, seed=12345),
        stop=["\n\n", "END"],
        stop_token_ids=[2, 3],
        ignore_eos=True,
    )
    tok = Tokenizer()
    valid = validate(req, tok, LIMITS)
    assert tok.calls == [("hello", True)]
    assert valid.prompt_ids == [ord(c) % 100 for c in "hello"]
    p = valid.params
    assert p.temperature == pytest.approx(0.7)
    assert p.top_k == 40
    assert p.top_p == 0.5  # exactly representable in float32
    assert p.seed == 12345
    assert p.max_new_tokens == 20
    assert p.stop == ("\n\n", "END")
    assert p.stop_token_ids == (2, 3)
    assert p.ignore_eos is True
    assert not p.greedy
    assert isinstance(p.temperature, float) and isinstance(p.top_p, float)


def test_unset_top_p_and_seed():
    req = request(sampling=pb.SamplingParams(temperature=1.0))
    p = validate(req, Tokenizer(), LIMITS).params
    assert p.top_p == 1.0
    assert p.seed is None


def test_seed_zero_is_a_seed():
    req = request(sampling=pb.SamplingParams(temperature=1.0, seed=0))
    assert validate(req, Tokenizer(), LIMITS).params.seed == 0


def test_top_p_one_is_valid():
    req = request(sampling=pb.SamplingParams(temperature=1.0, top_p=1.0))
    assert validate(req, Tokenizer(), LIMITS).params.top_p == 1.0


def test_token_id_prompt_does_not_tokenize():
    tok = Tokenizer()
    validate(request(), tok, LIMITS)
    assert tok.calls == []


def test_a_prompt_over_the_byte_limit_is_refused_before_tokenizing():
    tok = Tokenizer()
    limits = Limits(vocab_size=100, max_model_len=64, max_prompt_bytes=16)
    with pytest.raises(InvalidRequest) as info:
        validate(request(prompt_text="é" * 9), tok, limits)  # 9 characters, 18 bytes
    assert info.value.field == "prompt_text" and "18 bytes" in str(info.value)
    assert tok.calls == []
    assert validate(request(prompt_text="é" * 8), tok, limits).prompt_ids


def test_bad_fields_other_than_the_prompt_are_refused_before_tokenizing():
    tok = Tokenizer()
    for bad in ({"stop": [""]}, {"sampling": pb.SamplingParams(top_k=-1)}, {"max_new_tokens": 0}):
        invalid(request(prompt_text="hello", **bad), tok)
    assert tok.calls == []


def test_token_id_prompts_at_or_over_the_context_are_refused_before_reading_them():
    err = invalid(request(prompt_token_ids=pb.TokenIds(ids=[10**9] * LIMITS.max_model_len)))
    assert err.field == "prompt_token_ids" and "context" in str(err)


def test_the_servers_cap_on_max_new_tokens():
    limits = Limits(vocab_size=100, max_model_len=64, max_new_tokens=10)
    assert validate(request(max_new_tokens=10), Tokenizer(), limits).params.max_new_tokens == 10
    with pytest.raises(InvalidRequest) as info:
        validate(request(max_new_tokens=11), Tokenizer(), limits)
    assert info.value.field == "max_new_tokens" and "at most 10" in str(info.value)


def test_logprobs_from_0_to_5_reach_the_sampling_params_and_come_back_per_token():
    from engine.output import FinishReason, RequestOutput
    from engine.scheduler import Sequence
    from protocol.generation import response_to_pb
    from runtime.rejection import TokenLogprob

    assert validate(request(), Tokenizer(), LIMITS).params.logprobs is None
    assert validate(request(logprobs=0), Tokenizer(), LIMITS).params.logprobs == 0
    assert validate(request(logprobs=5), Tokenizer(), LIMITS).params.logprobs == 5
    for bad in (-1, 6):
        assert invalid(request(logprobs=bad)).field == "logprobs"
    seq = Sequence("r", [1], SamplingParams(logprobs=2), output_ids=[4, 5])
    entries = [TokenLogprob(-0.5, ((4, -0.5), (9, -1.5))), TokenLogprob(-0.25, ((5, -0.25),))]
    msg = response_to_pb(RequestOutput("r", [4, 5], "", FinishReason.LENGTH, seq=seq, logprobs=entries), 1)
    assert [e.logprob for e in msg.logprobs] == [-0.5, -0.25]
    assert [(t.token_id, t.logprob) for t in msg.logprobs[0].top] == [(4, -0.5), (9, -1.5)]
