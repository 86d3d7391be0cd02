"""Property-based fuzzing of the three services over real gRPC sockets.

Hypothesis builds GenerateRequests, streams of ProposeRequests and streams of
VerifierReports from strategies that mix valid, boundary and hostile values for
every field, plus raw bytes sent as the serialized message. Whatever arrives, a
call ends OK or with a status that blames the caller (INVALID_ARGUMENT,
RESOURCE_EXHAUSTED, UNAUTHENTICATED; ALREADY_EXISTS only for a request id
already in flight), never INTERNAL, UNKNOWN, a hang or a dead server; a valid
call right after each example still succeeds; and the controller only ever
pushes a policy a verifier would accept.

The servers are module-scoped so examples reuse them (the controller forgets
what it learned before each example, so that a failure can be shrunk); the
examples are derandomized so a run in CI is the run on a laptop.
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time

import grpc
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from service_threads import LoopThread, VerifierThread

from controller.policy import MAX_K, Policy
from controller.state import ControllerState
from controller_svc.server import Controller, ControllerConfig
from proposer_svc.server import ProposerConfig, ProposerServer
from protocol.controller import cost_from_pb, policy_from_pb
from protocol.security import bearer
from protocol.serving import ServerConfig, from_options
from protocol.v1 import controller_pb2 as cpb
from protocol.v1 import controller_pb2_grpc as cpb_grpc
from protocol.v1 import generation_pb2 as gpb
from protocol.v1 import proposer_pb2 as ppb
from protocol.v1 import proposer_pb2_grpc as ppb_grpc
from runtime import model_thread
from runtime.models import Placement

pytestmark = pytest.mark.slow

BLAMES_THE_CALLER = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
}
CALL_TIMEOUT_S = 30  # a call still running after this is a hang, and fails the property

GENERATE = "/smartspec.v1.Generation/Generate"
PROPOSE = "/smartspec.v1.Proposer/Propose"
CONNECT = "/smartspec.v1.Controller/Connect"

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT64_MAX = 2**64 - 1
# Past the 4 MiB a server receives by default (five bytes a token id): gRPC itself refuses it.
OVERSIZED = [2**31 - 1] * 1_000_000


def fuzz(examples: int):
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=False,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ---------------------------------------------------------------------------------------------
# Values shared by every message


# Strategies are built once each: building them costs more than drawing from them.
@functools.cache
def ints(lo: int, hi: int, special: tuple[int, ...] = ()) -> st.SearchStrategy[int]:
    """Mostly small values near zero, plus the type's bounds and each given boundary."""
    # Zero first and small values next: failures shrink toward them, not toward the bounds.
    edges = sorted({v for v in (lo, lo + 1, -1, 0, 1, hi - 1, hi, *special) if lo <= v <= hi}, key=abs)
    return st.one_of(st.integers(max(lo, -8), min(hi, 64)), st.sampled_from(edges), st.integers(lo, hi))


@functools.cache
def floats(width: int = 64) -> st.SearchStrategy[float]:
    """Every float the wire can carry, with NaN, the infinities, signed zeros, subnormals and the extremes."""
    biggest = 3.4028234663852886e38 if width == 32 else 1.7976931348623157e308
    tiniest = 1e-45 if width == 32 else 5e-324
    edges = [0.0, -0.0, 1e-5, 1e-6, 0.5, 1.0, 1.0000001, biggest, -biggest, tiniest, -tiniest]
    return st.one_of(
        st.sampled_from([*edges, math.nan, math.inf, -math.inf]),
        st.floats(0, 100, width=width),
        st.floats(width=width, allow_nan=True, allow_infinity=True),
    )


HOSTILE_STRINGS = [
    "",
    "\x00",
    "a\x00b",
    "\x00" * 64,
    " ",
    "\n\r\t",
    "é",
    "\u202e\u200b\ufeff",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 🚀",
    "<|im_start|>",
    "</s>",
    "x" * 64,
    "x" * 65,
    "x" * 128,
    "x" * 129,
    "%s%n{0}",
]


@functools.cache
def strings(max_size: int = 40) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(HOSTILE_STRINGS),
        st.text(max_size=max_size),
        st.integers(1_000, 50_000).map(lambda n: "y" * n),
    )


@functools.cache
def lists(elements: st.SearchStrategy, max_size: int = 6) -> st.SearchStrategy[list]:
    """Short lists, and now and then a long run of one value."""
    return st.one_of(
        st.lists(elements, max_size=max_size),
        st.tuples(elements, st.integers(100, 2_000)).map(lambda t: [t[0]] * t[1]),
    )


