"""`smartspec up`: the whole local stack as separate processes — proposer replicas, the controller
and a verifier — each started again when it dies."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
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
from protocol.serving import ServerConfig
from runtime import models
from runtime.models import Placement
from smartspec.certs import local_ca
from verifier_svc.server import SpeculationConfig, VerifierConfig

RESTART_BACKOFF_S = 0.5  # the first wait before a dead process is started again; doubles per death
MAX_BACKOFF_S = 10.0
STABLE_AFTER_S = 30.0  # a process up this long starts its next back-off afresh
START_FAILURES = 5  # deaths before serving, in a row, after which the stack goes down


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
    parser.add_argument("--proposer-port", type=int, default=50061, help="first proposer port")
    parser.add_argument("--controller-port", type=int, default=50071, help="controller gRPC port")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9400,
        help="verifier metrics port; the controller's is the next one (0 = off)",
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
    for port in ports:
        config = ProposerConfig(
            drafting, replace(placement, threads=args.proposer_threads), ServerConfig(port=port, tls=tls)
        )
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
            policy=args.policy, proposer=proposers, controller=f"127.0.0.1:{args.controller_port}"
        ),
        server=ServerConfig(port=args.port, metrics_port=args.metrics_port, tls=tls),
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


class Child:
    """One process of the stack: command, port, the process running it (None during a back-off), restarts."""

    def __init__(self, cmd: list[str], port: int, backoff: float):
        self.cmd, self.port, self.backoff = cmd, port, backoff
        self.name = f"{cmd[3] if len(cmd) > 3 else cmd[0]} on port {port}"
        self.proc: subprocess.Popen | None = None
        self.ready_at: float | None = None  # when this process first served
        self.error: Exception | None = None  # why this process never served
        self.restart_at, self.restarts, self.failures = 0.0, 0, 0  # failures: deaths before serving, in a row


def exit_reason(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with {code}"


def log(message: str) -> None:
    print(f"smartspec up: {message}", file=sys.stderr, flush=True)


class Supervisor:
    """Starts the processes in order, each once the one before it serves, then keeps them running: one
    that dies is started again with the same command after a back-off that doubles up to `max_backoff`
    and starts afresh once it has stayed up `stable_after` s. The stack goes down on `stop()`, when a
    process fails during the first start, or when one dies before serving `start_failures` times in a row.

    `ready(port, proc, timeout)` returns once `proc` serves on `port` and raises if it never does
    (`wait_serving`); it runs on a thread of its own so that one slow start holds up nothing else."""

    def __init__(
        self,
        procs: list[tuple[list[str], int]],
        ready: Callable[[int, subprocess.Popen, float], None],
        startup_timeout: float = 300.0,
        backoff: float = RESTART_BACKOFF_S,
        max_backoff: float = MAX_BACKOFF_S,
        stable_after: float = STABLE_AFTER_S,
        start_failures: int = START_FAILURES,
        stop_timeout: float = 60.0,
        poll: float = 0.2,
    ):
        self.children = [Child(cmd, port, backoff) for cmd, port in procs]
        self.ready, self.startup_timeout, self.poll = ready, startup_timeout, poll
        self.initial_backoff, self.max_backoff, self.stable_after = backoff, max_backoff, stable_after
        self.start_failures, self.stop_timeout = start_failures, stop_timeout
        self.stopping = False

    def stop(self, *_) -> None:
        self.stopping = True

    def serve(self, on_up: Callable[[], None] = lambda: None) -> int:
        """`run`, stopped by SIGTERM or SIGINT (Ctrl-C) instead of dying of them."""
        previous = {sig: signal.signal(sig, self.stop) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            return self.run(on_up)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def run(self, on_up: Callable[[], None] = lambda: None) -> int:
        """0 once stopped and every process has exited cleanly; 1 when the stack went down by itself."""
        try:
            for i, child in enumerate(self.children):
                self._spawn(child)
                while not self.stopping and child.ready_at is None:
                    for started in self.children[: i + 1]:
                        if started.proc.poll() is not None or started.error is not None:
                            reason = started.error or exit_reason(started.proc.returncode)
                            log(f"{started.name} failed to start: {reason}")
                            return 1
                    time.sleep(self.poll)
            if not self.stopping:
                on_up()
            while not self.stopping:
                if not all(self._check(child) for child in self.children):
                    return 1
                time.sleep(self.poll)
        finally:
            clean = self.shutdown()
        return 0 if clean else 1

    def _spawn(self, child: Child) -> None:
        proc = subprocess.Popen(child.cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        child.proc, child.ready_at, child.error = proc, None, None

        def probe() -> None:
            try:
                self.ready(child.port, proc, self.startup_timeout)
            except Exception as e:  # noqa: BLE001 - any failure to serve counts as a failed start
                if child.proc is proc:
                    child.error = e
            else:
                if child.proc is proc:
                    child.ready_at = time.monotonic()

        threading.Thread(target=probe, daemon=True, name=f"ready {child.name}").start()

    def _check(self, child: Child) -> bool:
        """Restarts `child` if it is due; False when it has failed to start too often."""
        now = time.monotonic()
        if self.stopping:  # Ctrl-C reaches the children too: their exits are no failures
            return True
        if child.proc is None:
            if now >= child.restart_at:
                self._spawn(child)
                child.restarts += 1
                log(f"{child.name} started again as pid {child.proc.pid} (restart {child.restarts})")
            return True
        if child.proc.poll() is None:
            if child.error is None:
                return True
            log(f"{child.name} did not serve: {child.error}; killing it")
            child.proc.kill()
            child.proc.wait()
        served = child.ready_at is not None
        child.failures = 0 if served else child.failures + 1
        reason = f"{child.name} (pid {child.proc.pid}) {exit_reason(child.proc.returncode)}"
        reason += "" if served else f" before serving ({child.failures} in a row)"
        if child.failures >= self.start_failures:
            log(f"{reason}; giving up, the stack goes down")
            return False
        if served and now - child.ready_at >= self.stable_after:
            child.backoff = self.initial_backoff
        delay, child.backoff = child.backoff, min(2 * child.backoff, self.max_backoff)
        child.proc, child.restart_at = None, now + delay
        log(f"{reason}; restarting it in {delay:g} s")
        return True

    def shutdown(self) -> bool:
        """Stops the processes last first, the verifier draining while its proposers serve; True if all ended well."""
        clean = True
        for p in [child.proc for child in reversed(self.children) if child.proc is not None]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            clean = clean and p.returncode in (0, -signal.SIGTERM)
        return clean


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
    if certs is not None:
        lines.append(
            f"mTLS on every hop; clients connect with --tls-ca {client.tls_ca} "
            f"--tls-client-cert {client.tls_client_cert} --tls-client-key {client.tls_client_key}"
        )
    supervisor = Supervisor(commands(args, certs), partial(wait_serving, tls=client), args.startup_timeout)
    return supervisor.serve(lambda: print(*lines, sep="\n", flush=True))
