"""Starts a proposer: smartspec.v1.Proposer (n-gram prompt lookup), health and reflection."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass, fields

import grpc

from proposer_svc.servicer import NgramProposerServicer
from smartspec.serving import add_health_and_reflection, set_serving
from smartspec.v1 import proposer_pb2, proposer_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = proposer_pb2.DESCRIPTOR.services_by_name["Proposer"].full_name


@dataclass
class ProposerConfig:
    host: str = "127.0.0.1"
    port: int = 50061
    ngram_min: int = 1
    ngram_max: int = 4
    max_k: int = 8
    max_requests: int = 4096  # kept request states; the least recently used are evicted

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--ngram", action="store_true", required=True,
                            help="draft by n-gram prompt lookup")
        for f in fields(ProposerConfig):
            parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)

    @staticmethod
    def from_args(args: argparse.Namespace) -> "ProposerConfig":
        return ProposerConfig(**{f.name: getattr(args, f.name) for f in fields(ProposerConfig)})


class ProposerServer:
    def __init__(self, config: ProposerConfig):
        self.config = config
        self.servicer = NgramProposerServicer(config.ngram_min, config.ngram_max, config.max_k, config.max_requests)
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = grpc.aio.server()
        proposer_pb2_grpc.add_ProposerServicer_to_server(self.servicer, self.server)
        self.health = add_health_and_reflection(self.server, [SERVICE_NAME])
        self.port = self.server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self.server.start()
        await set_serving(self.health, [SERVICE_NAME])

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def serve(config: ProposerConfig) -> None:
    server = ProposerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"smartspec proposer ready on {config.host}:{server.port}", flush=True)
    await stop.wait()
    await server.stop()


def main(args: argparse.Namespace) -> int:
    asyncio.run(serve(ProposerConfig.from_args(args)))
    return 0
