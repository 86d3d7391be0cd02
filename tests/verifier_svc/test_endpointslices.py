"""Proposer discovery from EndpointSlices (`--proposer k8s:SERVICE:PORT`), against a local
stand-in for the Kubernetes API server.

No cluster can run here: tests/kube_api_standin.py is a real HTTP server on 127.0.0.1 that
speaks the API's list and watch protocol for EndpointSlices (chunked newline-delimited JSON
events, resourceVersions, 410 Gone after compaction, bearer tokens). The watcher under test is
the real one, on the real `kubernetes` client; the proposer replicas are real gRPC servers.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import pytest
import trustme
from kube_api_standin import KubeApiStandIn, endpoint, endpoint_slice
from kubernetes.config import ConfigException, incluster_config
from service_threads import ProposerThread, wait_for

from protocol.v1 import generation_pb2 as pb
from runtime.draft import DraftRequest
from runtime.models import Placement
from runtime.sampler import SamplingParams
from verifier_svc import endpointslices
from verifier_svc.endpointslices import EndpointSliceWatcher, KubeAccess, ServiceAddress
from verifier_svc.proposer_client import ProposerClient
from verifier_svc.server import SpeculationConfig

NS = "smartspec"
SERVICE = "smartspec-proposer"
PORT = 50061
SELECTOR = f"kubernetes.io/service-name={SERVICE}"


@pytest.fixture(params=["event"])
def api(request):
    server = KubeApiStandIn(gone_as=request.param)
    yield server
    server.stop()


@pytest.fixture
def watch(api):
    watchers = []

    def make(address: str = f"k8s:{SERVICE}:{PORT}", access: KubeAccess | None = None, **kw) -> EndpointSliceWatcher:
        access = access or KubeAccess(api.url, api.token, namespace=NS)
        watchers.append(EndpointSliceWatcher(ServiceAddress.parse(address), access, backoff_s=(0.05, 0.2), **kw))
        watchers[-1].start()
        return watchers[-1]

    yield make
    for watcher in watchers:
        watcher.stop()


def slice_of(name: str, *endpoints: dict, service: str = SERVICE, ipv6: bool = False) -> dict:
    return endpoint_slice(name, service, list(endpoints), PORT, ipv6)


def until(watcher: EndpointSliceWatcher, expected: list[str]) -> None:
    wait_for(lambda: watcher.endpoints[1] == expected, timeout=10)


def watching(api: KubeApiStandIn, watches: int) -> None:
    """Until the stand-in has seen `watches` watch requests and one watch is open."""
    wait_for(lambda: api.verbs().count("watch") >= watches and api.watching() == 1, timeout=10)


def test_the_list_gives_only_ready_endpoints_not_terminating_via_a_local_api_server_stand_in(api, watch):
    api.put(
        NS,
        slice_of(
            "p-1",
            endpoint("10.0.0.1"),
            endpoint("10.0.0.2", ready=False),  # still loading its model
            endpoint("10.0.0.3", ready=True, terminating=True),  # terminating is never drafted to
            endpoint("10.0.0.4", ready=None, terminating=None),  # unset: ready, not terminating
        ),
    )
    api.put(NS, slice_of("p-2", endpoint("fd00::1"), ipv6=True))
    api.put(NS, slice_of("o-1", endpoint("10.9.9.9"), service="smartspec-controller"))
    api.put("elsewhere", slice_of("p-1", endpoint("10.8.8.8")))
    listed_at = api.resource_version
    watcher = watch()
    assert watcher.synced.wait(10)
    assert watcher.endpoints == (1, ["10.0.0.1:50061", "10.0.0.4:50061", "[fd00::1]:50061"])
    watching(api, 1)
    first, second = api.calls[:2]
    assert (first.verb, first.group, first.resource, first.namespace) == (
        "list",
        "discovery.k8s.io",
        "endpointslices",
        NS,
    )
    assert first.query["labelSelector"] == SELECTOR
    # The watch starts where the list left off, so no change between the two is lost.
    assert (second.verb, second.namespace, second.query["labelSelector"]) == ("watch", NS, SELECTOR)
    assert second.query["resourceVersion"] == listed_at


@pytest.mark.parametrize("ready,terminating", [(False, False), (True, True), (False, True)])
def test_an_endpoint_going_unready_or_terminating_is_dropped_on_its_event_via_a_local_api_server_stand_in(
    api, watch, ready, terminating
):
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1"), endpoint("10.0.0.2")))
    watcher = watch()
    until(watcher, ["10.0.0.1:50061", "10.0.0.2:50061"])
    watching(api, 1)
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=ready, terminating=terminating)))
    until(watcher, ["10.0.0.1:50061"])
    # It came with the MODIFIED event on the open watch, not from a later list.
    assert api.verbs() == ["list", "watch"]


def test_a_new_ready_endpoint_is_added_via_a_local_api_server_stand_in(api, watch):
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False)))
    watcher = watch()
    until(watcher, ["10.0.0.1:50061"])
    watching(api, 1)
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1"), endpoint("10.0.0.2")))  # done loading
    until(watcher, ["10.0.0.1:50061", "10.0.0.2:50061"])
    api.put(NS, slice_of("p-2", endpoint("10.0.1.1")))  # a second slice
    until(watcher, ["10.0.0.1:50061", "10.0.0.2:50061", "10.0.1.1:50061"])
    api.put(NS, slice_of("o-1", endpoint("10.9.9.9"), service="smartspec-verifier"))  # another Service's
    api.put(NS, slice_of("p-3", endpoint("10.0.2.1")))
    until(watcher, ["10.0.0.1:50061", "10.0.0.2:50061", "10.0.1.1:50061", "10.0.2.1:50061"])
    assert api.verbs() == ["list", "watch"]


def test_a_deleted_slice_takes_its_endpoints_along_via_a_local_api_server_stand_in(api, watch):
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1")))
    api.put(NS, slice_of("p-2", endpoint("10.0.1.1"), endpoint("10.0.1.2")))
    watcher = watch()
    until(watcher, ["10.0.0.1:50061", "10.0.1.1:50061", "10.0.1.2:50061"])
    watching(api, 1)
    api.delete(NS, "p-2")
    until(watcher, ["10.0.0.1:50061"])
    api.delete(NS, "p-1")
    until(watcher, [])


@pytest.mark.parametrize("api", ["event", "status"], indirect=True)
def test_410_gone_lists_again_via_a_local_api_server_stand_in(api, watch):
    """While the watcher is cut off, a slice goes and another comes, and the history is compacted:
    its resourceVersion is gone (as a watch ERROR event, or an HTTP 410) and only a new list
    can tell it the state."""
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1")))
    api.put(NS, slice_of("p-2", endpoint("10.0.1.1")))
    watcher = watch()
    until(watcher, ["10.0.0.1:50061", "10.0.1.1:50061"])
    watching(api, 1)
    api.stop()
    api.delete(NS, "p-1")
    api.put(NS, slice_of("p-3", endpoint("10.0.2.1")))
    api.compact()
    relisted_at = api.resource_version
    time.sleep(0.3)
    assert watcher.endpoints[1] == ["10.0.0.1:50061", "10.0.1.1:50061"]  # the last known, meanwhile
    api.start()
    until(watcher, ["10.0.1.1:50061", "10.0.2.1:50061"])
    watching(api, 3)
    assert api.verbs() == ["list", "watch", "watch", "list", "watch"]
    assert api.calls[-1].query["resourceVersion"] == relisted_at


def test_the_api_server_going_away_keeps_the_endpoints_and_reconnects_via_a_local_api_server_stand_in(api, watch):
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1"), endpoint("10.0.0.2")))
    watcher = watch()
    until(watcher, ["10.0.0.1:50061", "10.0.0.2:50061"])
    watching(api, 1)
    last_seen = api.resource_version
    api.stop()
    time.sleep(0.5)  # several failed reconnections (back-off 0.05 s to 0.2 s)
    assert watcher.endpoints[1] == ["10.0.0.1:50061", "10.0.0.2:50061"]
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1"), endpoint("10.0.0.2", ready=False, terminating=True)))
    api.start()
    until(watcher, ["10.0.0.1:50061"])
    # Resumed from the last version it saw: the change made while it was away is replayed, no list.
    assert api.verbs() == ["list", "watch", "watch"]
    assert api.calls[-1].query["resourceVersion"] == last_seen
    # A connection cut under an open watch (a load balancer, say) is reconnected the same way.
    watching(api, 2)
    api.close_watches()
    watching(api, 3)
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1"), endpoint("10.0.0.3")))
    until(watcher, ["10.0.0.1:50061", "10.0.0.3:50061"])


def test_a_watch_ended_by_the_server_is_resumed_via_a_local_api_server_stand_in(api, watch):
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1")))
    watcher = watch(watch_timeout_s=1)
    until(watcher, ["10.0.0.1:50061"])
    watching(api, 2)  # the first watch ran out its timeoutSeconds cleanly; the next goes on from there
    assert api.calls[1].query["timeoutSeconds"] == "1"
    api.put(NS, slice_of("p-1", endpoint("10.0.0.2")))
    until(watcher, ["10.0.0.2:50061"])
    assert "list" not in api.verbs()[1:]


def test_the_watcher_stops_at_once_via_a_local_api_server_stand_in(api, watch):
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1")))
    watcher = watch()
    until(watcher, ["10.0.0.1:50061"])
    watching(api, 1)
    start = time.monotonic()
    watcher.stop()
    assert time.monotonic() - start < 2.0, "stop waited for the watch to end on its own"
    assert not watcher._thread.is_alive()
    wait_for(lambda: api.watching() == 0, timeout=5)
    calls = len(api.calls)
    time.sleep(0.3)
    assert len(api.calls) == calls, "it reconnected after stop()"

    # Stopped while waiting to reconnect to an API server that is gone.
    other = watch()
    until(other, ["10.0.0.1:50061"])
    api.stop()
    time.sleep(0.2)
    start = time.monotonic()
    other.stop()
    assert time.monotonic() - start < 2.0 and not other._thread.is_alive()


def test_a_refused_token_leaves_no_endpoints_and_retries_via_a_local_api_server_stand_in(api, watch):
    api.put(NS, slice_of("p-1", endpoint("10.0.0.1")))
    watcher = watch(access=KubeAccess(api.url, "not-the-token", namespace=NS))
    wait_for(lambda: api.verbs().count("list") >= 3, timeout=10)  # refused, backed off, tried again
    assert not watcher.synced.is_set() and watcher.endpoints == (0, [])


def test_https_with_the_cluster_ca_via_a_local_api_server_stand_in(tmp_path, watch):
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    ca_file = tmp_path / "ca.crt"
    ca.cert_pem.write_to_path(str(ca_file))
    api = KubeApiStandIn(tls=context)
    try:
        api.put(NS, slice_of("p-1", endpoint("10.0.0.1")))
        watcher = watch(access=KubeAccess(api.url, api.token, str(ca_file), NS))
        until(watcher, ["10.0.0.1:50061"])
        # Without the cluster's CA the server is not trusted: nothing is listed.
        untrusted = watch(access=KubeAccess(api.url, api.token, namespace=NS))
        time.sleep(0.3)
        assert not untrusted.synced.is_set() and untrusted.endpoints == (0, [])
    finally:
        api.stop()


def test_the_address_names_the_service_port_and_maybe_the_namespace(tmp_path):
    assert ServiceAddress.parse("k8s:smartspec-proposer:50061") == ServiceAddress(None, "smartspec-proposer", 50061)
    assert ServiceAddress.parse("k8s:team-a/drafts:7") == ServiceAddress("team-a", "drafts", 7)
    for bad in ("k8s:smartspec-proposer", "k8s::50061", "k8s:Proposer:1", "k8s:a/b/c:1", "k8s:p:0", "k8s:p:70000"):
        with pytest.raises(ValueError, match="k8s:SERVICE:PORT"):
            ServiceAddress.parse(bad)


def test_the_namespace_comes_from_the_address_or_the_service_account_via_a_local_api_server_stand_in(api, tmp_path):
    namespace_file = tmp_path / "namespace"
    namespace_file.write_text("team-b\n")
    access = KubeAccess(api.url, api.token)
    plain = EndpointSliceWatcher(ServiceAddress.parse("k8s:drafts:1"), access, namespace_file=str(namespace_file))
    assert plain.namespace == "team-b"
    named = EndpointSliceWatcher(ServiceAddress.parse("k8s:team-c/drafts:1"), access, str(namespace_file))
    assert named.namespace == "team-c"
    assert named.server_name == "drafts.team-c.svc.cluster.local"
    with pytest.raises(ValueError, match="k8s:NAMESPACE/SERVICE:PORT"):
        EndpointSliceWatcher(ServiceAddress.parse("k8s:drafts:1"), access, str(tmp_path / "absent"))


def requests(n: int) -> list[DraftRequest]:
    return [DraftRequest(f"r{i}", [1, 2, 3, 1, 2], 2, SamplingParams()) for i in range(n)]


def test_the_proposer_client_drafts_only_on_ready_endpoints_via_a_local_api_server_stand_in(api):
    proposer = ProposerThread()
    port = proposer.server.port
    api.put(NS, endpoint_slice("p-1", SERVICE, [endpoint("127.0.0.1")], port))
    client = ProposerClient(
        [f"k8s:{SERVICE}:{port}"], deadline_s=2.0, kube=KubeAccess(api.url, api.token, namespace=NS)
    )
    assert client.server_name == f"{SERVICE}.{NS}.svc.cluster.local"

    def becomes(expected: list[str]):
        return asyncio.to_thread(wait_for, lambda: client.watcher.endpoints[1] == expected, 10)

    async def go():
        await becomes([proposer.address])
        drafted = await client.propose(requests(3))
        assert list(client.replicas) == [proposer.address]
        api.put(NS, endpoint_slice("p-1", SERVICE, [endpoint("127.0.0.1", ready=False, terminating=True)], port))
        await becomes([])
        # The next step asks no one: the terminating proposer is gone from the set before it.
        stopped = await client.propose(requests(3))
        assert client.replicas == {}
        api.put(NS, endpoint_slice("p-1", SERVICE, [endpoint("127.0.0.1")], port))
        await becomes([proposer.address])
        again = await client.propose(requests(3))
        await client.close()
        return drafted, stopped, again

    try:
        drafted, stopped, again = asyncio.run(go())
    finally:
        proposer.kill()
    assert [d.token_ids for d in drafted.drafts] == [[3, 1]] * 3
    assert stopped.drafts == [None] * 3 and stopped.failures == 0
    assert [d.token_ids for d in again.drafts] == [[3, 1]] * 3
    assert not client.watcher._thread.is_alive(), "close() leaves the watch running"


def test_a_dns_or_k8s_address_stands_alone():
    for endpoints in (["k8s:p:1", "10.0.0.1:1"], ["10.0.0.1:1", "dns:p:1"]):
        with pytest.raises(ValueError, match="stands alone"):
            ProposerClient(endpoints)


@pytest.mark.parametrize("address", [f"k8s:{SERVICE}:{PORT}", f"k8s:{NS}/{SERVICE}:{PORT}"])
def test_outside_a_cluster_the_k8s_form_fails_at_start(monkeypatch, address):
    """The verifier's --proposer k8s:... goes to the in-cluster API configuration, which a
    process outside a pod does not have: it says so at start instead of serving without drafts."""
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(ConfigException, match="Service host/port is not set"):
        SpeculationConfig(policy="fixed:2", proposer=address).make_proposer(Placement(), 1024)


@pytest.fixture
def in_cluster(tmp_path, monkeypatch):
    """A pod's view of the cluster, emulated: the API server's address in the environment, the
    service account's token, CA and namespace in files, and the API server a local stand-in
    over HTTPS with a certificate from that CA."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    api = KubeApiStandIn(tls=context)
    files = {"token": api.token, "namespace": NS}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    ca.cert_pem.write_to_path(str(tmp_path / "ca.crt"))
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(tmp_path / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tmp_path / "ca.crt"))
    monkeypatch.setattr(endpointslices, "NAMESPACE_FILE", str(tmp_path / "namespace"))
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    yield api
    api.stop()


