"""The Generation service over real gRPC on loopback, with a tiny random Llama behind it."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from controller.profile import read_step_log
from protocol.v1 import generation_pb2 as pb


def generate(stub, timeout=30, **fields) -> list[pb.GenerateResponse]:
    fields.setdefault("max_new_tokens", 8)
    if "prompt_text" not in fields and "prompt_token_ids" not in fields:
        fields["prompt_text"] = "def fibonacci(n):"
    return list(stub.Generate(pb.GenerateRequest(**fields), timeout=timeout))


BAD_INPUTS = [
    ({"prompt_text": ""}, "prompt_text"),
    ({"prompt_token_ids": pb.TokenIds(ids=[])}, "prompt"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": -3}, "max_new_tokens"),
    ({"max_new_tokens": 5000}, "max_new_tokens"),
    ({"sampling": pb.SamplingParams(temperature=-0.5)}, "sampling.temperature"),
    ({"sampling": pb.SamplingParams(temperature=float("nan"))}, "sampling.temperature"),
    ({"sampling": pb.SamplingParams(temperature=1.0, top_p=0.0)}, "sampling.top_p"),
    ({"sampling": pb.SamplingParams(temperature=1.0, top_p=1.5)}, "sampling.top_p"),
    ({"sampling": pb.SamplingParams(top_k=-1)}, "sampling.top_k"),
    ({"prompt_token_ids": pb.TokenIds(ids=[1, 10**6])}, "prompt_token_ids"),
    ({"prompt_token_ids": pb.TokenIds(ids=[-4, 1])}, "prompt_token_ids"),
    ({"stop": ["x"] * 9}, "stop"),
    ({"stop": ["y" * 65]}, "stop"),
    ({"speculation": pb.Speculation(mode=7)}, "speculation.mode"),
]


def test_bad_input_gets_invalid_argument_and_serving_continues(make_server):
    server = make_server()
    for fields, field in BAD_INPUTS:
        with pytest.raises(grpc.RpcError) as err:
            generate(server.stub, **fields)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, fields
        assert field in err.value.details(), (fields, err.value.details())
        chunks = generate(server.stub)  # the next valid request still succeeds
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 8
    assert server.verifier.engine.allocator.num_free == server.verifier.engine.allocator.num_blocks


def test_stream_shape_and_final_chunk(make_server):
    server = make_server()
    chunks = generate(
        server.stub,
        request_id="abc",
        max_new_tokens=6,
        sampling=pb.SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7),
    )
    assert all(c.request_id == "abc" for c in chunks)
    last = chunks[-1]
    assert last.usage.completion_tokens == 6 == sum(len(c.token_ids) for c in chunks)
    assert last.usage.prompt_tokens > 0
    assert last.timings.e2e_ms >= last.timings.time_to_first_token_ms >= last.timings.queue_ms >= 0
    again = generate(
        server.stub,
        request_id="abd",
        max_new_tokens=6,
        sampling=pb.SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=7),
    )
    assert [t for c in again for t in c.token_ids] == [t for c in chunks for t in c.token_ids]  # seeded


def test_cancelled_streams_free_their_kv(make_server):
    server = make_server()
    initial = server.verifier.engine.allocator.num_free
    streams = [
        server.stub.Generate(
            pb.GenerateRequest(prompt_text=f"Story number {i}:", max_new_tokens=500, ignore_eos=True), timeout=60
        )
        for i in range(20)
    ]
    for s in streams:
        next(s)  # every stream is mid-flight
    assert server.verifier.engine.allocator.num_free < initial
    for s in streams:
        s.cancel()
    deadline = time.monotonic() + 5
    while server.verifier.engine.allocator.num_free != initial and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.verifier.engine.allocator.num_free == initial
    assert server.verifier.engine.num_requests == 0
    assert generate(server.stub)[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_full_waiting_queue_gets_resource_exhausted(make_server):
    server = make_server(max_num_seqs=1, max_waiting=1)
    running = server.stub.Generate(pb.GenerateRequest(prompt_text="a", max_new_tokens=900, ignore_eos=True))
    next(running)
    waiting = server.stub.Generate(pb.GenerateRequest(prompt_text="b", max_new_tokens=4))
    deadline = time.monotonic() + 5
    while len(server.verifier.engine.scheduler.waiting) < 1 and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(grpc.RpcError) as err:
        generate(server.stub)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    running.cancel()
    assert list(waiting)[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_duplicate_request_id_is_refused(make_server):
    server = make_server()
    first = server.stub.Generate(
        pb.GenerateRequest(request_id="dup", prompt_text="a", max_new_tokens=900, ignore_eos=True)
    )
    next(first)
    with pytest.raises(grpc.RpcError) as err:
        generate(server.stub, request_id="dup")
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


def test_health_reflection_and_metrics(make_server, unused_tcp_port):
    server = make_server(metrics_port=unused_tcp_port)
    generate(server.stub)
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "smartspec.v1.Generation"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    [reply] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"smartspec.v1.Generation", "grpc.health.v1.Health"} <= names
    text = urllib.request.urlopen(f"http://127.0.0.1:{unused_tcp_port}/metrics", timeout=5).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "smartspec_time_to_first_token_seconds",
        "smartspec_inter_token_latency_seconds",
        "smartspec_e2e_request_latency_seconds",
        "smartspec_step_seconds",
        "smartspec_num_requests_running",
        "smartspec_num_requests_waiting",
        "smartspec_kv_cache_usage_perc",
        "smartspec_goodput_tokens_per_second",
    ):
        assert name in families, name
    e2e_count = [
        s.value for s in families["smartspec_e2e_request_latency_seconds"].samples if s.name.endswith("_count")
    ]
    assert e2e_count == [1.0]
    # Which product each linear weight shape uses, over which row counts: every count of every shape once.
    kernels = [s for s in families["smartspec_cpu_linear_kernel"].samples if s.value == 1]
    assert kernels and {s.labels["kernel"] for s in kernels} <= {"linear", "transposed", "packed"}
    for shape in {s.labels["shape"] for s in kernels}:
        ranges = [s.labels["rows"] for s in kernels if s.labels["shape"] == shape]
        assert ranges[0].startswith("1") and ranges[-1].endswith("+")


def test_drain_finishes_in_flight_and_refuses_new_calls(make_server):
    server = make_server()
    stream = server.stub.Generate(pb.GenerateRequest(prompt_text="a", max_new_tokens=300, ignore_eos=True))
    next(stream)
    drained = server.submit(server.verifier.drain())
    deadline = time.monotonic() + 5
    while not server.verifier.draining and time.monotonic() < deadline:
        time.sleep(0.005)
    with pytest.raises(grpc.RpcError) as err:
        generate(server.stub)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH and rest[-1].usage.completion_tokens == 300
    drained.result(30)


def test_drain_aborts_what_outlives_the_grace_period(make_server):
    server = make_server(grace_seconds=0.3)
    stream = server.stub.Generate(pb.GenerateRequest(prompt_text="a", max_new_tokens=1000 - 8, ignore_eos=True))
    next(stream)
    drained = server.submit(server.verifier.drain())
    rest = list(stream)
    assert rest[-1].finish_reason == pb.FINISH_REASON_ABORT
    drained.result(30)
    assert server.verifier.engine.allocator.num_free == server.verifier.engine.allocator.num_blocks


def test_step_log_and_traced_rounds(make_server, tmp_path):
    """`--step-log` writes the engine's settings, then one record per step; a request that asks
    for its speculative rounds gets them with its last chunk, adding up to its totals."""
    log = tmp_path / "steps.jsonl"
    server = make_server(step_log=str(log), proposer="ngram", policy="fixed:3")
    prompt = pb.TokenIds(ids=[5, 6, 7, 5, 6, 7, 5, 6])  # repeats: prompt lookup finds drafts
    traced = generate(server.stub, prompt_token_ids=prompt, max_new_tokens=12, trace_speculation=True)[-1]
    plain = generate(server.stub, prompt_token_ids=prompt, max_new_tokens=12)[-1]
    spec = traced.speculation
    assert spec.rounds and all(r.accepted <= r.proposed <= r.k <= 3 for r in spec.rounds)
    assert sum(r.proposed for r in spec.rounds) == spec.proposed_tokens > 0
    assert sum(r.accepted for r in spec.rounds) == spec.accepted_tokens
    assert not plain.speculation.rounds and plain.speculation.proposed_tokens == spec.proposed_tokens
    server.close()  # drain closes the log
    steps = read_step_log(str(log))
    assert steps.config["cache"]["kv_cache_tokens"] == 4096 and "max_num_seqs" in steps.config["scheduler"]
    assert len(steps.steps) >= 2 * (1 + len(spec.rounds)) and steps.ends == sorted(steps.ends)
    assert all(s.verify_ms > 0 and s.step_ms >= s.verify_ms for s in steps.steps)
    assert sum(p for s in steps.steps for _, p, _ in s.drafts) == 2 * spec.proposed_tokens
