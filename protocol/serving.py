"""What every SmartSpec server has: grpc.health.v1, server reflection, a listening address
(plaintext or TLS, `protocol.security`), and command-line flags generated from its config
dataclasses.

A config is a dataclass whose fields are settings or nested dataclasses (one per
concern: model placement, cache, scheduler, speculation, server). Each nested
dataclass becomes an argparse group; flags are named after the leaf fields, so
leaf names are unique within one config. Unset optional values are None.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import typing
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from protocol.auth import Auth
from protocol.malformed import RefuseMalformed
from protocol.security import ServerTLS

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


async def until_signalled(failure: asyncio.Event | None = None) -> bool:
    """Returns on SIGTERM or SIGINT (what Kubernetes and Ctrl-C send): False; or when `failure`
    is set first: True."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waits = [asyncio.ensure_future(stop.wait())]
    if failure is not None:
        waits.append(asyncio.ensure_future(failure.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for w in waits:
        w.cancel()
    return failure is not None and failure.is_set() and not stop.is_set()


@dataclass(frozen=True)
class ServerConfig:
    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=50051, metadata={"help": "gRPC port"})
    metrics_port: int = field(default=0, metadata={"help": "Prometheus /metrics port (0 = off)"})
    health_port: int = field(
        default=0,
        metadata={
            "help": "a plaintext port serving grpc.health.v1 only (0 = off): for kubelet gRPC probes, "
            "which cannot speak TLS, when the main port does"
        },
    )
    max_message_bytes: int = field(
        default=4 << 20, metadata={"help": "largest message received or sent (larger: RESOURCE_EXHAUSTED)"}
    )
    max_concurrent_streams: int = field(
        default=1024, metadata={"help": "calls in flight on one client connection (more wait for a slot)"}
    )
    keepalive_s: float = field(
        default=30.0, metadata={"help": "ping an idle connection this often; a peer silent for 20 s more is dropped"}
    )
    max_connection_age_s: float = field(
        default=0.0,
        metadata={
            "help": "send GOAWAY to a connection this old (0 = never), so clients re-resolve and spread over "
            "new replicas; its calls in flight keep --max-connection-age-grace-s"
        },
    )
    max_connection_age_grace_s: float = field(
        default=600.0, metadata={"help": "how long calls on a connection past its age may still run"}
    )
    tls: ServerTLS = ServerTLS()

    def options(self) -> list[tuple[str, int]]:
        """gRPC core channel arguments. Pings from clients more often than every 10 s are strikes
        (two, and the connection goes): our clients ping every 30 s (`security.CLIENT_OPTIONS`)."""
        options = [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_concurrent_streams", self.max_concurrent_streams),
            ("grpc.keepalive_time_ms", int(self.keepalive_s * 1e3)),
            ("grpc.keepalive_timeout_ms", 20_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
            ("grpc.http2.max_ping_strikes", 2),
        ]
        if self.max_connection_age_s > 0:
            options += [
                ("grpc.max_connection_age_ms", int(self.max_connection_age_s * 1e3)),
                ("grpc.max_connection_age_grace_ms", int(self.max_connection_age_grace_s * 1e3)),
            ]
        return options


@dataclass
class Serving:
    """A started server; its health answers on the main port and on the probe port, if any."""

    server: grpc.aio.Server
    health: HealthServicer
    port: int
    probe_server: grpc.aio.Server | None = None
    probe_port: int = 0

    async def stop(self, grace: float | None) -> None:
        """Sends GOAWAY on the main port at once (new calls fail, clients move on) and gives calls
        in flight `grace` seconds; the probe port answers until they are done."""
        await self.server.stop(grace)
        if self.probe_server is not None:
            await self.probe_server.stop(0)

    async def not_ready(self, service_name: str) -> None:
        """Readiness probes (`service_name`) fail; liveness ("") still passes: the process is
        sound, only not taking work."""
        await self.health.set(service_name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def ready(self, service_name: str) -> None:
        await self.health.set(service_name, health_pb2.HealthCheckResponse.SERVING)

    async def dead(self) -> None:
        """Every probe fails: the process is about to exit for its supervisor to restart it."""
        await self.health.enter_graceful_shutdown()


async def start_server(
    add_servicer, servicer, service_name: str, config: ServerConfig, auth: Auth | None = None
) -> Serving:
    """A started grpc.aio server with the servicer, health (SERVING) and reflection, on TLS when
    the config has a certificate, with `auth` guarding its methods."""
    credentials = config.tls.credentials()  # ValueError before anything listens
    interceptors = [auth] if auth is not None else []
    server = grpc.aio.server(interceptors=[*interceptors, RefuseMalformed()], options=config.options())
    add_servicer(servicer, server)
    health = add_health_and_reflection(server, [service_name])
    address = f"{config.host}:{config.port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    await server.start()
    serving = Serving(server, health, bound)
    if config.health_port:
        serving.probe_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health, serving.probe_server)
        serving.probe_port = serving.probe_server.add_insecure_port(f"{config.host}:{config.health_port}")
        await serving.probe_server.start()
    await set_serving(health, [service_name])
    return serving


def _leaves(config_type, default) -> typing.Iterator[tuple[dataclasses.Field, type, object, tuple[str, ...]]]:
    """(field, type, default, path of nested field names) for each setting of a config."""
    hints = typing.get_type_hints(config_type)
    for f in dataclasses.fields(config_type):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            for leaf, kind, leaf_default, path in _leaves(type(value), value):
                yield leaf, kind, leaf_default, (f.name, *path)
        else:
            yield f, hints[f.name], value, ()


def _scalar(kind) -> type:
    """int for `int | None`, and so on: what argparse converts a flag's text with."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if args else kind


def add_arguments(parser: argparse.ArgumentParser, config_type, skip: tuple[str, ...] = (), defaults=None) -> None:
    """One --flag per setting, in one argparse group per nested dataclass, typed by the field's
    annotation (a bool is a switch: --name / --no-name); help from the field's metadata.
    `defaults`: a config instance whose values the flags default to (default: `config_type()`).
    Under a service subcommand each flag may also be set from the environment (`env_name`)."""
    groups: dict[tuple[str, ...], argparse._ArgumentGroup] = {}
    for f, kind, default, path in _leaves(config_type, defaults if defaults is not None else config_type()):
        if f.name in skip:
            continue
        target = parser
        if path:
            if path not in groups:
                groups[path] = parser.add_argument_group(" ".join(path))
            target = groups[path]
        flag, text = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        if kind is bool:
            target.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            target.add_argument(flag, type=_scalar(kind), default=default, help=text)


ENV_PREFIX = "SMARTSPEC_"
LOG_LEVEL_ENV = "SMARTSPEC_LOG_LEVEL"
# SMARTSPEC_* variables that no service subcommand has a flag for, yet are read: --log-level's
# (the command's own flag) and the cache of runtime/cpu_linear_select.py.
NOT_FLAGS = (LOG_LEVEL_ENV, "SMARTSPEC_CACHE_DIR")


def env_name(flag: str, prefix: str = ENV_PREFIX) -> str:
    """The environment variable that may set a flag (`smartspec.cli`): SMARTSPEC_MAX_NUM_SEQS for
    --max-num-seqs."""
    return prefix + flag.lstrip("-").replace("-", "_").upper()


def from_options(config_type, base=None, **options):
    """The config with the named settings replaced (leaf names, as on the command line);
    raises TypeError for a name the config does not have."""
    base = base if base is not None else config_type()
    known = {f.name for f, *_ in _leaves(config_type, base)}
    unknown = set(options) - known
    if unknown:
        raise TypeError(f"{config_type.__name__} has no setting {', '.join(sorted(unknown))}")
    return _replace(base, options)


def _replace(config, options: dict):
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            changes[f.name] = _replace(value, options)
        elif f.name in options:
            changes[f.name] = options[f.name]
    return dataclasses.replace(config, **changes)


def from_args(config_type, args: argparse.Namespace, skip: tuple[str, ...] = ()):
    names = [f.name for f, *_ in _leaves(config_type, config_type()) if f.name not in skip]
    return from_options(config_type, **{name: getattr(args, name) for name in names})


def to_argv(config) -> list[str]:
    """The flags that rebuild `config` from its defaults (for starting a service as a process)."""
    defaults = {f.name: value for f, _, value, _ in _leaves(type(config), type(config)())}
    argv = []
    for f, kind, value, _ in _leaves(type(config), config):
        if value == defaults[f.name]:
            continue
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv
