"""Transport security and credentials for every SmartSpec hop.

- Servers: TLS from `--tls-cert/--tls-key`; with `--tls-client-ca` a client must present a
  certificate signed by that CA (mTLS). The files are re-read when they change, at the next
  handshake, so a rotated Kubernetes Secret takes effect without a restart.
- Clients: `--tls-ca` (the CA that signed the server) and optionally
  `--tls-client-cert/--tls-client-key`; without `--tls-ca` a client speaks plaintext.
- Bearer tokens, client side: `read_token` and `bearer`. What a server accepts, and from
  whom, is `protocol.auth`.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import grpc

log = logging.getLogger(__name__)


class WatchedFiles:
    """Files read together, again only once one of them has changed (size, mtime or inode:
    a Secret volume swaps a symlink, so the path's target changes)."""

    def __init__(self, *paths: str):
        self.paths = paths
        self._stamp: tuple | None = None

    def _current(self) -> tuple:
        stats = [os.stat(p) for p in self.paths]
        return tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats)

    def changed(self) -> bool:
        try:
            return self._current() != self._stamp
        except OSError:  # mid-swap: keep what was loaded
            return False

    def read(self) -> list[bytes]:
        stamp = self._current()
        contents = [Path(p).read_bytes() for p in self.paths]
        self._stamp = stamp
        return contents


@dataclass(frozen=True)
class ServerTLS:
    tls_cert: str | None = field(default=None, metadata={"help": "PEM certificate chain: serve TLS"})
    tls_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-cert"})
    tls_client_ca: str | None = field(
        default=None, metadata={"help": "PEM CA bundle: require client certificates signed by it (mTLS)"}
    )

    def check(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")

    def credentials(self) -> grpc.ServerCredentials | None:
        """Credentials that re-read the files whenever they change; None: plaintext."""
        self.check()
        if not self.tls_cert:
            return None
        paths = [self.tls_key, self.tls_cert] + ([self.tls_client_ca] if self.tls_client_ca else [])
        files = WatchedFiles(*paths)

        def configuration():
            key, cert, *ca = files.read()
            return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca[0] if ca else None)

        def fetch():
            if not files.changed():
                return None
            try:
                config = configuration()
            except (OSError, ValueError) as exc:
                log.warning("TLS files changed but cannot be read (%s); keeping the loaded ones", exc)
                return None
            log.info("TLS certificate files changed: new connections use the new ones")
            return config

        return grpc.dynamic_ssl_server_credentials(
            configuration(), fetch, require_client_authentication=bool(self.tls_client_ca)
        )

    def ssl_context(self) -> ssl.SSLContext | None:
        """The same files for an HTTP server: re-read at a handshake after they change (the new
        certificate serves the next connections); None: plaintext."""
        self.check()
        if not self.tls_cert:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        files = WatchedFiles(self.tls_cert, self.tls_key)

        def load() -> None:
            files.read()  # stamps the versions loaded now
            context.load_cert_chain(self.tls_cert, self.tls_key)

        def on_handshake(sock, server_name, ctx) -> None:
            if files.changed():
                try:
                    load()
                except (OSError, ssl.SSLError) as exc:
                    log.warning("TLS files changed but cannot be read (%s); keeping the loaded ones", exc)

        load()
        context.sni_callback = on_handshake
        if self.tls_client_ca:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(self.tls_client_ca)
        return context


# Every channel pings its server every 30 s, even with no call in flight: a proposer or controller
# that vanished without closing its connection (a node lost, a partition) is noticed within
# 30 + 10 s instead of at the kernel's TCP timeout. Servers accept pings every 10 s or slower
# (`ServerConfig.options`).
CLIENT_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A target naming several servers (a headless Service's DNS name, `ipv4:a,b`) spreads calls
    # over all of them, and a server that sends GOAWAY (draining) gets no new ones.
    ("grpc.lb_policy_name", "round_robin"),
]


@dataclass(frozen=True)
class ClientTLS:
    tls_ca: str | None = field(default=None, metadata={"help": "PEM CA bundle that signed the servers: use TLS"})
    tls_client_cert: str | None = field(default=None, metadata={"help": "PEM client certificate (for mTLS)"})
    tls_client_key: str | None = field(default=None, metadata={"help": "PEM private key of --tls-client-cert"})
    tls_server_name: str | None = field(
        default=None,
        metadata={
            "help": "the name to check the server's certificate against (default: the host dialed; "
            "proposers found by DNS are checked against that DNS name, not their pod IPs)"
        },
    )

    def check(self) -> None:
        if bool(self.tls_client_cert) != bool(self.tls_client_key):
            raise ValueError("--tls-client-cert and --tls-client-key go together")
        if self.tls_client_cert and not self.tls_ca:
            raise ValueError("--tls-client-cert needs --tls-ca")

    def credentials(self) -> grpc.ChannelCredentials | None:
        """Read now: a channel made later (a reconnection) reads the files again."""
        self.check()
        if not self.tls_ca:
            return None
        ca = Path(self.tls_ca).read_bytes()
        if self.tls_client_cert:
            key, cert = Path(self.tls_client_key).read_bytes(), Path(self.tls_client_cert).read_bytes()
            return grpc.ssl_channel_credentials(ca, key, cert)
        return grpc.ssl_channel_credentials(ca)

    def _options(self, server_name: str | None) -> list[tuple[str, str | int]]:
        name = self.tls_server_name or server_name
        return CLIENT_OPTIONS + ([("grpc.ssl_target_name_override", name)] if name else [])

    def aio_channel(self, target: str, server_name: str | None = None) -> grpc.aio.Channel:
        """`server_name`: what to check the certificate against when --tls-server-name is unset."""
        credentials = self.credentials()
        if credentials is None:
            return grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)
        return grpc.aio.secure_channel(target, credentials, options=self._options(server_name))

    def channel(self, target: str, server_name: str | None = None) -> grpc.Channel:
        credentials = self.credentials()
        if credentials is None:
            return grpc.insecure_channel(target, options=CLIENT_OPTIONS)
        return grpc.secure_channel(target, credentials, options=self._options(server_name))


def read_token(path: str | None) -> str | None:
    """The first non-empty line of a token file (None: no file)."""
    if not path:
        return None
    for line in Path(path).read_text().splitlines():
        if line.strip():
            return line.strip()
    raise ValueError(f"{path}: no token in the file")


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying the token (none without one)."""
    return (("authorization", f"Bearer {token}"),) if token else ()
