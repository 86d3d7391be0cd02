"""How the `smartspec` commands reach a server: plaintext or TLS (`--tls-ca`, and a client
certificate for mTLS), with a bearer token from a file when the server asks for one."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from protocol import serving
from protocol.security import ClientTLS, bearer, read_token


@dataclass(frozen=True)
class Dial:
    tls: ClientTLS = ClientTLS()
    token: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return bearer(self.token)

    def channel(self, target: str):
        return self.tls.channel(target)

    def aio_channel(self, target: str):
        return self.tls.aio_channel(target)


def add_arguments(parser: argparse.ArgumentParser, token_help: str) -> None:
    serving.add_arguments(parser, ClientTLS)
    parser.add_argument("--token-file", default=None, help=token_help)


def from_args(args: argparse.Namespace) -> Dial:
    tls = serving.from_args(ClientTLS, args)
    tls.check()
    return Dial(tls, read_token(args.token_file))
