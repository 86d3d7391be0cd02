"""Starts a proposer: smartspec.v1.Proposer (n-gram prompt lookup or a draft model), health and reflection."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field

from controller.policy import MAX_K
from drafting.config import DraftConfig
from proposer_svc.servicer import ProposerServicer
from protocol import serving
from protocol.security import token_auth
from protocol.serving import ServerConfig
from protocol.v1 import proposer_pb2, proposer_pb2_grpc
from runtime.models import Placement

log = logging.getLogger(__name__)
SERVICE_NAME = proposer_pb2.DESCRIPTOR.services_by_name["Proposer"].full_name


@dataclass(frozen=True)
class ProposerConfig:
    drafting: DraftConfig = DraftConfig()
    placement: Placement = Placement()
    server: ServerConfig = ServerConfig(port=50061)
    max_k: int = field(default=MAX_K, metadata={"help": "the most draft tokens one request may ask for"})
    max_requests: int = field(
        default=4096, metadata={"help": "request states kept; the least recently used are evicted"}
    )
    verifier_tokens_file: str | None = field(
        default=None, metadata={"help": "tokens (one per line) a verifier must present to draft here (unset: open)"}
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
        self.servicer = ProposerServicer(backend, config.max_k, config.max_requests)
        self.port = 0

    async def start(self) -> None:
        self.serving = await serving.start_server(
            proposer_pb2_grpc.add_ProposerServicer_to_server,
            self.servicer,
            SERVICE_NAME,
            self.config.server,
            token_auth({SERVICE_NAME: ("verifier",)}, verifier=self.config.verifier_tokens_file),
        )
        self.health, self.port = self.serving.health, self.serving.port

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.serving.stop(grace)


async def serve(config: ProposerConfig) -> None:
    server = ProposerServer(config)
    await server.start()
    print(f"smartspec proposer ready on {config.server.host}:{server.port}", flush=True)
    await serving.until_signalled()
    await server.stop()


def main(args: argparse.Namespace) -> int:
    asyncio.run(serve(ProposerConfig.from_args(args)))
    return 0
