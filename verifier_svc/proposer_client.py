"""Drafts from proposer replicas over gRPC, never at the cost of a client request.

Each request is pinned to one replica by rendezvous hashing of its id over
the available endpoints, so its draft state lives in one place and moves only
when that set changes (a replica in back-off hands its requests to the others,
which rebuild their state from the full context). Sub-batches go to their replicas concurrently, one bidi
stream per replica, under a per-step deadline. A replica that fails, is slow
or answers "unknown / length mismatch" costs only this step's drafts (k = 0):
its stream is dropped, it is skipped for a back-off period, and its requests
are resent with their full context when it is tried again.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import socket
import time
from typing import TYPE_CHECKING

import grpc

from protocol.proposer import draft_from_pb, item_to_pb
from protocol.security import ClientTLS, bearer
from protocol.v1 import proposer_pb2 as pb
from protocol.v1 import proposer_pb2_grpc as pb_grpc
from runtime.draft import Draft, DraftRequest, Proposal

if TYPE_CHECKING:
    from verifier_svc.endpointslices import KubeAccess

log = logging.getLogger(__name__)
MAX_PENDING_RELEASES = 10_000


def rendezvous(request_id: str, endpoints: list[str]) -> str:
    """The endpoint with the highest hash of (endpoint, id): stable, and only 1/N of ids move per change."""
    return max(endpoints, key=lambda e: hashlib.blake2b(f"{e}|{request_id}".encode(), digest_size=8).digest())


class Replica:
    """One endpoint: a bidi stream used for one exchange at a time."""

    def __init__(
        self, address: str, tls: ClientTLS = ClientTLS(), token: str | None = None, server_name: str | None = None
    ):
        self.address, self.tls, self.token, self.server_name = address, tls, token, server_name
        self.known: dict[str, int] = {}  # request id -> context length the replica holds
        self.released: list[str] = []
        self.down_until = 0.0
        self._channel: grpc.aio.Channel | None = None
        self._call = None

    def available(self) -> bool:
        return time.monotonic() >= self.down_until

    async def exchange(self, request: pb.ProposeRequest, timeout: float) -> pb.ProposeResponse:
        if self._call is None:
            self._channel = self.tls.aio_channel(self.address, self.server_name)
            self._call = pb_grpc.ProposerStub(self._channel).Propose(metadata=bearer(self.token))
        async with asyncio.timeout(timeout):  # one deadline for the round trip, no extra tasks
            await self._call.write(request)
            response = await self._call.read()
        if response is grpc.aio.EOF:
            raise ConnectionError("stream closed")
        return response

    async def fail(self, backoff_s: float) -> None:
        """Drops the stream and everything the replica was believed to hold."""
        self.down_until = time.monotonic() + backoff_s
        self.known.clear()
        self.released.clear()
        call, channel, self._call, self._channel = self._call, self._channel, None, None
        if call is not None:
            call.cancel()
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        await self.fail(0.0)


class ProposerClient:
    """`endpoints`: host:port of each replica; or one `dns:NAME:PORT` whose addresses are
    re-resolved every `resolve_every_s` (a headless Kubernetes Service, say); or one
    `k8s:[NAMESPACE/]SERVICE:PORT`, the ready endpoints of the Service's EndpointSlices, followed
    by a watch on the API server (`kube`: which one; None: in-cluster, as the pod's service
    account). Found replicas are dialled by IP and their certificates checked against the name
    (for k8s:, SERVICE.NAMESPACE.svc.cluster.local; --tls-server-name overrides either)."""

    def __init__(
        self,
        endpoints: list[str],
        deadline_s: float = 0.1,
        backoff_s: float = 1.0,
        resolve_every_s: float = 10.0,
        tls: ClientTLS = ClientTLS(),
        token: str | None = None,
        kube: KubeAccess | None = None,
    ):
        if not endpoints:
            raise ValueError("at least one proposer endpoint is needed")
        if len(endpoints) > 1 and any(e.startswith(("dns:", "k8s:")) for e in endpoints):
            raise ValueError(f"a dns: or k8s: proposer address stands alone: {','.join(endpoints)}")
        self.deadline_s = deadline_s
        self.tls, self.token = tls, token
        self.backoff_s = backoff_s
        self.dns: tuple[str, int] | None = None
        self.resolve_every_s = resolve_every_s
        self._next_resolve = 0.0
        self.watcher = None
        self._watched_version = 0
        self.server_name: str | None = None
        self.replicas: dict[str, Replica] = {}
        if len(endpoints) == 1 and endpoints[0].startswith("dns:"):
            host, _, port = endpoints[0].removeprefix("dns:").rpartition(":")
            self.dns = (host, int(port))
            self.server_name = host
        elif len(endpoints) == 1 and endpoints[0].startswith("k8s:"):
            # Imported here: the Kubernetes client takes a good half second to import.
            from verifier_svc.endpointslices import EndpointSliceWatcher, ServiceAddress

            self.watcher = EndpointSliceWatcher(ServiceAddress.parse(endpoints[0]), kube)
            self.server_name = self.watcher.server_name
            self.watcher.start()
        else:
            self.replicas = {address: self._replica(address) for address in endpoints}
        self._steps = itertools.count()

    async def set_endpoints(self, endpoints: list[str]) -> None:
        """Adds new replicas and closes vanished ones (their requests move by rendezvous)."""
        for address in set(self.replicas) - set(endpoints):
            await self.replicas.pop(address).close()
        for address in endpoints:
            if address not in self.replicas:
                self.replicas[address] = self._replica(address)

    def _replica(self, address: str) -> Replica:
        return Replica(address, self.tls, self.token, self.server_name)

    async def _follow_watch(self) -> None:
        """Applies what the EndpointSlice watch saw since the last exchange: a replica that
        went unready or began terminating gets no further drafts."""
        version, endpoints = self.watcher.endpoints
        if version != self._watched_version:
            self._watched_version = version
            await self.set_endpoints(endpoints)

    async def _resolve(self) -> None:
        host, port = self.dns
        self._next_resolve = time.monotonic() + self.resolve_every_s
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            log.warning("cannot resolve proposer name %s: %s; keeping %d endpoints", host, exc, len(self.replicas))
            return
        addresses = sorted({f"[{i[4][0]}]:{i[4][1]}" if ":" in i[4][0] else f"{i[4][0]}:{i[4][1]}" for i in infos})
        await self.set_endpoints(addresses)

    def replica_for(self, request_id: str) -> Replica:
        up = [a for a, r in self.replicas.items() if r.available()] or list(self.replicas)
        return self.replicas[rendezvous(request_id, up)]

    async def propose(self, requests: list[DraftRequest]) -> Proposal:
        """Drafting time is the slowest replica's own; a failed replica's requests get None."""
        if self.dns is not None and time.monotonic() >= self._next_resolve:
            await self._resolve()
        elif self.watcher is not None:
            await self._follow_watch()
        results: list[Draft | None] = [None] * len(requests)
        if not self.replicas:
            return Proposal(results)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(self.replica_for(r.request_id).address, []).append(i)
        calls = [self._propose_on(self.replicas[a], idxs, requests, results) for a, idxs in groups.items()]
        # Replicas are asked concurrently; one replica (the usual case) needs no tasks.
        draft_ms = await asyncio.gather(*calls) if len(calls) > 1 else [await calls[0]]
        served = [ms for ms in draft_ms if ms is not None]
        return Proposal(results, max(served, default=0.0), failures=draft_ms.count(None), busy_ms=sum(served))

    def release(self, request_ids) -> None:
        """Queues releases for the replicas holding these requests (sent with their next exchange)."""
        for request_id in request_ids:
            for replica in self.replicas.values():
                if replica.known.pop(request_id, None) is not None and len(replica.released) < MAX_PENDING_RELEASES:
                    replica.released.append(request_id)

    async def flush(self) -> None:
        """Sends queued releases now, for replicas that would otherwise hold the states of
        finished requests until the next busy step (or their idle expiry)."""
        if self.watcher is not None:
            await self._follow_watch()
        for replica in list(self.replicas.values()):
            if not replica.released or not replica.available():
                continue
            message = pb.ProposeRequest(step_id=next(self._steps), released_request_ids=replica.released)
            replica.released = []
            try:
                await replica.exchange(message, self.deadline_s)
            except Exception as exc:  # the stream's end releases them on the replica anyway
                log.warning("proposer %s failed (%s) taking releases", replica.address, type(exc).__name__)
                await replica.fail(self.backoff_s)

    async def close(self) -> None:
        if self.watcher is not None:
            await asyncio.to_thread(self.watcher.stop)
        for replica in self.replicas.values():
            await replica.close()

    async def _propose_on(self, replica: Replica, idxs: list[int], requests, results) -> float | None:
        """Fills the replica's share of `results`; its drafting time, or None when it failed."""
        if not replica.available():
            return None
        message = pb.ProposeRequest(step_id=next(self._steps), released_request_ids=replica.released)
        for i in idxs:
            message.items.append(item_to_pb(requests[i], replica.known.get(requests[i].request_id)))
        replica.released = []
        try:
            response = await replica.exchange(message, self.deadline_s)
            if response.step_id != message.step_id or len(response.results) != len(idxs):
                raise ConnectionError("reply does not answer the request")
        except Exception as exc:  # timeouts, RPC errors, a stream finished under us: all cost only drafts
            log.warning(
                "proposer %s failed (%s): no drafts for %d requests this step",
                replica.address,
                type(exc).__name__,
                len(idxs),
            )
            await replica.fail(self.backoff_s)
            return None
        for i, res in zip(idxs, response.results):
            request_id = requests[i].request_id
            if res.status != pb.PROPOSE_STATUS_OK:
                replica.known.pop(request_id, None)  # resync: full context next time
                continue
            replica.known[request_id] = len(requests[i].token_ids)
            results[i] = draft_from_pb(res)
        return response.draft_ms
