"""The OpenAI-compatible HTTP door through the official `openai` client (and raw HTTP where a
client would hide the response): real aiohttp on loopback over the tiny random Llama."""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest
from service_threads import wait_for

from protocol.v1 import generation_pb2 as pb

MODEL = "tiny"


@pytest.fixture
def http_server(make_server, unused_tcp_port):
    def make(**overrides):
        server = make_server(http_port=unused_tcp_port, served_model_name=MODEL, **overrides)
        server.base = f"http://127.0.0.1:{unused_tcp_port}"
        return server

    return make


def client(server, key: str = "unused", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=60, **options)


def post(server, path: str, body, headers=None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(server.base + path, data=data, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_completion_and_chat_streamed_and_whole_agree_with_grpc(http_server):
    server = http_server()
    api = client(server)
    whole = api.completions.create(model=MODEL, prompt="Hello there", max_tokens=12, temperature=0)
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 12 and whole.usage.total_tokens == whole.usage.prompt_tokens + 12 - (
        12 - whole.usage.completion_tokens
    )
    chunks = list(
        api.completions.create(
            model=MODEL, prompt="Hello there", max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    grpc_text = "".join(
        r.text for r in server.stub.Generate(pb.GenerateRequest(prompt_text="Hello there", max_new_tokens=12))
    )
    assert grpc_text == whole.choices[0].text

    messages = [{"role": "user", "content": "Name a colour."}]
    chat = api.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = list(
        api.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True)
    )
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    grpc_chat = "".join(
        r.text
        for r in server.stub.Generate(pb.GenerateRequest(prompt_text="Name a colour.", chat=True, max_new_tokens=10))
    )
    assert grpc_chat == chat.choices[0].message.content
    assert chat.model_extra["speculation"]["proposed_tokens"] == 0  # no proposer here


def test_stop_seed_max_tokens_and_usage(http_server):
    server = http_server()
    api = client(server)
    full = api.completions.create(
        model=MODEL, prompt="Count:", max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    assert full.usage.completion_tokens == 20 and full.choices[0].finish_reason == "length"
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if stop.strip():  # a stop string taken from the greedy text itself ends it there
        stopped = api.completions.create(
            model=MODEL, prompt="Count:", max_tokens=20, temperature=0, stop=[stop], extra_body={"ignore_eos": True}
        )
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == text[: text.index(stop)]
    sampled = [
        api.completions.create(model=MODEL, prompt="Once", max_tokens=16, temperature=1.0, seed=seed).choices[0].text
        for seed in (7, 7, 8)
    ]
    assert sampled[0] == sampled[1]
    models = api.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_logprobs_are_returned_per_token_with_top_alternatives(http_server):
    server = http_server()
    api = client(server)
    out = api.completions.create(model=MODEL, prompt="Hello", max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy: the chosen is the best
    chat = api.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, logprobs=True,
        top_logprobs=5,
    )  # fmt: skip
    for entry in chat.choices[0].logprobs.content:
        assert len(entry.top_logprobs) == 5 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def g(**fields) -> pb.GenerateRequest:
    """The gRPC request of the same body: prompt "a", 4 tokens unless changed."""
    if "prompt_token_ids" not in fields:
        fields.setdefault("prompt_text", "a")
    return pb.GenerateRequest(**{"max_new_tokens": 4, **fields})


BAD = [  # (body changes, the parameter named, the same request over gRPC or None)
    ({"max_tokens": 0}, "max_tokens", g(max_new_tokens=0)),
    ({"temperature": -1}, "temperature", g(sampling={"temperature": -1})),
    ({"top_p": 1.5}, "top_p", g(sampling={"top_p": 1.5})),
    ({"logprobs": 6}, "logprobs", g(logprobs=6)),
    ({"stop": [""]}, "stop", g(stop=[""])),
    ({"speculation": {"mode": "fixed", "k": 99}}, "speculation.k", g(speculation={"mode": 2, "k": 99})),
    ({"prompt": [10**6]}, "prompt", g(prompt_token_ids={"ids": [10**6]})),
    ({"prompt": ""}, "prompt", g(prompt_text="")),
    ({"max_tokens": 10**6}, "max_tokens", g(max_new_tokens=10**6)),
    ({"n": 2}, "n", None),
    ({"max_tokens": "4"}, "max_tokens", None),
    ({"presence_penalty": 0.5}, "presence_penalty", None),
    ({"speculation": {"mode": "sometimes"}}, "speculation.mode", None),
    ({"prompt": ["a", "b"]}, "prompt", None),
    ({"frobnicate": 1}, "frobnicate", None),
]


@pytest.mark.parametrize("change, param, grpc_request", BAD, ids=[p for _, p, _ in BAD])
def test_bad_inputs_are_400_naming_the_parameter_as_grpc_refuses_them(http_server, change, param, grpc_request):
    server = http_server()
    status, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 4, **change})
    assert status == 400 and body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(param)
    if grpc_request is not None:
        with pytest.raises(grpc.RpcError) as info:
            list(server.stub.Generate(grpc_request))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Nothing else broke: the same server still answers.
    assert client(server).completions.create(model=MODEL, prompt="a", max_tokens=2).usage.completion_tokens >= 1


def test_chat_errors_and_other_statuses(http_server):
    server = http_server(max_message_bytes=1 << 16)
    api = client(server)
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=MODEL, messages=[], max_tokens=2)
    assert info.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "a"}], logprobs=True, top_logprobs=6
        )
    assert info.value.body["param"] == "top_logprobs"
    with pytest.raises(openai.NotFoundError) as info:
        api.completions.create(model="gpt-9", prompt="a", max_tokens=2)
    assert info.value.body["param"] == "model" and info.value.body["code"] == "model_not_found"
    assert post(server, "/v1/completions", b"{not json")[0] == 400
    status, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "a" * (1 << 17)})
    assert status == 413 and "error" in body
    status, body = post(server, "/v1/nothing", {})
    assert status == 404 and "error" in body


