"""`smartspec verifier` as a real process: stream through gRPC, the CLI client, SIGTERM drain."""

from __future__ import annotations

import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from verifier_process import SMARTSPEC, start_verifier

from protocol.security import CLIENT_OPTIONS
from protocol.v1 import generation_pb2 as pb
from protocol.v1 import generation_pb2_grpc as pb_grpc


@pytest.fixture
def tiny_verifier(tiny_llama_dir, unused_tcp_port):
    proc = start_verifier(tiny_llama_dir, unused_tcp_port, "--grace-seconds", "20")
    yield proc, f"127.0.0.1:{unused_tcp_port}"
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_streams_over_real_grpc_then_drains_on_sigterm(tiny_verifier):
    proc, target = tiny_verifier
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        chunks = list(
            stub.Generate(pb.GenerateRequest(prompt_text="Hello there", max_new_tokens=16, ignore_eos=True), timeout=60)
        )
        assert sum(len(c.token_ids) for c in chunks) == 16
        assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH

        in_flight = stub.Generate(
            pb.GenerateRequest(prompt_text="Count:", max_new_tokens=400, ignore_eos=True), timeout=60
        )
        next(in_flight)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Generate(pb.GenerateRequest(prompt_text="late", max_new_tokens=4), timeout=10))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(in_flight)
        assert rest[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert rest[-1].usage.completion_tokens == 400
    assert proc.wait(timeout=30) == 0


@pytest.mark.slow
def test_builtin_model_with_the_cli_client(unused_tcp_port):
    proc = start_verifier("smollm2", unused_tcp_port)
    try:
        done = subprocess.run(
            SMARTSPEC
            + [
                "generate",
                "What is the capital of France?",
                "--chat",
                "--max-new-tokens",
                "24",
                "--target",
                f"127.0.0.1:{unused_tcp_port}",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert "Paris" in done.stdout
        assert "tokens, finish=" in done.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_sigterm_of_one_replica_costs_a_round_robin_client_no_request(tiny_llama_dir, unused_tcp_port):
    """Two verifier processes behind one client channel (round robin over both addresses, as over
    a headless Service). SIGTERM one under load: its streams in flight finish, GOAWAY sends the
    client's new calls to the other replica, no call fails, and the drained process exits 0."""
    ports = [unused_tcp_port, unused_tcp_port + 1]
    procs = [start_verifier(tiny_llama_dir, port, "--grace-seconds", "20") for port in ports]
    try:
        target = "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in ports)
        results, errors = [], []
        with grpc.insecure_channel(target, options=CLIENT_OPTIONS) as channel:
            stub = pb_grpc.GenerationStub(channel)

            def call(i: int) -> None:
                request = pb.GenerateRequest(prompt_text=f"Request {i}:", max_new_tokens=48, ignore_eos=True)
                try:
                    results.append(list(stub.Generate(request, timeout=60))[-1])
                except grpc.RpcError as exc:
                    errors.append(exc.code())

            with ThreadPoolExecutor(4) as pool:
                futures = [pool.submit(call, i) for i in range(8)]
                time.sleep(0.5)
                procs[0].send_signal(signal.SIGTERM)
                futures += [pool.submit(call, i) for i in range(8, 24)]
                for future in futures:
                    future.result()
        assert errors == []
        assert len(results) == 24 and all(r.usage.completion_tokens == 48 for r in results)
        assert procs[0].wait(timeout=30) == 0 and procs[1].poll() is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
