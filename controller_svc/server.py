"""Starts the controller: smartspec.v1.Controller, health, reflection, metrics, periodic pushes."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass, field

from controller.demand import ProposerDemand
from controller.policy import Policy
from controller.state import ControllerState
from controller_svc.servicer import ControllerMetrics, ControllerServicer
from protocol import serving
from protocol.auth import guard
from protocol.serving import ServerConfig
from protocol.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["Controller"].full_name


@dataclass(frozen=True)
class ControllerConfig:
    server: ServerConfig = ServerConfig(port=50071, metrics_port=9401)
    policy: str = field(
        default="smartspec",
        metadata={"help": "initial policy: off | fixed:K | smartspec[:KMAX] | smartspec-uniform[:KMAX]"},
    )
    proposers: str | None = field(
        default=None,
        metadata={"help": "proposer endpoints (host:port,...) pushed to every verifier; unset: verifiers keep theirs"},
    )
    push_interval_s: float = field(default=1.0, metadata={"help": "how often the refitted cost model is pushed"})
    verifier_idle_s: float = field(
        default=300.0, metadata={"help": "a verifier silent this long is forgotten (its goodput and metric labels)"}
    )
    proposer_window_s: float = field(
        default=30.0,
        metadata={"help": "the sliding window of steps the proposer demand and capacity are measured over, in s"},
    )
    proposer_target_utilization: float = field(
        default=0.7,
        metadata={"help": "busy fraction of each proposer replica that smartspec_proposer_replicas_wanted aims at"},
    )
    min_proposers: int = field(
        default=1, metadata={"help": "smartspec_proposer_replicas_wanted never asks for fewer (with no demand: this)"}
    )
    grace_seconds: float = field(
        default=10.0, metadata={"help": "on SIGTERM, how long verifiers' streams may stay before they are cut"}
    )
    admin_tokens_file: str | None = field(
        default=None,
        metadata={"help": "tokens (one per line) that may set and read the policy (unset: SetPolicy is open)"},
    )
    verifier_tokens_file: str | None = field(
        default=None, metadata={"help": "tokens (one per line) a verifier must present to Connect (unset: open)"}
    )
    admin_identities_file: str | None = field(
        default=None,
        metadata={"help": "client-certificate identities (SAN or CN, one per line) that hold the admin role (mTLS)"},
    )
    verifier_identities_file: str | None = field(
        default=None,
        metadata={"help": "client-certificate identities (SAN or CN, one per line) that may Connect as verifiers"},
    )

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        serving.add_arguments(parser, ControllerConfig)

    @staticmethod
    def from_args(args: argparse.Namespace) -> ControllerConfig:
        return serving.from_args(ControllerConfig, args)


class Controller:
    def __init__(self, config: ControllerConfig):
        self.config = config
        self.state = ControllerState(Policy.parse(config.policy))
        demand = ProposerDemand(config.proposer_window_s, config.proposer_target_utilization, config.min_proposers)
        self.metrics = ControllerMetrics(demand=demand)
        endpoints = [a.strip() for a in (config.proposers or "").split(",") if a.strip()]
        self.servicer = ControllerServicer(self.state, self.metrics, endpoints)
        self.port = 0

    async def start(self) -> None:
        server = self.config.server
        auth = guard(
            {
                f"/{SERVICE_NAME}/SetPolicy": ("admin",),
                f"/{SERVICE_NAME}/GetPolicy": ("admin", "verifier"),
                f"/{SERVICE_NAME}/Connect": ("verifier",),
            },
            tokens={"admin": self.config.admin_tokens_file, "verifier": self.config.verifier_tokens_file},
            identities={"admin": self.config.admin_identities_file, "verifier": self.config.verifier_identities_file},
            client_ca=server.tls.tls_client_ca,
        )
        self.serving = await serving.start_server(
            controller_pb2_grpc.add_ControllerServicer_to_server, self.servicer, SERVICE_NAME, server, auth
        )
        self.health, self.port = self.serving.health, self.serving.port
        if server.metrics_port:
            from prometheus_client import start_http_server

            self.metrics_server, _ = start_http_server(
                server.metrics_port, addr=server.host, registry=self.metrics.registry
            )
        self._pusher = asyncio.ensure_future(self._push_periodically())
        log.info("controller serving on %s:%d with policy %s", server.host, self.port, self.state.policy)

    async def _push_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.push_interval_s)
            try:
                if self.state.refresh():
                    self.servicer.broadcast_policy()
                self.servicer.forget_idle(self.config.verifier_idle_s)
            except Exception:  # a bad refit skips one push; it must not end the pushes for good
                log.exception("refitting or pushing the policy failed; trying again next interval")

    async def stop(self, grace: float | None = None) -> None:
        """Readiness fails and GOAWAY goes out; verifiers' streams get the grace period."""
        self._pusher.cancel()
        await self.serving.not_ready(SERVICE_NAME)
        await self.serving.stop(self.config.grace_seconds if grace is None else grace)
        if self.config.server.metrics_port:
            self.metrics_server.shutdown()


async def serve(config: ControllerConfig) -> None:
    controller = Controller(config)
    await controller.start()
    print(f"smartspec controller ready on {config.server.host}:{controller.port}", flush=True)
    await serving.until_signalled()
    log.info("signal received: draining")
    await controller.stop()


def main(args: argparse.Namespace) -> int:
    asyncio.run(serve(ControllerConfig.from_args(args)))
    return 0
