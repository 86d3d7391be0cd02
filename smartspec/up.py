"""`smartspec up`: the whole local stack as separate processes — proposer replicas, the controller
and a verifier — each started again when it dies."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controller_svc.server import ControllerConfig
from drafting.builtin import BUILTIN_DRAFT
from drafting.config import DraftConfig
from engine.config import CacheConfig
from proposer_svc.server import ProposerConfig
from protocol import serving
from protocol.security import ClientTLS, ServerTLS
from protocol.serving import ENV_PREFIX, NOT_FLAGS, ServerConfig
from runtime import models
from runtime.models import Placement
from smartspec.certs import local_ca
from smartspec.supervise import Supervisor
from verifier_svc.http import model_name
from verifier_svc.server import SpeculationConfig, VerifierConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=models.DEFAULT_MODEL, help="target model for the verifier")
    # The verifier's and the draft models' placement, and the verifier's cache: the services' own settings.
    serving.add_arguments(parser, Placement, skip=("threads",))
    serving.add_arguments(parser, CacheConfig, defaults=CacheConfig(kv_cache_tokens=16384))
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--draft", default=None, help=f"draft model for the proposers (default: {BUILTIN_DRAFT})")
    kind.add_argument("--ngram", action="store_true", help="proposers draft by n-gram prompt lookup")
    parser.add_argument("--replicas", type=int, default=1, help="proposer processes")
    parser.add_argument("--port", type=int, default=50051, help="verifier gRPC port")
    parser.add_argument(
        "--http-port", type=int, default=8000, help="the verifier's OpenAI-compatible HTTP API (0 = off)"
    )
    parser.add_argument("--proposer-port", type=int, default=50061, help="first proposer port")
    parser.add_argument("--controller-port", type=int, default=50071, help="controller gRPC port")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="verifier metrics port; the controller's is the next one, then one per proposer (0 = off)",
    )
    parser.add_argument(
        "--policy",
        default="smartspec",
        help="off | fixed:K | smartspec[:KMAX] | smartspec-uniform[:KMAX]; `smartspec ctl set` changes it at run time",
    )
    parser.add_argument(
        "--proposer-threads",
        type=int,
        default=1,
        help="torch threads per proposer (0 = all cores). The processes share this machine's cores: "
        "a draft model on all of them slows every verify step it overlaps (measured: "
        "BENCHMARKS.md, 'Threads of a colocated proposer')",
    )
    parser.add_argument(
        "--draft-min-confidence",
        type=float,
        default=0.0,
        help="passed to draft proposers as --min-confidence (`smartspec proposer --help`)",
    )
    parser.add_argument(
        "--cost-profile",
        default="calibrate",
        help="the verifier's --cost-profile: 'calibrate' (time forward passes at start), a profile, or 'none'",
    )
    parser.add_argument("--step-log", default=None, help="the verifier's --step-log: every engine step as a JSON line")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="mTLS on every hop, with a throwaway CA and certificates written to --tls-dir",
    )
    parser.add_argument(
        "--tls-dir", default=None, help="where --tls writes its CA and certificates (default: a temp dir)"
    )
    parser.add_argument("--startup-timeout", type=float, default=300.0)


def commands(args: argparse.Namespace, certs: dict | None = None) -> list[tuple[list[str], int]]:
    """(command, gRPC port) per process to start: proposers first, the controller, then the
    verifier that drafts from them. `certs` (`smartspec.certs.local_ca`): mTLS on every hop."""
    tls, client = ServerTLS(), ClientTLS()
    if certs is not None:
        ca = str(certs["ca"])
        cert, key = (str(p) for p in certs["smartspec"])
        tls, client = ServerTLS(cert, key, ca), ClientTLS(ca, cert, key)
    if args.ngram and args.draft_min_confidence:
        raise ValueError("--draft-min-confidence needs a draft model, not --ngram")
    base = [sys.executable, "-m", "smartspec.cli"]
    placement = serving.from_args(Placement, args, skip=("threads",))
    drafting = DraftConfig(
        draft=None if args.ngram else args.draft or BUILTIN_DRAFT, min_confidence=args.draft_min_confidence
    )
    ports = [args.proposer_port + i for i in range(args.replicas)]
    proposers = ",".join(f"127.0.0.1:{p}" for p in ports)
    procs = []
    for i, port in enumerate(ports):
        # /metrics: the verifier's port, the controller's next, then one per proposer.
        server = ServerConfig(port=port, metrics_port=args.metrics_port + 2 + i if args.metrics_port else 0, tls=tls)
        config = ProposerConfig(drafting, replace(placement, threads=args.proposer_threads), server)
        procs.append((base + ["proposer", *(["--ngram"] if args.ngram else []), *serving.to_argv(config)], port))
    metrics = ServerConfig(
        port=args.controller_port, metrics_port=args.metrics_port + 1 if args.metrics_port else 0, tls=tls
    )
    controller = ControllerConfig(metrics, policy=args.policy, proposers=proposers)
    procs.append((base + ["controller", *serving.to_argv(controller)], args.controller_port))
    verifier = VerifierConfig(
        model=args.model,
        placement=placement,
        cache=serving.from_args(CacheConfig, args),
        speculation=SpeculationConfig(
            policy=args.policy,
            proposer=proposers,
            controller=f"127.0.0.1:{args.controller_port}",
            cost_profile=args.cost_profile,
        ),
        server=ServerConfig(port=args.port, metrics_port=args.metrics_port, tls=tls),
        http_port=args.http_port,
        step_log=args.step_log,
        client=client,
    )
    procs.append((base + ["verifier", *serving.to_argv(verifier)], args.port))
    return procs


def wait_serving(port: int, proc: subprocess.Popen, timeout: float, tls: ClientTLS = ClientTLS()) -> None:
    deadline, channel = time.monotonic() + timeout, None
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"process on port {port} exited with {proc.returncode}")
            try:
                # No channel before the port listens: gRPC backs off a refused channel's reconnects, by tens
                # of seconds over a slow start, and would see the process serve that much later.
                if channel is None:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    channel = tls.channel(f"127.0.0.1:{port}")
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except (OSError, grpc.RpcError):
                pass
            time.sleep(0.2)
    finally:
        if channel is not None:
            channel.close()
    raise TimeoutError(f"nothing serving on port {port} after {timeout:.0f} s")


def child_environment(environ) -> dict[str, str]:
    """Each process gets its settings from its command line only: a SMARTSPEC_<FLAG> variable in
    this shell would reach every service, and one service's flag is another's unknown name."""
    return {k: v for k, v in environ.items() if not k.startswith(ENV_PREFIX) or k in NOT_FLAGS}


def run(args: argparse.Namespace) -> int:
    certs, client = None, ClientTLS()
    if args.tls:
        directory = Path(args.tls_dir or tempfile.mkdtemp(prefix="smartspec-tls-"))
        certs = {"ca": directory / "ca.pem", **local_ca(directory, ["smartspec", "client"])}
        cert, key = certs["client"]
        client = ClientTLS(str(certs["ca"]), str(cert), str(key))

    lines = [
        f"smartspec stack up: verifier on 127.0.0.1:{args.port}, controller on 127.0.0.1:{args.controller_port} "
        f"({args.replicas} proposer{'s' if args.replicas > 1 else ''}); Ctrl-C stops it"
    ]
    if args.http_port:
        scheme = "https" if certs is not None else "http"
        lines.append(
            f"OpenAI-compatible API: {scheme}://127.0.0.1:{args.http_port}/v1 (model {model_name(args.model)})"
        )
    if certs is not None:
        lines.append(
            f"mTLS on every hop; clients connect with --tls-ca {client.tls_ca} "
            f"--tls-client-cert {client.tls_client_cert} --tls-client-key {client.tls_client_key}"
        )
    supervisor = Supervisor(
        commands(args, certs),
        partial(wait_serving, tls=client),
        args.startup_timeout,
        env=child_environment(os.environ),
    )
    return supervisor.serve(lambda: print(*lines, sep="\n", flush=True))
