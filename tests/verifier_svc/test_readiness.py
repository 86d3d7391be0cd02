"""What the verifier tells probes and clients about its state, and the limits it enforces before
any work: readiness (`smartspec.v1.Generation`) against liveness (`""`) through overload and
drain, GOAWAY on drain, message and prompt limits, connection ageing. Real gRPC on loopback."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from service_threads import wait_for

from protocol.v1 import generation_pb2 as pb

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
READY = "smartspec.v1.Generation"


def status(channel, service: str) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_readiness_follows_a_full_queue_and_liveness_stays(make_server):
    server = make_server(max_num_seqs=1, max_waiting=2)
    running = server.stub.Generate(pb.GenerateRequest(prompt_text="a", max_new_tokens=900, ignore_eos=True))
    next(running)
    waiting = [server.stub.Generate(pb.GenerateRequest(prompt_text=t, max_new_tokens=4)) for t in "bc"]
    wait_for(lambda: status(server.channel, READY) == NOT_SERVING)
    assert status(server.channel, "") == SERVING
    running.cancel()
    for stream in waiting:
        assert list(stream)[-1].finish_reason == pb.FINISH_REASON_LENGTH
    wait_for(lambda: status(server.channel, READY) == SERVING)


def test_drain_fails_readiness_sends_goaway_and_keeps_liveness_on_the_probe_port(make_server, unused_tcp_port):
    server = make_server(health_port=unused_tcp_port)
    probe = grpc.insecure_channel(f"127.0.0.1:{unused_tcp_port}")
    assert status(probe, READY) == SERVING
    stream = server.stub.Generate(pb.GenerateRequest(prompt_text="a", max_new_tokens=200, ignore_eos=True))
    next(stream)
    drained = server.submit(server.verifier.drain())
    wait_for(lambda: status(probe, READY) == NOT_SERVING)
    assert status(probe, "") == SERVING  # a draining pod is not restarted
    # GOAWAY: the connection takes no new call, and the port no longer listens.
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.Generate(pb.GenerateRequest(prompt_text="late", max_new_tokens=2), timeout=5))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with grpc.insecure_channel(f"127.0.0.1:{server.verifier.port}") as fresh:
        with pytest.raises(grpc.FutureTimeoutError):
            grpc.channel_ready_future(fresh).result(timeout=1)
    assert list(stream)[-1].usage.completion_tokens == 200
    drained.result(30)
    probe.close()


def test_a_message_over_the_size_limit_is_refused_and_the_server_goes_on(make_server):
    server = make_server(max_message_bytes=4096)
    with pytest.raises(grpc.RpcError) as err:
        list(server.stub.Generate(pb.GenerateRequest(prompt_text="x" * 8000, max_new_tokens=2), timeout=10))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    done = list(server.stub.Generate(pb.GenerateRequest(prompt_text="fine", max_new_tokens=2), timeout=10))
    assert done[-1].finish_reason == pb.FINISH_REASON_LENGTH


def test_prompt_bytes_and_max_new_tokens_caps_name_their_field(make_server):
    server = make_server(max_prompt_bytes=100, max_new_tokens_cap=16)
    for fields, name in (
        ({"prompt_text": "y" * 101, "max_new_tokens": 2}, "prompt_text"),
        ({"prompt_text": "y", "max_new_tokens": 17}, "max_new_tokens"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            list(server.stub.Generate(pb.GenerateRequest(**fields), timeout=10))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and name in err.value.details()
    assert list(server.stub.Generate(pb.GenerateRequest(prompt_text="y" * 100, max_new_tokens=16), timeout=10))


def test_an_aged_connection_finishes_its_streams_and_the_client_reconnects(make_server):
    """max_connection_age: the server sends GOAWAY to an old connection; the stream on it runs to
    its end within the grace, and the next call goes over a new connection."""
    server = make_server(max_connection_age_s=0.3, max_connection_age_grace_s=30.0)
    stream = server.stub.Generate(pb.GenerateRequest(prompt_text="a", max_new_tokens=300, ignore_eos=True))
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 300 and chunks[-1].timings.e2e_ms > 300
    time.sleep(0.5)
    for _ in range(3):
        done = list(server.stub.Generate(pb.GenerateRequest(prompt_text="b", max_new_tokens=2), timeout=10))
        assert done[-1].finish_reason == pb.FINISH_REASON_LENGTH
