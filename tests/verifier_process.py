"""`smartspec verifier` started as a real process and awaited until its health says SERVING."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SMARTSPEC = [sys.executable, "-m", "smartspec.cli"]


def start_verifier(model: str, port: int, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        SMARTSPEC
        + [
            "verifier",
            "--model",
            model,
            "--port",
            str(port),
            "--metrics-port",
            "0",
            "--kv-cache-tokens",
            "8192",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if (
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return proc
            except grpc.RpcError:
                time.sleep(0.2)
    proc.kill()
    raise AssertionError("verifier did not become ready")
