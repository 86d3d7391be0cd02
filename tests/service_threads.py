"""Real grpc.aio servers inside a test, each on its own asyncio loop in a background thread."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from proposer_svc.server import ProposerConfig, ProposerServer
from protocol.serving import ServerConfig, from_options
from protocol.v1 import generation_pb2_grpc
from verifier_svc.server import Verifier, VerifierConfig


class LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def submit(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class ProposerThread(LoopThread):
    def __init__(self, port: int = 0, backend=None):
        super().__init__()
        self.server = ProposerServer(ProposerConfig(server=ServerConfig(port=port)), backend)
        self.run(self.server.start())
        self.address = f"127.0.0.1:{self.server.port}"

    def kill(self):
        self.run(self.server.stop(0))
        self.stop()


class VerifierThread(LoopThread):
    def __init__(self, model, tokenizer, proposers: list[str], **overrides):
        super().__init__()
        settings = dict(
            model="unused",
            port=0,
            metrics_port=0,
            kv_cache_tokens=4096,
            proposer=",".join(proposers),
            proposer_deadline_ms=2000,
        )
        config = from_options(VerifierConfig, **{**settings, **overrides})
        self.verifier = Verifier(config, model, tokenizer)
        self.run(self.verifier.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.verifier.port}")
        self.stub = generation_pb2_grpc.GenerationStub(self.channel)

    def close(self):
        self.channel.close()
        if not self.verifier.draining:
            self.run(self.verifier.drain())
        self.stop()


def wait_for(condition, timeout: float = 20.0, every_s: float = 0.01) -> None:
    """Returns once `condition()` holds; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(every_s)
