"""Verifier autoscaling (k8s/components/autoscaling-hpa, k8s/components/autoscaling-keda) and the
headless Service for clients that balance per call (k8s/components/verifier-headless).

The HorizontalPodAutoscaler validates against the Kubernetes schemas; the KEDA ScaledObject is a
custom resource, checked here field by field against KEDA's ScaledObject CRD (keda.sh/v1alpha1,
the fields every release from 2.10 has) and its Prometheus scaler's metadata. Every metric the
autoscalers and prometheus-adapter's rules name is one the verifier's real registry exports, as
a gauge. No cluster, KEDA, adapter or Prometheus here: what they would compute from these objects
is computed below.
"""

import re

import kubernetes_validate
import pytest
import yaml

from tests.k8s.renders import (
    AUTOSCALING_HPA,
    AUTOSCALING_KEDA,
    BASE,
    OTHER_NAMESPACE,
    VERIFIER_HEADLESS,
    find_kind,
    kustomize_over,
    new_objects,
    real,
    rendered,
    validation_error,
    validation_errors,
)
from tests.k8s.service_metrics import exported, parse, problems
from tests.k8s.test_manifests import (
    GRPC_PORT,
    K8S,
    MIN_KUBERNETES_VERSION,
    NAMESPACE,
    VALIDATED_VERSIONS,
    VERIFIER,
    VERIFIER_LABELS,
    component_container,
    container_port,
    find,
    needs_kubectl,
    startup_budget_s,
)

HPA_RENDERS = ("autoscaling-hpa", "autoscaling-hpa-other")
KEDA_RENDERS = ("autoscaling-keda", "autoscaling-keda-other")
AUTOSCALING_RENDERS = HPA_RENDERS + KEDA_RENDERS
HEADLESS = "smartspec-verifier-headless"
ADAPTER_CONFIG = "smartspec-prometheus-adapter"
ADAPTER_NAMESPACE = "monitoring"

# KEDA's ScaledObject CRD (keda.sh/v1alpha1), releases 2.10 and later: the fields of the objects
# the component uses, and the required ones.
KEDA_SPEC = {"advanced", "cooldownPeriod", "fallback", "idleReplicaCount", "maxReplicaCount", "minReplicaCount",
             "pollingInterval", "scaleTargetRef", "triggers"}  # fmt: skip
KEDA_SPEC_REQUIRED = {"scaleTargetRef", "triggers"}
KEDA_TARGET_REF = {"apiVersion", "kind", "name", "envSourceContainerName"}
KEDA_ADVANCED = {"horizontalPodAutoscalerConfig", "restoreToOriginalReplicaCount"}
KEDA_HPA_CONFIG = {"behavior"}
KEDA_TRIGGER = {"type", "name", "metadata", "metricType", "authenticationRef", "useCachedMetrics"}
KEDA_TRIGGER_REQUIRED = {"type", "metadata"}
KEDA_METRIC_TYPES = {"AverageValue", "Value"}  # what the Prometheus scaler serves
# The Prometheus scaler's trigger metadata (all strings).
PROMETHEUS_METADATA = {"serverAddress", "query", "threshold", "activationThreshold", "namespace", "customHeaders",
                       "ignoreNullValues", "unsafeSsl", "queryParameters", "timeout"}  # fmt: skip
PROMETHEUS_METADATA_REQUIRED = {"serverAddress", "query", "threshold"}
PROMETHEUS_BOOLEANS = {"ignoreNullValues", "unsafeSsl"}
INT32 = 2**31 - 1


def the(objects: list[dict], kind: str) -> dict:
    [obj] = find_kind(objects, kind)
    return obj


def verifier_namespace(objects: list[dict]) -> str:
    return find(objects, "Deployment", VERIFIER)["metadata"]["namespace"]