def status_of(call) -> tuple[grpc.StatusCode, list]:
    """Every message a streaming call returns, and the status it ends with."""
    replies = []
    try:
        for reply in call:
            replies.append(reply)
    except grpc.RpcError as err:
        return err.code(), replies
    return grpc.StatusCode.OK, replies


def assert_blames_the_caller(code: grpc.StatusCode, what) -> None:
    assert code in BLAMES_THE_CALLER, (code, what)


def mutations(serialized: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid messages truncated, extended or with one byte changed."""

    def mutate(args) -> bytes:
        raw, how, at, noise = args
        at = at % (len(raw) + 1)
        if how == 0:
            return raw[:at]
        if how == 1:
            return raw[:at] + noise + raw[at:]
        if not raw:
            return noise
        at = min(at, len(raw) - 1)
        return raw[:at] + bytes([raw[at] ^ (noise[0] if noise else 0xFF)]) + raw[at + 1 :]

    return st.one_of(
        st.binary(max_size=64),
        serialized,
        st.tuples(serialized, st.integers(0, 2), st.integers(0, 10_000), st.binary(max_size=8)).map(mutate),
    )


def broken(serialized: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Bytes that mostly fail to parse: random ones, and valid messages cut short (cheaper to
    draw than `mutations` filtered down to the few that do not parse)."""
    cut = serialized.filter(lambda raw: len(raw) > 1).flatmap(
        lambda raw: st.integers(1, len(raw) - 1).map(lambda at: raw[:at])
    )
    return st.one_of(st.binary(min_size=1, max_size=64), cut)


def parses(message_type, raw: bytes) -> bool:
    try:
        message_type.FromString(raw)
    except DecodeError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Generation (verifier): a tiny random Llama with a 40-token context (a chat prompt fits), so whole
# completions are short


MAX_MODEL_LEN = 40


@pytest.fixture(scope="module")
def verifier(tiny_llama_dir, smollm2_tokenizer):
    # One OpenMP thread for a model this small: on cores other work shares, two threads wait on
    # each other's barriers and every step takes some 30 times as long.
    threads = model_thread.call(torch.get_num_threads)
    model_thread.call(torch.set_num_threads, 1)
    server = VerifierThread(
        # One product for the linear layers: timing each on this machine would outlast the fuzz.
        Placement(cpu_linear="linear").load(tiny_llama_dir),
        smollm2_tokenizer,
        ["ngram"],
        policy="smartspec:4",
        cost_profile="none",
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=2,
        max_waiting=2,
        grace_seconds=5.0,
    )
    yield server
    server.close()
    model_thread.call(torch.set_num_threads, threads)


def sometimes(draw, hostile: st.SearchStrategy, valid: st.SearchStrategy, one_in: int = 6):
    """A field's value: hostile one time in `one_in`, so that a good share of whole messages is
    valid and gets past validation, into the engine. Failures shrink toward the valid value."""
    return draw(hostile if draw(st.integers(0, one_in - 1)) == one_in - 1 else valid)


@st.composite
def generate_requests(
    draw, vocab: int, request_ids: st.SearchStrategy[str] | None = None, big: bool = True
) -> gpb.GenerateRequest:
    """`big`: now and then a message past what the server receives."""
    token_id = ints(*INT32, special=(vocab - 1, vocab, vocab + 1))
    in_vocab = st.one_of(st.integers(0, 20), st.integers(0, vocab - 1))
    plain_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=12)
    ids = request_ids if request_ids is not None else st.one_of(st.just(""), st.text(max_size=12))
    req = gpb.GenerateRequest(request_id=sometimes(draw, strings(140), ids))

    prompt = draw(st.sampled_from(["text", "ids", "ids"]))
    if draw(st.integers(0, 9)) == 9:
        prompt = draw(st.sampled_from(["none", "empty ids", "oversized" if big else "none"]))
    prompt_len = None
    if prompt == "text":
        req.chat = draw(st.integers(0, 3)) == 3
        # The chat template alone is 30 tokens: a chat prompt that fits the context is a word.
        words = st.text("abcdefgh ", min_size=1, max_size=6) if req.chat else plain_text.filter(bool)
        req.prompt_text = sometimes(draw, strings(120), words)
    elif prompt == "ids":
        prompt_ids = sometimes(
            draw, st.lists(token_id, max_size=MAX_MODEL_LEN + 4), st.lists(in_vocab, min_size=1, max_size=8)
        )
        req.prompt_token_ids.ids.extend(prompt_ids)
        req.chat = sometimes(draw, st.just(True), st.just(False), 10)
        prompt_len = len(prompt_ids)
    elif prompt == "empty ids":
        req.prompt_token_ids.SetInParent()
    elif prompt == "oversized":
        req.prompt_token_ids.ids.extend(OVERSIZED)

    # Short completions mostly, so valid requests stay cheap; the context's edge exactly now and then.
    if prompt_len is not None and draw(st.integers(0, 4)) == 4:
        req.max_new_tokens = max(1, MAX_MODEL_LEN - prompt_len + draw(st.integers(-1, 1)))
    else:
        hostile = ints(*INT32, special=(MAX_MODEL_LEN - 1, MAX_MODEL_LEN, MAX_MODEL_LEN + 1))
        req.max_new_tokens = sometimes(draw, hostile, st.integers(1, 4))

    if draw(st.booleans()):
        s = req.sampling
        s.SetInParent()
        s.temperature = sometimes(draw, floats(32), st.sampled_from([0.0, 1e-5, 0.7, 1.0, 1.5]))
        if draw(st.booleans()):
            s.top_p = sometimes(draw, floats(32), st.sampled_from([1.0, 0.9, 0.5, 1e-6]))
        top_k = ints(*INT32, special=(vocab - 1, vocab, vocab + 1))
        s.top_k = sometimes(draw, top_k, st.sampled_from([0, 1, 5, 50]))
        if draw(st.booleans()):
            s.seed = draw(st.one_of(st.sampled_from([0, 1, 2**63 - 1, 2**63, UINT64_MAX]), st.integers(0, UINT64_MAX)))

    stop = st.lists(plain_text.filter(bool), max_size=2)
    req.stop.extend(sometimes(draw, st.one_of(st.lists(strings(70), max_size=10), lists(strings(8), 3)), stop))
    stop_ids = st.lists(in_vocab, max_size=2)
    hostile_ids = st.one_of(st.lists(token_id, max_size=34), lists(in_vocab, 3))
    req.stop_token_ids.extend(sometimes(draw, hostile_ids, stop_ids))
    req.ignore_eos = draw(st.booleans())

    if draw(st.booleans()):
        req.speculation.SetInParent()
        valid_mode = st.tuples(st.sampled_from([0, 1, 2]), st.integers(1, MAX_K))
        hostile_mode = st.tuples(ints(*INT32, special=(3,)), ints(*INT32, special=(MAX_K, MAX_K + 1)))
        req.speculation.mode, req.speculation.k = sometimes(draw, hostile_mode, valid_mode)
    req.trace_speculation = draw(st.booleans())
    return req