def generate(verifier, request_id: str):
    request = pb.GenerateRequest(
        request_id=request_id, prompt_token_ids=pb.TokenIds(ids=[1, 2, 3, 1, 2, 3, 1, 2]), max_new_tokens=12
    )
    return list(verifier.stub.Generate(request, timeout=60))[-1]


def test_a_verifier_in_a_pod_drafts_from_the_watched_proposers_via_a_local_api_server_stand_in(in_cluster, make_server):
    """`--proposer k8s:SERVICE:PORT` end to end: the in-cluster configuration, the namespace
    from the service account, drafts from the ready proposer, none once it is terminating,
    and the watch stopped by the verifier's drain."""
    proposer = ProposerThread()
    port = proposer.server.port
    in_cluster.put(NS, endpoint_slice("p-1", SERVICE, [endpoint("127.0.0.1")], port))
    try:
        verifier = make_server(proposer=f"k8s:{SERVICE}:{port}", policy="fixed:3")
        client = verifier.verifier.engine.proposer
        assert client.watcher.namespace == NS
        wait_for(lambda: client.watcher.endpoints[1] == [proposer.address], timeout=10)
        generate(verifier, "before")
        asked = proposer.server.servicer.num_items
        assert asked > 0, "the ready proposer was never asked for drafts"
        in_cluster.put(NS, endpoint_slice("p-1", SERVICE, [endpoint("127.0.0.1", False, True)], port))
        wait_for(lambda: client.watcher.endpoints[1] == [], timeout=10)
        generate(verifier, "after")
        assert proposer.server.servicer.num_items == asked, "a terminating proposer was asked for drafts"
        verifier.close()
        assert not client.watcher._thread.is_alive(), "the drain left the watch running"
    finally:
        proposer.kill()