def quantity(text) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# --- rendering and validation -----------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("version", VALIDATED_VERSIONS)
# In another namespace and on the GPU overlay, the same objects as here (and the GPU overlay's,
# validated by test_manifests.py): validated once.
@pytest.mark.parametrize("name", ("autoscaling-hpa", "autoscaling-keda"))
def test_autoscaling_renders_validate_strictly(name, version):
    objects = new_objects(rendered(name))
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service"} <= kinds and kinds & {"HorizontalPodAutoscaler", "ScaledObject"}, kinds
    errors = validation_errors(objects, version)
    assert not errors, errors


@needs_kubectl
@pytest.mark.parametrize("name", AUTOSCALING_RENDERS)
def test_the_autoscaled_deployment_pins_no_replicas(name):
    """An autoscaler owns the verifier's replica count: a `replicas:` in the manifest would be set
    back at every `kubectl apply`, fighting it. The other Deployments keep theirs."""
    objects = rendered(name)
    base = {d["metadata"]["name"]: d for d in find_kind(rendered("base"), "Deployment")}
    for deployment in find_kind(objects, "Deployment"):
        deployment_name = deployment["metadata"]["name"]
        if deployment_name == VERIFIER:
            assert "replicas" not in deployment["spec"], deployment["spec"].get("replicas")
        else:
            assert deployment["spec"]["replicas"] == base[deployment_name]["spec"]["replicas"]
    # The rest of the verifier's Deployment is the overlay's own.
    under = rendered("gpu" if name.endswith("-other") else "base")
    before = dict(find(under, "Deployment", VERIFIER)["spec"])
    del before["replicas"]
    assert find(objects, "Deployment", VERIFIER)["spec"] == before