def check_generate(req: gpb.GenerateRequest, code: grpc.StatusCode, chunks: list, vocab: int) -> None:
    """A completed stream looks like the proto says: one final chunk, the counts add up."""
    assert_blames_the_caller(code, req)
    if code != grpc.StatusCode.OK:
        return
    assert chunks, req
    *middle, last = chunks
    assert all(c.finish_reason == gpb.FINISH_REASON_UNSPECIFIED for c in middle), req
    assert last.finish_reason in (gpb.FINISH_REASON_STOP, gpb.FINISH_REASON_LENGTH), (req, last)
    tokens = [t for c in chunks for t in c.token_ids]
    assert all(0 <= t < vocab for t in tokens), (req, tokens)
    assert len(tokens) == last.usage.completion_tokens <= req.max_new_tokens, (req, last)
    if last.finish_reason == gpb.FINISH_REASON_LENGTH:
        assert len(tokens) == req.max_new_tokens, (req, last)
    ids = {c.request_id for c in chunks}
    assert len(ids) == 1 and (not req.request_id or ids == {req.request_id}), (req, ids)
    spec = last.speculation
    assert 0 <= spec.accepted_tokens <= spec.proposed_tokens, (req, spec)
    if req.speculation.mode == gpb.SPECULATION_MODE_OFF:
        assert spec.proposed_tokens == 0, (req, spec)
    if not req.trace_speculation:
        assert not spec.rounds, (req, spec)
    for r in spec.rounds:
        assert 0 <= r.accepted <= r.proposed <= r.k <= MAX_K, (req, r)


def assert_verifier_serves(server: VerifierThread) -> None:
    request = gpb.GenerateRequest(prompt_token_ids=gpb.TokenIds(ids=[5, 6, 5]), max_new_tokens=2, ignore_eos=True)
    chunks = list(server.stub.Generate(request, timeout=CALL_TIMEOUT_S))
    assert chunks[-1].finish_reason == gpb.FINISH_REASON_LENGTH
    assert sum(len(c.token_ids) for c in chunks) == 2


