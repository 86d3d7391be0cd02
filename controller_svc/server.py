"""Starts the controller: smartspec.v1.Controller, health, reflection, metrics, periodic pushes."""

from __future__ import annotations

import argparse
import asyncio
import logging
from dataclasses import dataclass

from controller.policy import Policy
from controller.state import ControllerState
from controller_svc.servicer import ControllerMetrics, ControllerServicer
from smartspec.serving import add_config_arguments, config_from_args, start_server, until_signalled
from smartspec.v1 import controller_pb2, controller_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = controller_pb2.DESCRIPTOR.services_by_name["Controller"].full_name


@dataclass
class ControllerConfig:
    host: str = "127.0.0.1"
    port: int = 50071
    metrics_port: int = 9401  # 0 disables the metrics endpoint
    policy: str = "smartspec"
    proposers: str = ""  # host:port,... passed through to verifiers
    push_interval_s: float = 1.0

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        help_ = {
            "policy": "initial policy: off | fixed:K | smartspec[:KMAX] | smartspec-uniform[:KMAX]",
            "proposers": "proposer endpoints (host:port,...) pushed to every verifier; empty: verifiers keep theirs",
            "push_interval_s": "how often the refitted cost model is pushed",
            "metrics_port": "Prometheus /metrics port (0 = off)",
        }
        add_config_arguments(parser, ControllerConfig, help_)

    @staticmethod
    def from_args(args: argparse.Namespace) -> "ControllerConfig":
        return config_from_args(ControllerConfig, args)


class Controller:
    def __init__(self, config: ControllerConfig):
        self.config = config
        self.state = ControllerState(Policy.parse(config.policy))
        self.metrics = ControllerMetrics()
        endpoints = [a.strip() for a in config.proposers.split(",") if a.strip()]
        self.servicer = ControllerServicer(self.state, self.metrics, endpoints)
        self.port = 0

    async def start(self) -> None:
        self.server, self.health, self.port = await start_server(
            controller_pb2_grpc.add_ControllerServicer_to_server, self.servicer, SERVICE_NAME,
            self.config.host, self.config.port)
        if self.config.metrics_port:
            from prometheus_client import start_http_server

            self.metrics_server, _ = start_http_server(self.config.metrics_port, addr=self.config.host,
                                                       registry=self.metrics.registry)
        self._pusher = asyncio.ensure_future(self._push_periodically())
        log.info("controller serving on %s:%d with policy %s", self.config.host, self.port, self.state.policy)

    async def _push_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.config.push_interval_s)
            if self.state.refresh():
                self.servicer.broadcast_policy()

    async def stop(self) -> None:
        self._pusher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace=1.0)
        if self.config.metrics_port:
            self.metrics_server.shutdown()


async def serve(config: ControllerConfig) -> None:
    controller = Controller(config)
    await controller.start()
    print(f"smartspec controller ready on {config.host}:{controller.port}", flush=True)
    await until_signalled()
    await controller.stop()


def main(args: argparse.Namespace) -> int:
    asyncio.run(serve(ControllerConfig.from_args(args)))
    return 0
