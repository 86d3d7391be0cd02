"""Starts a proposer: smartspec.v1.Proposer (n-gram prompt lookup or a draft model), health and reflection."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field

from prometheus_client import start_http_server

from controller.policy import MAX_K
from drafting.config import DraftConfig
from proposer_svc.metrics import ProposerMetrics
from proposer_svc.servicer import ProposerServicer
from protocol import serving
from protocol.auth import guard
from protocol.serving import ServerConfig
from protocol.v1 import proposer_pb2, proposer_pb2_grpc
from runtime.models import Placement

log = logging.getLogger(__name__)
SERVICE_NAME = proposer_pb2.DESCRIPTOR.services_by_name["Proposer"].full_name


@dataclass(frozen=True)
class ProposerConfig:
    drafting: DraftConfig = DraftConfig()
    placement: Placement = Placement()
    server: ServerConfig = ServerConfig(port=50061, metrics_port=9402)
    max_k: int = field(default=MAX_K, metadata={"help": "the most draft tokens one request may ask for"})
    max_requests: int = field(
        default=4096, metadata={"help": "request states kept; the least recently used are evicted"}
    )
    state_idle_s: float = field(
        default=600.0, metadata={"help": "a request state unused this long is dropped (its verifier forgot it)"}
    )
    grace_seconds: float = field(
        default=10.0,
        metadata={"help": "on SIGTERM, how long verifiers' streams may stay (they move on when they re-resolve)"},
    )
    verifier_tokens_file: str | None = field(
        default=None, metadata={"help": "tokens (one per line) a verifier must present to draft here (unset: open)"}
    )
    verifier_identities_file: str | None = field(
        default=None,
        metadata={"help": "client-certificate identities (SAN or CN, one per line) that may draft here (mTLS)"},
    )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        kind = parser.add_mutually_exclusive_group(required=True)
        kind.add_argument("--ngram", action="store_true", help="draft by n-gram prompt lookup")
        kind.add_argument("--draft", help=DraftConfig.__dataclass_fields__["draft"].metadata["help"])
        serving.add_arguments(parser, ProposerConfig, skip=("draft",))

    @staticmethod
    def from_args(args: argparse.Namespace) -> ProposerConfig:
        return serving.from_options(
            ProposerConfig, serving.from_args(ProposerConfig, args, skip=("draft",)), draft=args.draft
        )


class ProposerServer:
    def __init__(self, config: ProposerConfig, backend=None):
        self.config = config
        backend = backend if backend is not None else config.drafting.make_backend(config.placement)
        if not config.state_idle_s > 0:
            raise ValueError(f"state_idle_s: must be > 0, got {config.state_idle_s}")
        self.servicer = ProposerServicer(backend, config.max_k, config.max_requests, config.state_idle_s)
        self.metrics = ProposerMetrics(self.servicer)
        self.servicer.on_exchange = self.metrics.exchange.observe
        self.port = 0

    async def start(self) -> None:
        config = self.config.server
        self.serving = await serving.start_server(
            proposer_pb2_grpc.add_ProposerServicer_to_server,
            self.servicer,
            SERVICE_NAME,
            config,
            guard(
                {SERVICE_NAME: ("verifier",)},
                tokens={"verifier": self.config.verifier_tokens_file},
                identities={"verifier": self.config.verifier_identities_file},
                client_ca=config.tls.tls_client_ca,
            ),
        )
        self.health, self.port = self.serving.health, self.serving.port
        self.metrics_server = None
        if config.metrics_port:
            self.metrics_server, _ = start_http_server(
                config.metrics_port, addr=config.host, registry=self.metrics.registry
            )
        # Idle states expire on traffic too; this sweep frees them when no verifier calls at all.
        self._sweeper = asyncio.get_running_loop().create_task(self._expire_idle())

    async def _expire_idle(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, self.config.state_idle_s / 2))
            self.servicer.store.expire()

    async def stop(self, grace: float | None = None) -> None:
        """Readiness fails and GOAWAY goes out; open streams get the grace period."""
        await self.serving.not_ready(SERVICE_NAME)
        await self.serving.stop(self.config.grace_seconds if grace is None else grace)
        self._sweeper.cancel()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()


async def serve(config: ProposerConfig) -> None:
    server = ProposerServer(config)
    await server.start()
    print(f"smartspec proposer ready on {config.server.host}:{server.port}", flush=True)
    await serving.until_signalled()
    log.info("signal received: draining")
    await server.stop()


def main(args: argparse.Namespace) -> int:
    asyncio.run(serve(ProposerConfig.from_args(args)))
    return 0