def assert_no_request_left(server: VerifierThread) -> None:
    engine = server.verifier.engine
    deadline = time.monotonic() + 10
    while (engine.num_requests or engine.allocator.num_free != engine.allocator.num_blocks) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert engine.num_requests == 0
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_generate_requests(verifier):
    vocab = verifier.verifier.engine.vocab_size

    @fuzz(100)
    @given(generate_requests(vocab))
    def one_request(req):
        code, chunks = status_of(verifier.stub.Generate(req, timeout=CALL_TIMEOUT_S))
        assert code != grpc.StatusCode.ALREADY_EXISTS, req  # nothing else is in flight
        check_generate(req, code, chunks, vocab)
        assert_verifier_serves(verifier)

    one_request()
    assert_no_request_left(verifier)


def test_concurrent_generate_requests_with_shared_ids(verifier):
    """Requests in flight together: some share an id (ALREADY_EXISTS is then allowed), and
    more than the two running plus two waiting the server admits (RESOURCE_EXHAUSTED)."""
    vocab = verifier.verifier.engine.vocab_size
    ids = st.sampled_from(["", "a", "a", "b"])

    @fuzz(20)
    @given(st.lists(generate_requests(vocab, ids), min_size=2, max_size=6))
    def together(requests):
        calls = [verifier.stub.Generate(r, timeout=CALL_TIMEOUT_S) for r in requests]  # all sent at once
        for req, call in zip(requests, calls):
            code, chunks = status_of(call)
            if code == grpc.StatusCode.ALREADY_EXISTS:
                assert req.request_id and sum(r.request_id == req.request_id for r in requests) > 1, req
                continue
            check_generate(req, code, chunks, vocab)
        assert_verifier_serves(verifier)

    together()
    assert_no_request_left(verifier)


def generate_bytes(vocab: int) -> st.SearchStrategy[bytes]:
    return generate_requests(vocab, big=False).map(lambda r: r.SerializeToString())


def test_generate_raw_bytes_that_parse(verifier):
    vocab = verifier.verifier.engine.vocab_size
    raw_call = verifier.channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)

    @fuzz(30)
    @given(mutations(generate_bytes(vocab)).filter(lambda raw: parses(gpb.GenerateRequest, raw)))
    def one_raw(raw):
        req = gpb.GenerateRequest.FromString(raw)
        code, chunks = status_of(raw_call(raw, timeout=CALL_TIMEOUT_S))
        assert code != grpc.StatusCode.ALREADY_EXISTS, req
        check_generate(req, code, [gpb.GenerateResponse.FromString(c) for c in chunks], vocab)
        assert_verifier_serves(verifier)

    one_raw()
    assert_no_request_left(verifier)


def test_generate_raw_bytes_that_do_not_parse(verifier):
    vocab = verifier.verifier.engine.vocab_size
    raw_call = verifier.channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)

    @fuzz(20)
    @given(broken(generate_bytes(vocab)).filter(lambda raw: not parses(gpb.GenerateRequest, raw)))
    def one_raw(raw):
        code, _ = status_of(raw_call(raw, timeout=CALL_TIMEOUT_S))
        assert_blames_the_caller(code, raw)
        assert_verifier_serves(verifier)

    one_raw()


# ---------------------------------------------------------------------------------------------
# Proposer: n-gram lookup, with room for only a few request states so eviction happens