@needs_kubectl
@pytest.mark.parametrize("name", AUTOSCALING_RENDERS)
def test_one_autoscaler_on_the_verifiers_in_their_namespace(name):
    objects = rendered(name)
    autoscalers = find_kind(objects, "HorizontalPodAutoscaler") + find_kind(objects, "ScaledObject")
    assert len(autoscalers) == 1, [a["kind"] for a in autoscalers]
    [autoscaler] = autoscalers
    deployment = find(objects, "Deployment", VERIFIER)
    assert autoscaler["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    expected = OTHER_NAMESPACE if name.endswith("-other") else NAMESPACE
    assert deployment["metadata"]["namespace"] == expected
    assert autoscaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": VERIFIER}
    # Scaled by the proposer's or controller's autoscaler too? Only the verifier is.
    others = [d["metadata"]["name"] for d in find_kind(objects, "Deployment") if d["metadata"]["name"] != VERIFIER]
    assert all(name_ not in yaml.safe_dump(autoscaler) for name_ in others)


# --- what they scale on ------------------------------------------------------------------


def verifier_gauges() -> set[str]:
    return {name for name, series in exported()["verifier"].items() if series.family.type == "gauge"}


def hpa_metrics(objects: list[dict]) -> dict[str, float]:
    """Pods metric name -> per-replica target."""
    metrics = {}
    for metric in the(objects, "HorizontalPodAutoscaler")["spec"]["metrics"]:
        assert metric["type"] == "Pods", metric
        target = metric["pods"]["target"]
        assert target["type"] == "AverageValue" and set(target) == {"type", "averageValue"}, target
        metrics[metric["pods"]["metric"]["name"]] = quantity(target["averageValue"])
    return metrics


def keda_metrics(objects: list[dict]) -> dict[str, float]:
    """Gauge summed by each trigger's query -> per-replica threshold."""
    metrics = {}
    for trigger in the(objects, "ScaledObject")["spec"]["triggers"]:
        [selector] = parse(trigger["metadata"]["query"]).selectors
        metrics[selector.metric] = float(trigger["metadata"]["threshold"])
    return metrics


@needs_kubectl
@pytest.mark.parametrize("name", AUTOSCALING_RENDERS)
def test_autoscalers_watch_queue_depth_and_kv_cache_within_what_the_verifier_allows(name):
    objects = rendered(name)
    targets = hpa_metrics(objects) if name in HPA_RENDERS else keda_metrics(objects)
    assert set(targets) == {"smartspec_num_requests_waiting", "smartspec_kv_cache_usage_perc"}
    verifier = real(name, "verifier")["ok"]
    # Scale out before the queue is full: there the verifier turns not-ready and refuses calls.
    assert 1 <= targets["smartspec_num_requests_waiting"] < verifier["max_waiting"] / 4
    # Before admission has to wait on blocks: it keeps the watermark free while others run.
    assert 0.5 <= targets["smartspec_kv_cache_usage_perc"] < 1 - verifier["kv_watermark"] - 0.1


@needs_kubectl
def test_hpa_and_keda_scale_alike():
    """The two components are alternatives: the same targets, bounds and pace."""
    hpa, keda = (
        the(rendered("autoscaling-hpa"), "HorizontalPodAutoscaler"),
        the(rendered("autoscaling-keda"), "ScaledObject"),
    )
    assert hpa_metrics(rendered("autoscaling-hpa")) == keda_metrics(rendered("autoscaling-keda"))
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
        keda["spec"]["minReplicaCount"],
        keda["spec"]["maxReplicaCount"],
    )
    assert hpa["spec"]["behavior"] == keda["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]


@needs_kubectl
@pytest.mark.parametrize("name", AUTOSCALING_RENDERS)
def test_scaling_bounds_and_pace_suit_a_verifier(name):
    objects = rendered(name)
    autoscaler = find_kind(objects, "HorizontalPodAutoscaler") + find_kind(objects, "ScaledObject")
    spec = autoscaler[0]["spec"]
    if autoscaler[0]["kind"] == "ScaledObject":
        low, high = spec["minReplicaCount"], spec["maxReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert "idleReplicaCount" not in spec, "a verifier scaled to zero takes minutes to serve the next request"
    else:
        low, high, behavior = spec["minReplicas"], spec["maxReplicas"], spec["behavior"]
    # A voluntary disruption (a drain, one replica at a time by the budget) leaves one serving.
    pdb = find(objects, "PodDisruptionBudget", VERIFIER)["spec"]
    assert low >= 2 and low - int(pdb["maxUnavailable"]) >= 1
    assert low < high
    # Giving a replica back that is needed again costs a whole start: wait out at least one.
    start = startup_budget_s(component_container(objects, "verifier"))
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= start
    assert all(p["value"] == 1 for p in behavior["scaleDown"]["policies"] if p["type"] == "Pods")
    # The behaviour is autoscaling/v2's HorizontalPodAutoscalerBehavior (KEDA passes it on as is).
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behavior"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": VERIFIER}, "maxReplicas": high, "behavior": behavior},
    }
    for version in VALIDATED_VERSIONS:
        kubernetes_validate.validate(hpa, version, strict=True)


# --- prometheus-adapter -------------------------------------------------------------------


def adapter_rules(objects: list[dict]) -> list[dict]:
    config_map = find(objects, "ConfigMap", ADAPTER_CONFIG)
    assert config_map["metadata"]["namespace"] == ADAPTER_NAMESPACE
    assert set(config_map["data"]) == {"config.yaml"}, "the adapter reads config.yaml (its --config)"
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert set(config) == {"rules"}, "the adapter's config file: rules only (no resource or external rules)"
    return config["rules"]


def go_template(replacement: str) -> str:
    """Go's regexp replacement (`${1}`, `$1`) as Python's."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: rf"\g<{m[1] or m[2]}>", replacement)


def adapter_metric(rule: dict) -> tuple[str, str]:
    """(the series name the rule discovers, the custom metric name it serves), as prometheus-adapter
    names them: the series query's metric name, renamed by name.matches / name.as."""
    [selector] = parse(rule["seriesQuery"]).selectors
    name = rule.get("name", {})
    pattern = re.compile(name.get("matches", r"^(.*)$"))
    assert pattern.search(selector.metric), f"{name} does not match {selector.metric}"
    served = pattern.sub(go_template(name.get("as", "${1}")), selector.metric, count=1)
    return selector.metric, served


