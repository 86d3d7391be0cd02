"""Who may call what: roles held by bearer tokens or by mTLS certificate identities.

A server names, per method (or per service), the roles allowed to call it. A caller holds a
role by presenting one of the role's tokens (`authorization: Bearer ...`; files of tokens,
one per line, compared by digest in constant time) or, on a server that requires client
certificates (`--tls-client-ca`), by a certificate whose identity is on the role's list: a
subject alternative name (DNS, URI such as a SPIFFE ID, e-mail, IP) or the subject's common
name, matched exactly. Both kinds of file are re-read when they change, so a rotated Secret
needs no restart. A caller holding no role gets UNAUTHENTICATED; one holding only other
roles, PERMISSION_DENIED; neither says more. Methods no rule names (health, reflection)
stay open: probes carry no credentials.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

import grpc

from protocol.handlers import kind, rebuild
from protocol.security import WatchedFiles


class _EntryFile:
    """What the non-empty, non-comment lines of a file hold (`parse`), re-read when it changes."""

    what = "entries"

    def __init__(self, path: str):
        self.files = WatchedFiles(path)
        self.entries = self._read()
        if not self.entries:
            raise ValueError(f"{path}: no {self.what} in the file")

    def parse(self, lines: list[str]):
        return lines

    def _read(self):
        (text,) = self.files.read()
        lines = (line.strip() for line in text.decode().splitlines())
        return self.parse([line for line in lines if line and not line.startswith("#")])

    def current(self):
        if self.files.changed():
            try:
                self.entries = self._read()
            except OSError:  # mid-swap: keep what was loaded
                pass
        return self.entries


class TokenFile(_EntryFile):
    """The tokens of a file. Only their digests are kept; a presented token is digested and
    compared with each in constant time."""

    what = "tokens"

    def parse(self, lines: list[str]) -> list[bytes]:
        return [_digest(t) for t in lines]

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        found = False
        for d in self.current():  # no early exit: the time does not say which token matched
            found |= hmac.compare_digest(presented, d)
        return found


class IdentityFile(_EntryFile):
    """Certificate identities (one per line) that hold a role."""

    what = "identities"

    def parse(self, lines: list[str]) -> frozenset[str]:
        return frozenset(lines)

    def accepts(self, names: set[str]) -> bool:
        return not self.current().isdisjoint(names)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def peer_names(auth_context: Mapping[str, list[bytes]]) -> set[str]:
    """The identities of a verified client certificate: its subject alternative names and its
    common name (none without a certificate)."""
    values = [*auth_context.get("x509_subject_alternative_name", ()), *auth_context.get("x509_common_name", ())]
    return {v.decode(errors="replace") for v in values}


def presented_token(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :].strip()
    return None


class Auth(grpc.aio.ServerInterceptor):
    """Guards methods: `rules` maps a method's full name (or a service's, `/package.Service/`)
    to the roles allowed to call it; `tokens` and `identities` map a role to its files.
    Checked when the call starts, where the peer's certificate is known."""

    def __init__(
        self, rules: dict[str, tuple[str, ...]], tokens: dict[str, TokenFile], identities: dict[str, IdentityFile]
    ):
        self.rules, self.tokens, self.identities = rules, tokens, identities

    def required(self, method: str) -> tuple[str, ...] | None:
        if method in self.rules:
            return self.rules[method]
        return self.rules.get(method[: method.rfind("/") + 1])

    def roles(self, context: grpc.aio.ServicerContext) -> set[str]:
        held = set()
        token = presented_token(context.invocation_metadata())
        if token is not None:
            held |= {role for role, file in self.tokens.items() if file.accepts(token)}
        if self.identities:
            names = peer_names(context.auth_context())
            if names:
                held |= {role for role, file in self.identities.items() if file.accepts(names)}
        return held

    def refusal(self, context, allowed: tuple[str, ...]) -> tuple[grpc.StatusCode, str] | None:
        held = self.roles(context)
        if not held:
            return grpc.StatusCode.UNAUTHENTICATED, "missing or unknown credentials"
        if held.isdisjoint(allowed):
            return grpc.StatusCode.PERMISSION_DENIED, "not allowed"
        return None

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        allowed = self.required(details.method)
        if allowed is None or handler is None:
            return handler
        behaviour = getattr(handler, kind(handler))

        if handler.response_streaming:

            async def streaming(request, context):
                refused = self.refusal(context, allowed)
                if refused:
                    await context.abort(*refused)
                async for response in behaviour(request, context):
                    yield response

            return rebuild(handler, streaming)

        async def unary(request, context):
            refused = self.refusal(context, allowed)
            if refused:
                await context.abort(*refused)
            return await behaviour(request, context)

        return rebuild(handler, unary)


def guard(
    rules: dict[str, tuple[str, ...]],
    tokens: Mapping[str, str | None] = {},  # noqa: B006 - read only
    identities: Mapping[str, str | None] = {},  # noqa: B006 - read only
    client_ca: str | None = None,
) -> Auth | None:
    """Guards for the roles that have a token or identity file (role -> path); a rule whose
    roles have neither stays open, and with no file at all there is nothing to guard (None).
    `rules` name a service (`package.Service`, every method) or a method
    (`/package.Service/Method`). Identities need the server to require client certificates
    (`client_ca`): without one no peer has a verified identity."""
    for role, path in identities.items():
        if path and not client_ca:
            raise ValueError(f"--{role}-identities-file needs --tls-client-ca (client certificates)")
    token_files = {role: TokenFile(path) for role, path in tokens.items() if path}
    identity_files = {role: IdentityFile(path) for role, path in identities.items() if path}
    guarded = token_files.keys() | identity_files.keys()
    active = {}
    for target, allowed in rules.items():
        held = tuple(r for r in allowed if r in guarded)
        if held:
            active[target if target.startswith("/") else f"/{target}/"] = held
    return Auth(active, token_files, identity_files) if active else None