def test_api_keys_guard_v1_but_not_health(http_server, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# callers\nsecret-1\n")
    server = http_server(api_keys_file=str(keys))
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").models.list()
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").completions.create(model=MODEL, prompt="a", max_tokens=2)
    assert client(server, key="secret-1").completions.create(model=MODEL, prompt="a", max_tokens=2).choices
    with urllib.request.urlopen(server.base + "/health", timeout=10) as response:
        assert response.status == 200


def test_a_full_queue_is_429_and_a_draining_server_503(http_server):
    server = http_server(max_num_seqs=1, max_waiting=1)
    api = client(server)
    running = api.completions.create(
        model=MODEL, prompt="a", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(running))
    waiting = server.stub.Generate(pb.GenerateRequest(prompt_text="b", max_new_tokens=4))
    wait_for(lambda: len(server.verifier.engine.scheduler.waiting) == 1)
    with pytest.raises(openai.RateLimitError) as info:
        api.completions.create(model=MODEL, prompt="c", max_tokens=2)
    assert info.value.response.headers["retry-after"] == "1"
    running.close()
    assert list(waiting)[-1].finish_reason == pb.FINISH_REASON_LENGTH
    server.verifier.draining = True  # what drain sets once GOAWAY is out
    try:
        status, body = post(server, "/v1/completions", {"model": MODEL, "prompt": "a"})
        assert status == 503 and body["error"]["code"] == "draining"
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(server.base + "/health", timeout=10)
        assert health.value.code == 503
    finally:
        server.verifier.draining = False


def test_a_client_that_closes_its_stream_frees_the_request(http_server):
    server = http_server()
    engine = server.verifier.engine
    stream = client(server).completions.create(
        model=MODEL, prompt="a", max_tokens=900, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks), next(chunks)
    assert engine.num_requests == 1 and engine.kv_usage() > 0
    stream.close()  # closes the connection
    wait_for(lambda: engine.num_requests == 0 and engine.kv_usage() == 0)


def test_https_with_the_verifier_certificate(http_server, tmp_path):
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "chain.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    server = http_server(tls_cert=str(tmp_path / "chain.pem"), tls_key=str(tmp_path / "chain.pem"))
    base = server.base.replace("http://", "https://")
    trusting = openai.DefaultHttpx2Client(verify=ssl.create_default_context(cafile=tmp_path / "ca.pem"))
    api = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, http_client=trusting)
    assert api.completions.create(model=MODEL, prompt="a", max_tokens=2).choices
    with pytest.raises(openai.APIConnectionError):  # a client that does not trust the CA
        client(server).with_options(base_url=base + "/v1").models.list()


def test_bench_drives_both_doors_with_the_same_requests(http_server):
    """`smartspec bench --endpoint openai` sends what the gRPC run sends and records the same
    things: tokens per request, first-token and inter-token times, the server's timings."""
    import asyncio

    from smartspec import bench

    server = http_server()
    runs = {}
    for endpoint, target in (("grpc", f"127.0.0.1:{server.verifier.port}"), ("openai", server.base)):
        runs[endpoint] = asyncio.run(
            bench.run_benchmark(
                target, ["one two", "three", "four five six"], rate=50.0, num_requests=6, max_new_tokens=8,
                speculation="off", seed=3, progress=False, endpoint=endpoint,
            )
        )  # fmt: skip
    for endpoint, result in runs.items():
        assert result["summary"]["errors"] == 0, endpoint
        for r in result["requests"]:
            assert r["finish_reason"] in ("FINISH_REASON_LENGTH", "FINISH_REASON_STOP")
            assert r["ttft_ms"] > 0 and len(r["itl_ms"]) == r["completion_tokens"] - 1
            assert 0 < r["server_timings"]["e2e_ms"] <= r["e2e_ms"]
    tokens = {e: [r["completion_tokens"] for r in result["requests"]] for e, result in runs.items()}
    assert tokens["grpc"] == tokens["openai"]  # greedy: the same completions through either door


def test_drain_lets_an_http_stream_finish_and_stops_listening(http_server):
    """SIGTERM's drain: the port stops taking connections at once, a stream in flight runs to its
    end within the grace period, then the server stops."""
    server = http_server()
    stream = client(server).completions.create(
        model=MODEL, prompt="a", max_tokens=60, stream=True, extra_body={"ignore_eos": True}
    )
    chunks = iter(stream)
    next(chunks)
    drained = server.submit(server.verifier.drain(grace_seconds=30))
    wait_for(lambda: server.verifier.draining)
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length"
    with pytest.raises(openai.APIConnectionError):  # a new connection finds nothing listening
        client(server).models.list()
    drained.result(timeout=30)


def test_keep_alive_connections_past_their_age_are_closed_after_a_response(http_server):
    """As gRPC's GOAWAY at --max-connection-age-s: a client on an old connection reconnects (and a
    load balancer may send it elsewhere); a young connection is kept."""
    import http.client

    server = http_server(max_connection_age_s=0.5)
    body = json.dumps({"model": MODEL, "prompt": "a", "max_tokens": 1})
    connection = http.client.HTTPConnection("127.0.0.1", int(server.base.rsplit(":", 1)[1]), timeout=30)
    connection.request("POST", "/v1/completions", body)
    first = connection.getresponse()
    first.read()
    assert first.getheader("Connection") != "close"
    time.sleep(0.6)
    connection.request("POST", "/v1/completions", body)
    aged = connection.getresponse()
    aged.read()
    assert aged.status == 200 and aged.getheader("Connection") == "close"