@needs_kubectl
@pytest.mark.parametrize("name", HPA_RENDERS)
def test_adapter_rules_serve_the_metrics_the_hpa_asks_for(name):
    objects = rendered(name)
    rules = adapter_rules(objects)
    served = {}
    for rule in rules:
        assert set(rule) <= {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}, rule
        series, metric = adapter_metric(rule)
        served[metric] = series
        selector = parse(rule["seriesQuery"]).selectors[0]
        # Per pod, in the pod's namespace: both labels must be there, and be the objects.
        assert {(label, op, value) for label, op, value in selector.matchers} == {
            ("namespace", "!=", ""),
            ("pod", "!=", ""),
        }
        assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}}
        query = rule["metricsQuery"]
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in query, f"{query} lacks {placeholder}"
        # What the adapter sends for one pod: the placeholders filled in as it fills them.
        filled = query.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'namespace="n",pod=~"p"')
        assert not problems(filled.replace("<<.GroupBy>>", "pod"), "verifier"), filled
    # The HPA's Pods metrics are exactly what the rules serve.
    assert set(hpa_metrics(objects)) == set(served)
    # The adapter's config does not follow the verifiers into another namespace: its rules hold
    # for every namespace.
    assert "smartspec" not in yaml.safe_dump(rules).replace("smartspec_", "")


@needs_kubectl
def test_every_metric_the_autoscalers_name_is_a_gauge_the_verifier_exports():
    named = set()
    for name in HPA_RENDERS:
        named |= set(hpa_metrics(rendered(name)))
        named |= {series for rule in adapter_rules(rendered(name)) for series in adapter_metric(rule)}
    for name in KEDA_RENDERS:
        for trigger in the(rendered(name), "ScaledObject")["spec"]["triggers"]:
            named |= {s.metric for s in parse(trigger["metadata"]["query"]).selectors}
    assert named and named <= verifier_gauges(), sorted(named - verifier_gauges())


# --- KEDA ---------------------------------------------------------------------------------


def assert_int32(value, minimum: int) -> None:
    assert isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= INT32, value


@needs_kubectl
@pytest.mark.parametrize("name", KEDA_RENDERS)
def test_scaled_object_follows_kedas_schema(name):
    scaled = the(rendered(name), "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert KEDA_SPEC_REQUIRED <= set(spec) <= KEDA_SPEC, set(spec) - KEDA_SPEC
    assert set(spec["scaleTargetRef"]) <= KEDA_TARGET_REF and spec["scaleTargetRef"]["name"]
    assert_int32(spec["minReplicaCount"], 0)
    assert_int32(spec["maxReplicaCount"], 1)
    assert_int32(spec["pollingInterval"], 1)
    assert set(spec["advanced"]) <= KEDA_ADVANCED
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) <= KEDA_HPA_CONFIG
    triggers = spec["triggers"]
    assert triggers and len({t["name"] for t in triggers}) == len(triggers), "trigger names must differ"
    for trigger in triggers:
        assert KEDA_TRIGGER_REQUIRED <= set(trigger) <= KEDA_TRIGGER, trigger
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") in KEDA_METRIC_TYPES
        metadata = trigger["metadata"]
        assert PROMETHEUS_METADATA_REQUIRED <= set(metadata) <= PROMETHEUS_METADATA, metadata
        assert all(isinstance(v, str) for v in metadata.values()), "trigger metadata is a map of strings"
        assert float(metadata["threshold"]) > 0
        assert all(metadata[k] in ("true", "false") for k in PROMETHEUS_BOOLEANS & set(metadata))
        # A query that finds nothing (a wrong namespace, no scrape) is an error KEDA reports, not
        # a zero that never scales.
        assert metadata["ignoreNullValues"] == "false"
        assert re.fullmatch(r"https?://[a-z0-9.-]+(:\d+)?", metadata["serverAddress"]), metadata["serverAddress"]