@pytest.fixture(scope="module")
def proposer():
    loop = LoopThread()
    server = ProposerServer(ProposerConfig(server=ServerConfig(port=0), max_requests=6))
    loop.run(server.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    yield server, channel
    channel.close()
    loop.run(server.stop(0))
    loop.stop()


PROPOSER_IDS = st.sampled_from(["r0", "r1", "r2", "r3"])


def rarely(draw, hostile: st.SearchStrategy, valid: st.SearchStrategy):
    """`sometimes`, for the many fields of a stream of batches: each one rarely hostile, or
    hardly any stream would get past its first batch."""
    return sometimes(draw, hostile, valid, one_in=15)


@st.composite
def propose_items(draw, lengths: dict[str, int], big: bool = True) -> ppb.ProposeItem:
    """`lengths`: what this stream told the proposer so far, so that most items continue a
    request's context consistently (and get drafts), and others contradict it."""
    item = ppb.ProposeItem(request_id=rarely(draw, strings(20), PROPOSER_IDS))
    token = ints(*INT32, special=(49151, 49152))
    new = rarely(draw, st.lists(token, max_size=6), st.lists(st.integers(0, 5), max_size=12))
    if big and draw(st.integers(0, 24)) == 24:
        new = draw(st.sampled_from([[7] * 20_000, OVERSIZED]))
    item.new_token_ids.extend(new)
    item.full_context = draw(st.booleans())
    known = 0 if item.full_context else lengths.get(item.request_id, 0)
    how = draw(st.sampled_from(["consistent"] * 6 + ["off by one", "any"]))
    if how == "consistent":
        item.total_length = min(known + len(new), INT64[1])
    elif how == "off by one":
        item.total_length = max(INT64[0], min(known + len(new) + draw(st.sampled_from([-1, 1])), INT64[1]))
    else:
        item.total_length = draw(ints(*INT64))
    lengths[item.request_id] = item.total_length
    item.k = rarely(draw, ints(*INT32, special=(MAX_K, MAX_K + 1)), st.integers(0, MAX_K))
    if draw(st.booleans()):
        s = item.sampling
        s.SetInParent()
        s.temperature = rarely(draw, floats(32), st.sampled_from([0.0, 0.7, 1.0]))
        if draw(st.booleans()):
            s.top_p = rarely(draw, floats(32), st.sampled_from([1.0, 0.9, 1e-6]))
        s.top_k = rarely(draw, ints(*INT32), st.sampled_from([0, 1, 50]))
        if draw(st.booleans()):
            s.seed = draw(st.integers(0, UINT64_MAX))
    return item


@st.composite
def propose_streams(draw, big: bool = True) -> list[ppb.ProposeRequest]:
    lengths: dict[str, int] = {}
    stream = []
    for _ in range(draw(st.integers(1, 5))):
        req = ppb.ProposeRequest(
            step_id=draw(st.one_of(st.sampled_from([0, 1, UINT64_MAX]), st.integers(0, UINT64_MAX)))
        )
        items = draw(
            st.lists(
                propose_items(lengths, big),
                min_size=rarely(draw, st.just(0), st.just(1)),
                max_size=4,
                unique_by=lambda i: i.request_id,
            )
        )
        req.items.extend(items)
        if req.items and draw(st.integers(0, 9)) == 9:
            req.items.append(req.items[0])  # a duplicate id in one batch
        req.released_request_ids.extend(
            rarely(draw, st.lists(strings(20), max_size=3), st.lists(PROPOSER_IDS, max_size=2))
        )
        stream.append(req)
    return stream


def check_propose(stream: list[ppb.ProposeRequest], code: grpc.StatusCode, replies: list) -> None:
    """One reply per request, in order, until the stream ends; one result per item, in order."""
    assert_blames_the_caller(code, stream)
    assert len(replies) <= len(stream), stream
    if code == grpc.StatusCode.OK:
        assert len(replies) == len(stream), stream
    for req, reply in zip(stream, replies):
        assert reply.step_id == req.step_id, (req, reply)
        assert [r.request_id for r in reply.results] == [i.request_id for i in req.items], (req, reply)
        for item, result in zip(req.items, reply.results):
            assert result.status in (
                ppb.PROPOSE_STATUS_OK,
                ppb.PROPOSE_STATUS_UNKNOWN_REQUEST,
                ppb.PROPOSE_STATUS_LENGTH_MISMATCH,
            ), (item, result)
            assert len(result.draft_token_ids) <= item.k, (item, result)
            assert not result.draft_probs, (item, result)  # n-gram drafts are deterministic
            if result.status == ppb.PROPOSE_STATUS_OK:
                assert result.known_length == item.total_length, (item, result)
            else:
                assert not result.draft_token_ids, (item, result)
        assert math.isfinite(reply.draft_ms) and reply.draft_ms >= 0, reply


def assert_proposer_serves(channel) -> None:
    stub = ppb_grpc.ProposerStub(channel)
    request = ppb.ProposeRequest(
        step_id=1,
        items=[
            ppb.ProposeItem(request_id="health", new_token_ids=[1, 2, 3, 1, 2], total_length=5, k=3, full_context=True)
        ],
    )
    [reply] = list(stub.Propose(iter([request]), timeout=CALL_TIMEOUT_S))
    assert reply.results[0].status == ppb.PROPOSE_STATUS_OK
    assert list(reply.results[0].draft_token_ids) == [3, 1, 2]


def assert_no_state_left(server: ProposerServer) -> None:
    """A stream's request states go with it, however it ended."""
    deadline = time.monotonic() + 10
    while len(server.servicer.store) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert len(server.servicer.store) == 0


def test_propose_streams(proposer):
    server, channel = proposer
    stub = ppb_grpc.ProposerStub(channel)

    @fuzz(120)
    @given(propose_streams())
    def one_stream(stream):
        code, replies = status_of(stub.Propose(iter(stream), timeout=CALL_TIMEOUT_S))
        check_propose(stream, code, replies)
        assert_proposer_serves(channel)
        assert_no_state_left(server)

    one_stream()


def propose_bytes() -> st.SearchStrategy[bytes]:
    return propose_streams(big=False).map(lambda s: s[0].SerializeToString())


def test_propose_raw_bytes_that_parse(proposer):
    server, channel = proposer
    raw_call = channel.stream_stream(PROPOSE, request_serializer=None, response_deserializer=None)

    @fuzz(40)
    @given(
        st.lists(mutations(propose_bytes()).filter(lambda raw: parses(ppb.ProposeRequest, raw)), min_size=1, max_size=3)
    )
    def one_stream(raws):
        code, replies = status_of(raw_call(iter(raws), timeout=CALL_TIMEOUT_S))
        stream = [ppb.ProposeRequest.FromString(r) for r in raws]
        check_propose(stream, code, [ppb.ProposeResponse.FromString(r) for r in replies])
        assert_proposer_serves(channel)
        assert_no_state_left(server)

    one_stream()


def test_propose_raw_bytes_that_do_not_parse(proposer):
    server, channel = proposer
    raw_call = channel.stream_stream(PROPOSE, request_serializer=None, response_deserializer=None)

    @fuzz(20)
    @given(broken(propose_bytes()).filter(lambda raw: not parses(ppb.ProposeRequest, raw)))
    def one_stream(raw):
        code, _ = status_of(raw_call(iter([raw]), timeout=CALL_TIMEOUT_S))
        assert_blames_the_caller(code, raw)
        assert_proposer_serves(channel)
        assert_no_state_left(server)

    one_stream()


# ---------------------------------------------------------------------------------------------
# Controller: Connect guarded by a verifier token, SetPolicy by an admin token


VERIFIER_TOKEN = "verifier-secret"
ADMIN_TOKEN = "admin-secret"
POLICY = "smartspec:4"


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class ControllerUnderFuzz:
    def __init__(self, token_dir):
        (token_dir / "verifier").write_text(VERIFIER_TOKEN + "\n")
        (token_dir / "admin").write_text(ADMIN_TOKEN + "\n")
        self.loop = LoopThread()
        self.ctl = Controller(
            from_options(
                ControllerConfig,
                port=0,
                metrics_port=0,
                policy=POLICY,
                proposers="10.0.0.1:50061",
                push_interval_s=0.02,
                verifier_tokens_file=str(token_dir / "verifier"),
                admin_tokens_file=str(token_dir / "admin"),
            )
        )
        # The periodic push swallows a failing refit (logging it): the fuzz must see that, too.
        self.records = Records()
        logging.getLogger("controller_svc").addHandler(self.records)
        self.loop.run(self.ctl.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.ctl.port}")
        self.stub = cpb_grpc.ControllerStub(self.channel)

    def forget_everything(self) -> None:
        """A fresh state for each example: the fits remember every step they were sent, so one
        poisoned by an example would fail every later one, and no failure could be shrunk."""

        async def swap():
            self.ctl.state = self.ctl.servicer.state = ControllerState(Policy.parse(POLICY))

        self.loop.run(swap())
        self.records.records.clear()

    def assert_serves(self, cost: bool = True) -> None:
        """A live verifier connects, reports one step and gets the refitted policy pushed, in
        bounds (its cost model too, unless `cost` is False)."""
        reply = self.stub.GetPolicy(cpb.GetPolicyRequest(), metadata=bearer(ADMIN_TOKEN), timeout=CALL_TIMEOUT_S)
        assert_policy_in_bounds(reply, cost)
        pushed = threading.Event()

        def reports():
            yield cpb.VerifierReport(verifier_id="health", steps=[HEALTHY_STEP])
            pushed.wait(10)

        call = self.stub.Connect(reports(), metadata=bearer(VERIFIER_TOKEN), timeout=CALL_TIMEOUT_S)
        updates = [next(call), next(call)]  # the state on connecting, then the push after the refit
        pushed.set()
        code, rest = status_of(call)
        assert code == grpc.StatusCode.OK
        assert list(updates[0].endpoints.addresses) == ["10.0.0.1:50061"]
        assert updates[1].policy.version > updates[0].policy.version
        for update in updates + rest:
            assert_policy_in_bounds(update.policy, cost)
        failures = [r for r in self.records.records if r.exc_info]
        assert not failures, logging.Formatter().formatException(failures[0].exc_info)

    def close(self) -> None:
        self.channel.close()
        self.loop.run(self.ctl.stop())
        self.loop.stop()
        logging.getLogger("controller_svc").removeHandler(self.records)


@pytest.fixture(scope="module")
def controller(tmp_path_factory):
    server = ControllerUnderFuzz(tmp_path_factory.mktemp("controller-tokens"))
    yield server
    server.close()


HEALTHY_STEP = cpb.StepMetrics(
    batch_size=1,
    num_batched_tokens=3,
    num_kv_tokens=50,
    proposed=[2],
    accepted=[1],
    verify_ms=5.0,
    propose_ms=1.0,
    draft_ms=0.5,
    step_ms=7.0,
    emitted_tokens=2,
    draft_steps=2,
    draft_tokens=2,
    planned_k=[2],
)


DRAFT_PAIRS = st.lists(st.tuples(st.integers(0, MAX_K), st.integers(0, MAX_K)), max_size=6)
STEP_IDS = st.one_of(st.integers(0, 100), st.integers(0, UINT64_MAX))
COUNTS = st.one_of(st.integers(0, 64), st.integers(0, INT32[1]))
KV_COUNTS = st.one_of(st.integers(0, 10_000), st.integers(0, INT64[1]))
FINITE_EXTREMES = [0.0, 5e-324, 1e-300, 1e-6, 1e6, 1e100, 1e300, 1.7976931348623157e308]
# Extremes as fixed values, not a continuous range: near where a fit overflows, whether it does
# can hang on the order of a sum, and a failure shrunk onto that edge would not reproduce.
MILLISECONDS = st.one_of(st.floats(0.1, 100), st.sampled_from(FINITE_EXTREMES), st.floats(0, 1e6))


@st.composite
def step_metrics(draw, plausible: bool) -> cpb.StepMetrics:
    """`plausible`: the step passes the controller's check, so its hostile values (huge, tiny,
    zero) reach the fits; otherwise any field may be out of range."""
    i32 = ints(*INT32)
    count, kv, ms = (COUNTS, KV_COUNTS, MILLISECONDS) if plausible else (i32, ints(*INT64), floats())
    step = cpb.StepMetrics(
        step_id=draw(STEP_IDS),
        batch_size=draw(count),
        num_batched_tokens=draw(count),
        num_kv_tokens=draw(kv),
        num_prefill_tokens=draw(i32),
        verify_ms=draw(ms),
        propose_ms=draw(ms),
        draft_ms=draw(ms),
        step_ms=draw(ms),
        emitted_tokens=draw(i32),
        draft_steps=draw(i32),
        draft_tokens=draw(i32),
    )
    pairs = draw(DRAFT_PAIRS)
    if plausible:
        pairs = [(p, min(a, p)) for p, a in pairs]
    step.proposed.extend(p for p, _ in pairs)
    step.accepted.extend(a for _, a in pairs)
    if not plausible and draw(st.booleans()):
        step.proposed.extend(draw(st.lists(i32, max_size=3)))
        step.accepted.extend(draw(st.lists(i32, max_size=3)))
    step.planned_k.extend(draw(lists(ints(*INT32, special=(MAX_K, MAX_K + 1)), 6)))
    return step


STEPS = st.lists(st.composite(lambda draw: sometimes(draw, step_metrics(False), step_metrics(True)))(), max_size=5)


@st.composite
def verifier_reports(draw, big: bool = True) -> cpb.VerifierReport:
    report = cpb.VerifierReport(verifier_id=sometimes(draw, strings(30), st.sampled_from(["v1", "v2"])))
    report.steps.extend(draw(STEPS))
    if big and draw(st.integers(0, 30)) == 30:
        report.steps.extend([cpb.StepMetrics(planned_k=OVERSIZED[:1000])] * 1000)
    return report


BAD_TOKENS = st.one_of(
    st.just(()),
    st.just((("authorization", VERIFIER_TOKEN),)),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
        lambda t: (("authorization", "Bearer " + t),)
    ),
)
TOKENS = st.composite(lambda draw: sometimes(draw, BAD_TOKENS, st.just(bearer(VERIFIER_TOKEN))))()


