"""A local stand-in for the Kubernetes API server's EndpointSlices: list and watch.

No cluster (nor a kube-apiserver) can run here, so the verifier's EndpointSlice discovery is
tested against this instead: a real HTTP/1.1 server on 127.0.0.1 (HTTPS when given a TLS
context) that speaks the API's wire protocol for one resource,
`GET /apis/discovery.k8s.io/v1/namespaces/NS/endpointslices?labelSelector=...`:

- a list answers with the items and the collection's `metadata.resourceVersion`;
- `watch=true` streams newline-delimited JSON events (ADDED, MODIFIED, DELETED) in chunks,
  from after the requested resourceVersion, until `timeoutSeconds`;
- a resourceVersion older than the last compaction is 410 Gone: by default the way the API
  server answers a watch (a 200 whose one event is an ERROR carrying a Status, code 410), or
  as an HTTP 410 (`gone_as="status"`);
- a request without the bearer token is 401 (the scheme's case aside, as the API server).

Every request is recorded as RBAC sees it: verb (get, list or watch), API group, resource and
namespace. The objects live on across `stop()` and `start()` (an API server going away and
coming back over the same etcd).
"""

from __future__ import annotations

import json
import re
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PATH = re.compile(
    r"/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<namespace>[^/]+)/(?P<resource>[^/]+)(?:/(?P<name>[^/]+))?"
)


@dataclass(frozen=True)
class Call:
    verb: str
    group: str
    resource: str
    namespace: str
    query: dict[str, str] = field(compare=False)


def endpoint(ip: str, ready: bool | None = True, terminating: bool | None = False, pod: str | None = None) -> dict:
    """One endpoint as the EndpointSlice controller writes it (None: the condition left unset)."""
    conditions = {k: v for k, v in (("ready", ready), ("terminating", terminating)) if v is not None}
    if ready is not None:
        conditions["serving"] = ready or bool(terminating)
    return {
        "addresses": [ip],
        "conditions": conditions,
        "targetRef": {"kind": "Pod", "name": pod or f"pod-{ip}"},
    }


def endpoint_slice(name: str, service: str, endpoints: list[dict], port: int = 50061, ipv6: bool = False) -> dict:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv6" if ipv6 else "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "grpc", "port": port, "protocol": "TCP"}],
    }


