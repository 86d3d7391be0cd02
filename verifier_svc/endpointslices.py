"""Proposer replicas from the Kubernetes API: the ready endpoints of a Service's EndpointSlices.

DNS cannot follow readiness closely enough: cluster DNS caches answers for longer than a
proposer's preStop, so a terminating proposer would keep receiving drafts. The API server
says so the moment the pod starts terminating.

A daemon thread lists the Service's EndpointSlices (label `kubernetes.io/service-name`), then
watches them from the list's resourceVersion, and publishes every change of the set of ready,
not terminating endpoints as `(version, ["host:port", ...])`. On 410 Gone (the version was
compacted away) it lists again; on any other error it keeps the last endpoints and reconnects
with back-off. Readers on any thread take `endpoints` and compare versions: the proposer client
applies a change before its next exchange, never under one in flight.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

log = logging.getLogger(__name__)

NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_LABEL = r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?"
_ADDRESS = re.compile(rf"k8s:(?:(?P<namespace>{_LABEL})/)?(?P<service>{_LABEL}):(?P<port>\d{{1,5}})")


@dataclass(frozen=True)
class KubeAccess:
    """An API server named explicitly (out of a cluster, or a stand-in); None means in-cluster
    (the pod's service account). `namespace`: what `k8s:SERVICE:PORT` means without one."""

    host: str
    token: str | None = None
    ca_file: str | None = None
    namespace: str | None = None


@dataclass(frozen=True)
class ServiceAddress:
    namespace: str | None
    service: str
    port: int

    @staticmethod
    def parse(text: str) -> ServiceAddress:
        """`k8s:SERVICE:PORT` or `k8s:NAMESPACE/SERVICE:PORT`."""
        match = _ADDRESS.fullmatch(text)
        if match is None or not 0 < int(match["port"]) < 65536:
            raise ValueError(f"proposer {text!r}: expected k8s:SERVICE:PORT or k8s:NAMESPACE/SERVICE:PORT")
        return ServiceAddress(match["namespace"], match["service"], int(match["port"]))


def api_client(access: KubeAccess | None = None) -> client.ApiClient:
    configuration = client.Configuration()
    if access is None:
        # Re-reads the projected token as it rotates.
        config.load_incluster_config(client_configuration=configuration)
    else:
        configuration.host = access.host
        configuration.ssl_ca_cert = access.ca_file
        if access.token:
            configuration.api_key["BearerToken"] = f"Bearer {access.token}"
    configuration.retries = False  # the watcher's own back-off decides when to try again
    return client.ApiClient(configuration)


def ready_addresses(endpoint_slice: dict, port: int) -> list[str]:
    """host:port of each endpoint that is ready and not terminating. The API defines an unset
    `ready` as true and an unset `terminating` as false."""
    addresses = []
    for endpoint in endpoint_slice.get("endpoints") or ():
        conditions = endpoint.get("conditions") or {}
        if conditions.get("ready") is False or conditions.get("terminating") is True:
            continue
        for host in endpoint.get("addresses") or ():
            addresses.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return addresses


class EndpointSliceWatcher:
    def __init__(
        self,
        address: ServiceAddress,
        access: KubeAccess | None = None,
        namespace_file: str | None = None,
        watch_timeout_s: int = 240,
        request_timeout_s: float = 10.0,
        backoff_s: tuple[float, float] = (0.5, 30.0),
    ):
        self.service, self.port = address.service, address.port
        self.api = client.DiscoveryV1Api(api_client(access))
        self.namespace = (
            address.namespace or (access and access.namespace) or _read_namespace(namespace_file or NAMESPACE_FILE)
        )
        self.selector = f"{SERVICE_NAME_LABEL}={self.service}"
        self.watch_timeout_s, self.request_timeout_s, self.backoff_s = watch_timeout_s, request_timeout_s, backoff_s
        self.endpoints: tuple[int, list[str]] = (0, [])  # replaced whole: safe to read from any thread
        self.synced = threading.Event()  # set once a list has arrived
        self._slices: dict[str, list[str]] = {}
        self._resource_version: str | None = None  # None: list before watching
        self._stopping = threading.Event()
        self._answered = False
        self._response = None  # the open watch, shut down by stop()
        self._thread = threading.Thread(target=self._run, name=f"endpointslices-{self.service}", daemon=True)

    @property
    def server_name(self) -> str:
        """The name the Service's pods' certificates carry: they are dialled by pod IP."""
        return f"{self.service}.{self.namespace}.svc.cluster.local"

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ends the watch at once: the thread is blocked reading it, so its socket is shut down."""
        self._stopping.set()
        response = self._response
        if response is not None:
            _shutdown(response)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("the EndpointSlice watch of %s did not stop within %.0f s", self.service, timeout_s)
        self.api.api_client.close()

    def _run(self) -> None:
        delay = self.backoff_s[0]
        while not self._stopping.is_set():
            try:
                if self._resource_version is None:
                    self._list()
                self._watch()  # returns when the server ends the watch: go on from the last version
                continue
            except ApiException as exc:
                if exc.status == 410:
                    log.info(
                        "EndpointSlices of %s: version %s expired, listing again", self.service, self._resource_version
                    )
                    self._resource_version = None
                    continue
                error = f"HTTP {exc.status} {exc.reason}"
            except Exception as exc:  # the connection, the server or the body: all retried alike
                error = f"{type(exc).__name__}: {exc}"
            if self._stopping.is_set():
                break
            if self._answered:  # the server answered since the last failure: back off from the start
                delay, self._answered = self.backoff_s[0], False
            log.warning(
                "cannot follow the EndpointSlices of %s/%s (%s); keeping %d endpoints, retrying in %.1f s",
                self.namespace,
                self.service,
                " ".join(error.split())[:300],
                len(self.endpoints[1]),
                delay,
            )
            self._stopping.wait(delay)
            delay = min(delay * 2, self.backoff_s[1])

    def _list(self) -> None:
        response = self.api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self.selector,
            _preload_content=False,
            _request_timeout=self.request_timeout_s,
        )
        try:
            body = json.loads(response.data)
        finally:
            response.release_conn()
        self._slices = {s["metadata"]["name"]: ready_addresses(s, self.port) for s in body.get("items") or ()}
        self._resource_version = body["metadata"]["resourceVersion"]
        self._answered = True
        self._publish()
        self.synced.set()

    def _watch(self) -> None:
        response = self.api.list_namespaced_endpoint_slice(
            self.namespace,
            label_selector=self.selector,
            watch=True,
            resource_version=self._resource_version,
            allow_watch_bookmarks=True,
            timeout_seconds=self.watch_timeout_s,
            _preload_content=False,
            # Past the server's own end of the watch, silence means the connection is gone.
            _request_timeout=(self.request_timeout_s, self.watch_timeout_s + 30),
        )
        self._response, self._answered = response, True
        try:
            if self._stopping.is_set():  # stop() came before the response it would shut down
                return
            for line in _lines(response):
                if self._stopping.is_set():
                    return
                self._apply(json.loads(line))
        finally:
            self._response = None
            response.close()  # a watch cut short leaves unread data: never back into the pool
            response.release_conn()

    def _apply(self, event: dict) -> None:
        kind, obj = event["type"], event["object"]
        if kind == "ERROR":  # a Status: 410 when the version was compacted away
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        self._resource_version = obj["metadata"]["resourceVersion"]
        if kind == "BOOKMARK":
            return
        name = obj["metadata"]["name"]
        if kind == "DELETED":
            self._slices.pop(name, None)
        else:
            self._slices[name] = ready_addresses(obj, self.port)
        self._publish()

    def _publish(self) -> None:
        version, current = self.endpoints
        addresses = sorted({a for slice_addresses in self._slices.values() for a in slice_addresses})
        if addresses != current:
            log.info("proposers of %s/%s: %s", self.namespace, self.service, ", ".join(addresses) or "none ready")
            self.endpoints = (version + 1, addresses)


def _lines(response):
    """The watch's newline-delimited JSON events, as the chunks arrive."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=True):
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line for line in lines if line.strip())


def _shutdown(response) -> None:
    try:
        response.shutdown()
    except Exception:  # released or never connected: fall back to the socket, if any
        sock = getattr(getattr(response, "connection", None), "sock", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _read_namespace(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ValueError(
            f"k8s:SERVICE:PORT takes the namespace from {path} (the pod's service account): {exc}; "
            "name it as k8s:NAMESPACE/SERVICE:PORT"
        ) from exc