@needs_kubectl
@pytest.mark.parametrize("name", KEDA_RENDERS)
def test_keda_queries_sum_the_verifiers_of_their_namespace(name):
    """With metricType AverageValue KEDA divides the query's value by the replicas: each query sums
    the gauge over this namespace's verifiers, whatever namespace the overlay chose."""
    objects = rendered(name)
    namespace = verifier_namespace(objects)
    for trigger in the(objects, "ScaledObject")["spec"]["triggers"]:
        assert trigger["metricType"] == "AverageValue"
        query = trigger["metadata"]["query"]
        assert not problems(query, "verifier"), problems(query, "verifier")
        assert re.match(r"sum\(", query), query
        [selector] = parse(query).selectors
        assert selector.equals("namespace") == namespace, f"{query} reads namespace {selector.equals('namespace')}"
        assert selector.within[0] == "sum"


@pytest.mark.parametrize("component", [AUTOSCALING_HPA, AUTOSCALING_KEDA, VERIFIER_HEADLESS])
def test_replacements_touch_the_components_own_objects_alone(component):
    """Each target is picked by kind and name: another component's autoscaler (the proposers') in the
    same kustomization is left as it is, whichever is listed first."""
    kustomization = yaml.safe_load((component / "kustomization.yaml").read_text())
    targets = [t for r in kustomization.get("replacements", []) for t in r["targets"]]
    assert targets
    own = {
        doc["metadata"]["name"]
        for f in kustomization.get("resources", [])
        for doc in yaml.safe_load_all((component / f).read_text())
    }
    for target in targets:
        assert set(target["select"]) == {"kind", "name"} and target["select"]["name"] in own, target["select"]


# --- the headless Service ------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", AUTOSCALING_RENDERS)
def test_headless_service_resolves_to_every_ready_verifier(name):
    objects = rendered(name)
    service = find(objects, "Service", HEADLESS)
    spec = service["spec"]
    assert spec["clusterIP"] == "None" and spec.get("type", "ClusterIP") == "ClusterIP"
    assert spec.get("publishNotReadyAddresses", False) is False, "a starting or draining verifier would get calls"
    assert service["metadata"]["namespace"] == verifier_namespace(objects)
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in find_kind(objects, "Deployment")
    }
    selected = {d for d, labels in pods.items() if spec["selector"].items() <= labels.items()}
    assert selected == {VERIFIER} and VERIFIER_LABELS.items() <= spec["selector"].items()
    # No port mapping on a headless Service: clients dial what the pods listen on.
    container = component_container(objects, "verifier")
    for port in spec["ports"]:
        assert port["port"] == container_port(container, port["targetPort"]), port
    assert {p["name"]: p["port"] for p in spec["ports"]}["grpc"] == GRPC_PORT
    # The ClusterIP Service stays, for clients that do not balance themselves.
    assert find(objects, "Service", VERIFIER)["spec"].get("clusterIP") != "None"


@needs_kubectl
def test_headless_service_alone_adds_itself_and_nothing_else():
    objects = kustomize_over(BASE, (VERIFIER_HEADLESS,))
    added = [o for o in new_objects(objects)]
    assert [(o["kind"], o["metadata"]["name"]) for o in added] == [("Service", HEADLESS)]
    for version in VALIDATED_VERSIONS:
        assert not validation_error(added[0], version)


# --- documentation --------------------------------------------------------------------------


def test_readme_tells_what_each_autoscaler_watches_and_needs():
    text = (K8S / "README.md").read_text()
    needles = ("components/autoscaling-hpa", "components/autoscaling-keda", "smartspec_num_requests_waiting",
               "smartspec_kv_cache_usage_perc", "prometheus-adapter", HEADLESS, "edit-last-applied")  # fmt: skip
    for needle in needles:
        assert needle in text, f"k8s/README.md says nothing of {needle}"
    minimum = MIN_KUBERNETES_VERSION.rsplit(".", 1)[0]
    assert re.search(rf"autoscaling-hpa`[^\n]*≥ {re.escape(minimum)}", text), "no minimum version for the HPA"