def assert_policy_in_bounds(policy: cpb.Policy, cost: bool = True) -> None:
    """What a verifier takes from a push: policy_from_pb raises on a mode, k, k_max or prior out
    of bounds; a fitted cost model it cannot use (`cost_from_pb` gives None: a negative, NaN or
    infinite cost) it drops without a word."""
    policy_from_pb(policy)
    if cost and policy.cost_model.num_steps:
        assert cost_from_pb(policy.cost_model) is not None, policy.cost_model
    assert math.isfinite(policy.acceptance_prior_weight) and policy.acceptance_prior_weight > 0, policy


def test_connect_report_streams_never_break_the_controller(controller):
    """Whatever a verifier streams, the stream ends in a status that blames it and the next
    verifier is served; the pushed cost model is the next test's concern."""

    @fuzz(100)
    @given(st.lists(verifier_reports(), min_size=1, max_size=4), TOKENS)
    def one_stream(reports, metadata):
        controller.forget_everything()
        call = controller.stub.Connect(iter(reports), metadata=metadata, timeout=CALL_TIMEOUT_S)
        code, updates = status_of(call)
        assert_blames_the_caller(code, (metadata, reports))
        if metadata == bearer(VERIFIER_TOKEN):
            assert code != grpc.StatusCode.UNAUTHENTICATED
        for update in updates:
            assert_policy_in_bounds(update.policy, cost=False)
        controller.assert_serves(cost=False)

    one_stream()


