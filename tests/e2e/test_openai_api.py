"""`smartspec verifier --http-port` as a real process on the built-in model, through the official
`openai` client: greedy text over HTTP equals gRPC's and Hugging Face `generate`'s, returned
log-probabilities equal the target's own log-softmax (speculation off and on), and a client
that closes its stream frees its KV (read from the Prometheus /metrics endpoint)."""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
import openai
import pytest
import torch
from greedy_reference import STACK_PROMPTS, assert_same_greedy, hf_greedy
from verifier_process import start_verifier

from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def stack():
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    proc = start_verifier(
        "smollm2", grpc_port, "--http-port", str(http_port), "--metrics-port", str(metrics_port),
        "--proposer", "ngram", "--policy", "off", "--cost-profile", "none",
    )  # fmt: skip
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="unused", max_retries=0, timeout=120)
    channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
    yield api, pb_grpc.GenerationStub(channel), f"http://127.0.0.1:{metrics_port}/metrics"
    channel.close()
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def reference(smollm2_pair, smollm2_tokenizer):
    return smollm2_pair[1], smollm2_tokenizer


def test_greedy_over_http_equals_grpc_and_hugging_face(stack, reference):
    api, stub, _ = stack
    model, tokenizer = reference
    for prompt in STACK_PROMPTS[:4]:
        ids = tokenizer(prompt).input_ids
        http = api.completions.create(model="smollm2", prompt=ids, max_tokens=24, temperature=0, logprobs=0)
        tokens = [tokenizer.convert_tokens_to_ids(t) for t in http.choices[0].logprobs.tokens]  # decoded strings
        via_grpc = [t for r in stub.Generate(pb.GenerateRequest(prompt_token_ids={"ids": ids}, max_new_tokens=24))
                    for t in r.token_ids]  # fmt: skip
        assert http.choices[0].text == tokenizer.decode(via_grpc, skip_special_tokens=True)
        assert http.usage.completion_tokens == len(via_grpc)
        assert_same_greedy(model, ids, via_grpc, hf_greedy(model, ids, 24))
        assert len(tokens) == len(via_grpc)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=20, temperature=0)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    theirs = hf_greedy(model, list(ids), 20)
    assert chat.choices[0].message.content == tokenizer.decode(theirs, skip_special_tokens=True)


@pytest.mark.parametrize("speculation", [{"mode": "off"}, {"mode": "fixed", "k": 3}], ids=["off", "fixed3"])
def test_logprobs_equal_the_targets_log_softmax(stack, reference, speculation):
    """Within 1e-4 of Hugging Face's log-softmax for every greedy token, and the same top-5 sets,
    whether the token was an accepted draft or decided by the target alone."""
    api, stub, _ = stack
    model, tokenizer = reference
    proposed = 0
    for prompt in STACK_PROMPTS[:3]:
        ids = tokenizer(prompt).input_ids
        out = api.completions.create(
            model="smollm2", prompt=ids, max_tokens=20, temperature=0, logprobs=5,
            extra_body={"speculation": speculation, "ignore_eos": True},
        )  # fmt: skip
        proposed += out.model_extra["speculation"]["proposed_tokens"]
        # The tokens' ids, from a second request over the same door: decoded strings are ambiguous.
        generated = [t for t in hf_greedy(model, ids, 20, ignore_eos=True)]
        with torch.inference_mode():
            logits = model(torch.tensor([ids + generated])).logits[0, len(ids) - 1 : -1].float()
        expected = torch.log_softmax(logits, dim=-1)
        lp = out.choices[0].logprobs
        assert out.choices[0].text == tokenizer.decode(generated, skip_special_tokens=True)
        for i, token in enumerate(generated):
            assert lp.token_logprobs[i] == pytest.approx(float(expected[i, token]), abs=1e-4)
            top = expected[i].topk(5)
            assert {tokenizer.decode([t]) for t in top.indices.tolist()} == set(lp.top_logprobs[i])
            for t, value in zip(top.indices.tolist(), top.values.tolist()):
                assert lp.top_logprobs[i][tokenizer.decode([t])] == pytest.approx(value, abs=1e-4)
        mode = pb.SPECULATION_MODE_FIXED if speculation["mode"] == "fixed" else pb.SPECULATION_MODE_OFF
        over_grpc = [
            entry
            for chunk in stub.Generate(
                pb.GenerateRequest(
                    prompt_token_ids={"ids": ids}, max_new_tokens=20, ignore_eos=True, logprobs=5,
                    speculation={"mode": mode, "k": speculation.get("k", 0)},
                )
            )
            for entry in chunk.logprobs
        ]  # fmt: skip
        assert len(over_grpc) == len(generated)
        for i, entry in enumerate(over_grpc):  # the gRPC door returns the same numbers
            assert entry.logprob == pytest.approx(lp.token_logprobs[i], abs=1e-6)
            assert {t.token_id for t in entry.top} == set(expected[i].topk(5).indices.tolist())
    if speculation["mode"] == "fixed":
        assert proposed > 0  # drafts really went through the verifier


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def test_a_closed_stream_frees_its_kv(stack):
    api, _, metrics = stack
    stream = api.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=1000,
        stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = iter(stream)
    for _ in range(3):
        next(chunks)
    assert metric(metrics, "smartspec_num_requests_running") == 1
    assert metric(metrics, "smartspec_kv_cache_usage_perc") > 0
    stream.close()
    deadline = time.monotonic() + 20
    while metric(metrics, "smartspec_num_requests_running") or metric(metrics, "smartspec_kv_cache_usage_perc"):
        assert time.monotonic() < deadline, "the closed stream's request kept its KV"
        time.sleep(0.1)
