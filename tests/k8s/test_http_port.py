"""The verifier's OpenAI-compatible HTTP API in the manifests: on in every render (the binary leaves
it off), on a container port named `http` that the Services expose and the NetworkPolicies open to
clients as they open gRPC, with readiness still the gRPC health check and the image exposing it.

No cluster here: that the HTTP server answers on the port it is given is tested with the verifier
itself (tests/verifier_svc/test_http.py); here, that every part of the manifests gives it the same port.
"""

import pytest

from tests.k8s import renders
from tests.k8s import test_manifests as manifests
from tests.k8s.test_manifests import (
    EXTRA_RENDERS,
    GRPC_PORT,
    HTTP_PORT,
    KUSTOMIZATIONS,
    VERIFIER,
    component_container,
    config_map_data,
    container_port,
    dockerfile_lines,
    find,
    needs_kubectl,
    reachability,
    service_port,
)

# Every render of the verifier: test_manifests.py's and those of tests/k8s/renders.py.
ALL_RENDERS = sorted(KUSTOMIZATIONS) + sorted(EXTRA_RENDERS) + sorted(renders.RENDERS)
POLICED_RENDERS = (
    "base+network-policies",
    "mtls",
    "other-namespace",
    "autoscaling-hpa-other",
    "autoscaling-keda-other",
)


def real_values(name: str, component: str) -> dict:
    parsed = renders.real(name, component) if name in renders.RENDERS else manifests.real(name, component)
    assert "ok" in parsed, f"{name} {component}: refused by the real parser:\n{parsed['error']}"
    return parsed["ok"]


@needs_kubectl
@pytest.mark.parametrize("name", sorted(set(ALL_RENDERS) - set(EXTRA_RENDERS) | {"other-namespace"}))
def test_the_verifier_serves_http_on_its_named_port(name):
    """The real parser reads the port from the environment: the one the container declares."""
    objects = renders.rendered(name)
    container = component_container(objects, "verifier")
    assert real_values(name, "verifier")["http_port"] == container_port(container, "http") == HTTP_PORT
    # Next to the other ports, in the Deployment (it must agree with containerPorts), not in the ConfigMap.
    env = {e["name"]: e for e in container["env"]}
    assert env["SMARTSPEC_HTTP_PORT"] == {"name": "SMARTSPEC_HTTP_PORT", "value": str(HTTP_PORT)}
    namespace = find(objects, "Deployment", VERIFIER)["metadata"]["namespace"]
    config_map = container["envFrom"][0]["configMapRef"]["name"]
    assert "HTTP_PORT" not in config_map_data(objects, namespace, config_map)
    # The proposers and the controller have no HTTP API.
    for component in ("proposer", "controller"):
        ports = {p["name"] for p in component_container(objects, component)["ports"]}
        assert "http" not in ports and "http_port" not in real_values(name, component)


@needs_kubectl
@pytest.mark.parametrize("name", ALL_RENDERS)
def test_readiness_stays_the_grpc_health_check(name):
    """Both doors share one queue and one drain, which the gRPC health check reports."""
    container = component_container(renders.rendered(name), "verifier")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(container[probe]) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, container[probe]
        assert container[probe]["grpc"]["port"] != HTTP_PORT


@needs_kubectl
@pytest.mark.parametrize("name", ALL_RENDERS)
def test_services_expose_http(name):
    objects = renders.rendered(name)
    assert service_port(objects, VERIFIER, "http", "verifier") == HTTP_PORT
    ports = {p["name"]: p for p in find(objects, "Service", VERIFIER)["spec"]["ports"]}
    assert ports["http"]["appProtocol"] == "http" and ports["http"].get("protocol", "TCP") == "TCP"
    headless = [o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "smartspec-verifier-headless"]
    for service in headless:
        # A headless Service maps no ports: the port is the container's.
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == {"grpc": GRPC_PORT, "http": HTTP_PORT}


@needs_kubectl
@pytest.mark.parametrize("name", POLICED_RENDERS)
def test_network_policies_open_http_to_whoever_may_call_grpc(name):
    table = reachability(renders.rendered(name))

    def callers(port: int) -> set[str]:
        return {source for source, target, port_ in table if target == "verifier" and port_ == f"{port}/TCP"}

    assert callers(HTTP_PORT) == callers(GRPC_PORT) and "client" in callers(HTTP_PORT)
    # Nothing else listens there.
    assert {target for _, target, port in table if port == f"{HTTP_PORT}/TCP"} == {"verifier"}


@needs_kubectl
def test_dockerfile_exposes_every_port_of_every_render():
    [expose] = [line for line in dockerfile_lines() if line.startswith("EXPOSE ")]
    exposed = {int(p) for p in expose.split()[1:]}
    declared = {
        port["containerPort"]
        for name in ALL_RENDERS
        for obj in renders.rendered(name)
        if obj["kind"] == "Deployment"
        for container in obj["spec"]["template"]["spec"]["containers"]
        for port in container.get("ports", [])
    }
    assert HTTP_PORT in declared and declared <= exposed, f"not exposed: {sorted(declared - exposed)}"


def test_readme_tells_how_to_reach_the_http_api():
    text = (manifests.K8S / "README.md").read_text()
    for needle in (f"{HTTP_PORT}:{HTTP_PORT}", "/v1/chat/completions", "SMARTSPEC_HTTP_PORT", f"{HTTP_PORT} (HTTP)"):
        assert needle in text, f"k8s/README.md says nothing of {needle}"
