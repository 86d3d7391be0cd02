"""The endpointslice-discovery component: it renders over the base and the overlays, validates
strictly, points the verifier at the proposer Service's EndpointSlices, and grants the verifier
exactly the API calls its discovery code makes, no more.

The calls are recorded from the real watcher (verifier_svc.endpointslices) run against a local
stand-in for the Kubernetes API server (tests/kube_api_standin.py: no cluster can run here)
through everything it does: the first list, the watch, a 410 Gone and its re-list, the API
server going away and coming back. Rendering needs kubectl (its built-in kustomize), as in
test_manifests.py; no cluster is contacted.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from kube_api_standin import KubeApiStandIn, endpoint, endpoint_slice
from service_threads import wait_for

from tests.k8s.renders import validation_errors
from tests.k8s.test_manifests import (
    COMPONENTS,
    K8S,
    OTHER_NAMESPACE,
    PROPOSER,
    PROPOSER_PORT,
    VALIDATED_VERSIONS,
    VERIFIER,
    container_port,
    find,
    kustomize,
    needs_kubectl,
    proposer_container,
    settings,
    verifier_container,
)
from verifier_svc.endpointslices import EndpointSliceWatcher, KubeAccess, ServiceAddress

DISCOVERY = K8S / "components" / "endpointslice-discovery"
MTLS_OVERLAY = K8S / "overlays" / "mtls"
RBAC_GROUP = "rbac.authorization.k8s.io"


def kustomize_over(resource: Path, namespace: str | None = None) -> list[dict]:
    """`resource` (the base or an overlay) with the component, as a user's overlay would use it."""
    with tempfile.TemporaryDirectory() as root:
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(resource, root)],
            "components": [os.path.relpath(DISCOVERY, root)],
        }
        if namespace:
            kustomization["namespace"] = namespace
        (Path(root) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return kustomize(Path(root))


RENDERS = {
    "base": lambda: kustomize_over(K8S / "base"),
    "gpu": lambda: kustomize_over(K8S / "overlays" / "gpu"),
    "mtls": lambda: kustomize_over(MTLS_OVERLAY),
    "other-namespace": lambda: kustomize_over(K8S / "base", OTHER_NAMESPACE),
}
_rendered: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in _rendered:
        _rendered[name] = RENDERS[name]()
    return _rendered[name]


def namespace_of(objects: list[dict]) -> str:
    return find(objects, "Deployment", VERIFIER)["metadata"]["namespace"]


def calls_of_the_discovery_code(namespace: str) -> set[tuple[str, str, str, str]]:
    """(API group, resource, verb, namespace) of every request the watcher makes, through a
    list, a watch, a 410 Gone and its re-list, and an API server restart."""
    api = KubeApiStandIn(gone_as="event")
    watcher = None
    try:
        api.put(namespace, endpoint_slice("p-1", PROPOSER, [endpoint("10.0.0.1")], PROPOSER_PORT))
        access = KubeAccess(api.url, api.token, namespace=namespace)
        address = ServiceAddress.parse(f"k8s:{PROPOSER}:{PROPOSER_PORT}")
        watcher = EndpointSliceWatcher(address, access, backoff_s=(0.05, 0.2))
        watcher.start()
        wait_for(lambda: api.watching() == 1, timeout=10)
        api.put(namespace, endpoint_slice("p-2", PROPOSER, [endpoint("10.0.0.2")], PROPOSER_PORT))
        wait_for(lambda: len(watcher.endpoints[1]) == 2, timeout=10)
        api.stop()  # gone, and back with the watcher's version compacted away
        api.delete(namespace, "p-1")
        api.compact()
        time.sleep(0.2)
        api.start()
        wait_for(lambda: watcher.endpoints[1] == [f"10.0.0.2:{PROPOSER_PORT}"], timeout=10)
        wait_for(lambda: api.watching() == 1, timeout=10)
    finally:
        if watcher is not None:
            watcher.stop()
        api.stop()
    assert api.verbs() == ["list", "watch", "watch", "list", "watch"], "the scenario did not run as planned"
    assert {c.query.get("labelSelector") for c in api.calls} == {f"kubernetes.io/service-name={PROPOSER}"}
    return {(c.group, c.resource, c.verb, c.namespace) for c in api.calls}


@needs_kubectl
@pytest.mark.parametrize("version", VALIDATED_VERSIONS)
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_every_object_validates_strictly(name, version):
    errors = validation_errors(rendered(name), version)
    assert not errors, f"{name}: {errors}"


@needs_kubectl
def test_the_role_grants_exactly_the_calls_of_the_discovery_code_via_a_local_api_server_stand_in():
    objects = rendered("base")
    namespace = namespace_of(objects)
    rbac = [o for o in objects if o["apiVersion"].startswith(RBAC_GROUP)]
    assert {o["kind"] for o in rbac} == {"Role", "RoleBinding"}, "cluster-wide grants, or none"
    (role,) = [o for o in rbac if o["kind"] == "Role"]
    assert role["metadata"]["namespace"] == namespace
    granted = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, f"resourceNames or URLs: {rule}"
        granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert not any("*" in grant for grant in granted), granted
    calls = calls_of_the_discovery_code(namespace)
    # The service account's namespace file names the pod's namespace: where the Role is.
    assert {c[3] for c in calls} == {namespace}
    used = {c[:3] for c in calls}
    assert used - granted == set(), f"calls the Role does not allow: {used - granted}"
    assert granted - used == set(), f"granted but never called: {granted - used}"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_the_role_goes_to_the_verifier_alone(name):
    objects = rendered(name)
    namespace = namespace_of(objects)
    role = find(objects, "Role", "smartspec-endpointslice-reader")
    binding = find(objects, "RoleBinding", "smartspec-endpointslice-reader")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == namespace
    assert binding["roleRef"] == {"apiGroup": RBAC_GROUP, "kind": "Role", "name": role["metadata"]["name"]}
    pods = {c: find(objects, "Deployment", d)["spec"]["template"]["spec"] for c, d in COMPONENTS.items()}
    account = pods["verifier"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": namespace}]
    service_account = find(objects, "ServiceAccount", account)
    assert service_account["metadata"]["namespace"] == namespace
    # The token is mounted where a pod asks for it, and only the verifier does.
    assert service_account["automountServiceAccountToken"] is False
    assert pods["verifier"]["automountServiceAccountToken"] is True
    for component in ("proposer", "controller"):
        assert pods[component].get("serviceAccountName", "default") == "default", component
        assert pods[component]["automountServiceAccountToken"] is False, component


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_the_verifier_watches_the_proposer_service(name):
    objects = rendered(name)
    namespace = namespace_of(objects)
    env = [e["name"] for e in verifier_container(objects)["env"]]
    assert env.count("SMARTSPEC_PROPOSER") == 1, "the patch added a second SMARTSPEC_PROPOSER"
    address = ServiceAddress.parse(settings(objects, "verifier").proposer)
    service = find(objects, "Service", address.service)
    assert address.service == PROPOSER and address.namespace in (None, namespace)
    assert service["metadata"]["namespace"] == namespace
    # Endpoints are dialled by pod IP on the port named here, the proposers' own.
    assert address.port == service["spec"]["ports"][0]["port"] == container_port(proposer_container(objects), "grpc")
    # Only ready endpoints are listed by the EndpointSlice controller as ready.
    assert service["spec"].get("publishNotReadyAddresses", False) is False


@needs_kubectl
def test_with_mtls_proposers_found_by_ip_are_checked_against_their_service_name():
    objects = rendered("mtls")
    namespace = namespace_of(objects)
    verifier = settings(objects, "verifier")
    assert verifier.tls_ca and verifier.tls_server_name is None
    address = ServiceAddress.parse(verifier.proposer)
    watcher = EndpointSliceWatcher(address, KubeAccess("http://127.0.0.1:9", namespace=namespace))
    # The name the mtls component's certificate must carry (k8s/components/mtls).
    assert watcher.server_name == f"{PROPOSER}.{namespace}.svc.cluster.local"


@needs_kubectl
def test_the_component_follows_the_namespace():
    objects = rendered("other-namespace")
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == OTHER_NAMESPACE, obj["metadata"]
    binding = find(objects, "RoleBinding", "smartspec-endpointslice-reader")
    assert {s["namespace"] for s in binding["subjects"]} == {OTHER_NAMESPACE}
