"""What every SmartSpec gRPC server has: grpc.health.v1 and server reflection."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def add_health_and_reflection(server: grpc.aio.Server, service_names: list[str]) -> HealthServicer:
    """Registers both; call `set_serving` once the server is started."""
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
    return health


async def set_serving(health: HealthServicer, service_names: list[str]) -> None:
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)


async def until_signalled() -> None:
    """Returns on SIGTERM or SIGINT (what Kubernetes and Ctrl-C send)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def start_server(add_servicer, servicer, service_name: str, host: str, port: int):
    """A started grpc.aio server with the servicer, health (SERVING) and reflection;
    returns (server, health, bound port)."""
    server = grpc.aio.server()
    add_servicer(servicer, server)
    health = add_health_and_reflection(server, [service_name])
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    await set_serving(health, [service_name])
    return server, health, bound


def add_config_arguments(parser: argparse.ArgumentParser, config_type, help_: dict[str, str],
                         skip: tuple[str, ...] = ()) -> None:
    """One --flag per field of a service's config dataclass, typed by its default (a bool is a
    switch: --name / --no-name)."""
    for f in dataclasses.fields(config_type):
        if f.name in skip:
            continue
        flag, text = "--" + f.name.replace("_", "-"), help_.get(f.name, "")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=text)


def config_from_args(config_type, args: argparse.Namespace):
    return config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)})