def status(code: int, reason: str, message: str) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class KubeApiStandIn:
    def __init__(
        self, token: str = "stand-in-token", port: int = 0, tls: ssl.SSLContext | None = None, gone_as: str = "event"
    ):
        self.token, self.tls, self.gone_as = token, tls, gone_as
        self.calls: list[Call] = []
        self._cond = threading.Condition()
        self._objects: dict[tuple[str, str], dict] = {}
        self._events: list[tuple[int, str, str, dict]] = []  # (resourceVersion, type, namespace, object)
        self._version = 1000
        self._compacted = self._version  # a watch from before this is 410 Gone
        self._epoch = 0  # bumped to end every open watch
        self._connections: set[socket.socket] = set()
        self._open_watches = 0
        self._server: ThreadingHTTPServer | None = None
        self.port = port
        self.start()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    # --- the cluster's state ---------------------------------------------------------

    def put(self, namespace: str, obj: dict) -> None:
        """Creates or replaces an EndpointSlice: ADDED or MODIFIED to the watchers."""
        with self._cond:
            key = (namespace, obj["metadata"]["name"])
            kind = "MODIFIED" if key in self._objects else "ADDED"
            self._record_event(kind, namespace, obj)
            self._objects[key] = self._events[-1][3]

    def delete(self, namespace: str, name: str) -> None:
        with self._cond:
            self._record_event("DELETED", namespace, self._objects.pop((namespace, name)))

    def compact(self) -> None:
        """Forgets the history: a watch from any version before now is 410 Gone."""
        with self._cond:
            self._compacted = self._version

    def _record_event(self, kind: str, namespace: str, obj: dict) -> None:
        self._version += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"].update(namespace=namespace, resourceVersion=str(self._version))
        self._events.append((self._version, kind, namespace, obj))
        self._cond.notify_all()

    # --- the server --------------------------------------------------------------------

    def start(self) -> None:
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _Handler)
        server.daemon_threads = True
        if self.tls is not None:
            server.socket = self.tls.wrap_socket(server.socket, server_side=True)
        server.api = self
        self._server, self.port = server, server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self) -> None:
        """Goes away as a crashed or restarted API server does: every connection cut, none accepted."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        self.close_watches()

    def close_watches(self) -> None:
        """Cuts every open connection (watches included) without a clean end of stream."""
        with self._cond:
            self._epoch += 1
            connections, self._connections = list(self._connections), set()
            self._cond.notify_all()
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def watching(self) -> int:
        """How many watches are open now."""
        with self._cond:
            return self._open_watches

    @property
    def resource_version(self) -> str:
        with self._cond:
            return str(self._version)

    def verbs(self) -> list[str]:
        return [c.verb for c in self.calls]

    def _list(self, namespace: str, selector: dict[str, str]) -> dict:
        with self._cond:
            items = [o for (ns, _), o in sorted(self._objects.items()) if ns == namespace and _selects(selector, o)]
            version = self._version
        return {
            "kind": "EndpointSliceList",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": {"resourceVersion": str(version)},
            "items": items,
        }


def _selects(selector: dict[str, str], obj: dict) -> bool:
    return selector.items() <= obj["metadata"].get("labels", {}).items()


def _parse_selector(text: str) -> dict[str, str] | None:
    """Equality selectors (`a=b,c=d`) only; None for anything else."""
    selector = {}
    for term in filter(None, text.split(",")):
        key, sep, value = term.partition("=")
        if not sep or "!" in key or value.startswith("="):
            return None
        selector[key.strip()] = value.strip()
    return selector


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        with self.server.api._cond:
            self.server.api._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.api._cond:
            self.server.api._connections.discard(self.connection)
        super().finish()

    def do_GET(self) -> None:
        api: KubeApiStandIn = self.server.api
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        match = PATH.fullmatch(url.path)
        if match is None:
            return self._send(404, status(404, "NotFound", f"no route {url.path}"))
        verb = "watch" if query.get("watch") in ("true", "1") else "get" if match["name"] else "list"
        api.calls.append(Call(verb, match["group"], match["resource"], match["namespace"], query))
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token != api.token:  # the scheme is case-insensitive
            return self._send(401, status(401, "Unauthorized", "Unauthorized"))
        served = (match["group"], match["version"], match["resource"]) == ("discovery.k8s.io", "v1", "endpointslices")
        if not served or match["name"]:
            return self._send(404, status(404, "NotFound", f"the stand-in serves no {url.path}"))
        selector = _parse_selector(query.get("labelSelector", ""))
        if selector is None:
            return self._send(400, status(400, "BadRequest", "unsupported labelSelector"))
        if verb == "list":
            return self._send(200, api._list(match["namespace"], selector))
        with api._cond:
            api._open_watches += 1
        try:
            self._watch(api, match["namespace"], selector, query)
        except OSError:  # the connection was cut under the stream
            self.close_connection = True
        finally:
            with api._cond:
                api._open_watches -= 1

    def _watch(self, api: KubeApiStandIn, namespace: str, selector: dict[str, str], query: dict[str, str]) -> None:
        since = int(query["resourceVersion"]) if query.get("resourceVersion") not in (None, "", "0") else None
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 1800))
        with api._cond:
            gone = since is not None and since < api._compacted
            message = f"too old resource version: {since} ({api._compacted})"
            epoch = api._epoch
            if since is None:  # from now, after the current state as ADDED events
                backlog = [(0, "ADDED", ns, o) for (ns, _), o in sorted(api._objects.items())]
                position = len(api._events)
            else:
                backlog = []
                position = next((i for i, e in enumerate(api._events) if e[0] > since), len(api._events))
        if gone and api.gone_as == "status":
            return self._send(410, status(410, "Expired", message))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if gone:
            self._chunk(json.dumps({"type": "ERROR", "object": status(410, "Expired", message)}).encode() + b"\n")
            return self._chunk(b"")
        while True:
            with api._cond:
                while position == len(api._events) and api._epoch == epoch and time.monotonic() < deadline:
                    api._cond.wait(max(0.0, min(0.05, deadline - time.monotonic())))
                    if self._client_left():
                        self.close_connection = True
                        return
                pending, position = backlog + api._events[position:], len(api._events)
                cut = api._epoch != epoch
            backlog = []
            if cut:  # no clean end: the connection is already shut down
                self.close_connection = True
                return
            for _, kind, ns, obj in pending:
                if ns == namespace and _selects(selector, obj):
                    self._chunk(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
            if time.monotonic() >= deadline:  # the server's own end of a watch: a clean end of stream
                return self._chunk(b"")

    def _client_left(self) -> bool:
        # A watching client sends nothing after its request: anything readable is its end.
        readable, _, _ = select.select([self.connection], [], [], 0)
        return bool(readable)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%X\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