def test_policy_pushed_after_reports_stays_within_bounds(controller):
    """Reports with finite, non-negative times and drafts within proposed either reach the
    controller's fits or, with a time no step takes (below a microsecond, beyond an hour), are
    refused naming it; the policy pushed next must be one a verifier takes whole."""
    reports = st.builds(
        cpb.VerifierReport, verifier_id=st.sampled_from(["v1", "v2"]), steps=st.lists(step_metrics(True), max_size=5)
    )

    # The largest finite time: a fit through it would overflow, so the report is refused.
    overflow = cpb.StepMetrics(verify_ms=1.7976931348623157e308, propose_ms=1.0, draft_ms=1.0, step_ms=1.0)

    @fuzz(60)
    @given(st.lists(reports, min_size=1, max_size=3))
    @example([cpb.VerifierReport(verifier_id="v1", steps=[overflow])])
    def one_stream(reports):
        controller.forget_everything()
        call = controller.stub.Connect(iter(reports), metadata=bearer(VERIFIER_TOKEN), timeout=CALL_TIMEOUT_S)
        code, updates = status_of(call)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), reports
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert "_ms: must be 0 or in" in call.details() or "must be in [0," in call.details(), call.details()
        for update in updates:
            assert_policy_in_bounds(update.policy)
        controller.assert_serves()

    one_stream()


def test_set_policy_keeps_the_policy_within_bounds(controller):
    """Whatever the admin asks for, the policy in force and the next push stay in bounds."""

    @fuzz(30)
    @given(
        ints(*INT32, special=(0, 1, 2, 3, 4, 5)),
        ints(*INT32, special=(MAX_K, MAX_K + 1)),
        ints(*INT32, special=(MAX_K, MAX_K + 1)),
    )
    def one_change(mode, k, k_max):
        controller.forget_everything()
        request = cpb.SetPolicyRequest(mode=mode, k=k, k_max=k_max)
        try:
            reply = controller.stub.SetPolicy(request, metadata=bearer(ADMIN_TOKEN), timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as err:
            assert_blames_the_caller(err.code(), request)
        else:
            assert_policy_in_bounds(reply)
        controller.assert_serves()

    one_change()


def report_bytes() -> st.SearchStrategy[bytes]:
    return verifier_reports(big=False).map(lambda r: r.SerializeToString())


def test_connect_raw_bytes_that_parse(controller):
    raw_call = controller.channel.stream_stream(CONNECT, request_serializer=None, response_deserializer=None)

    @fuzz(40)
    @given(
        st.lists(mutations(report_bytes()).filter(lambda raw: parses(cpb.VerifierReport, raw)), min_size=1, max_size=3)
    )
    def one_stream(raws):
        controller.forget_everything()
        code, updates = status_of(raw_call(iter(raws), metadata=bearer(VERIFIER_TOKEN), timeout=CALL_TIMEOUT_S))
        assert_blames_the_caller(code, raws)
        for update in updates:
            assert_policy_in_bounds(cpb.ControllerUpdate.FromString(update).policy, cost=False)
        controller.assert_serves(cost=False)

    one_stream()


def test_connect_raw_bytes_that_do_not_parse(controller):
    raw_call = controller.channel.stream_stream(CONNECT, request_serializer=None, response_deserializer=None)

    @fuzz(20)
    @given(broken(report_bytes()).filter(lambda raw: not parses(cpb.VerifierReport, raw)))
    def one_stream(raw):
        controller.forget_everything()
        code, _ = status_of(raw_call(iter([raw]), metadata=bearer(VERIFIER_TOKEN), timeout=CALL_TIMEOUT_S))
        assert_blames_the_caller(code, raw)
        controller.assert_serves(cost=False)

    one_stream()
