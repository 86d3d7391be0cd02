"""Proposer autoscaling (k8s/components/autoscaling-proposers, k8s/components/autoscaling-proposers-keda)
on the controller's smartspec_proposer_replicas_wanted.

The HorizontalPodAutoscaler validates against the Kubernetes schemas; the KEDA ScaledObject, a
custom resource, is checked field by field against KEDA's ScaledObject CRD (the fields
test_autoscaling.py lists). Every metric the autoscalers and the adapter's rule name is a gauge
the controller's real registry exports, and the controller's settings are parsed by the real
`smartspec` parser. No cluster, KEDA, adapter or Prometheus here: what the HPA computes from the
metric is computed below with its own rule, on numbers the real controller exports.
"""

from __future__ import annotations

import math

import pytest
import yaml

from controller.step import StepRecord
from tests.k8s.renders import (
    AUTOSCALING_HPA,
    AUTOSCALING_KEDA,
    BASE,
    COMPONENT_DIR,
    GPU,
    NETWORK_POLICIES,
    find_kind,
    kustomize_over,
    new_objects,
    validation_error,
    validation_errors,
)
from tests.k8s.service_metrics import exported, parse, problems
from tests.k8s.test_autoscaling import (
    ADAPTER_NAMESPACE,
    KEDA_ADVANCED,
    KEDA_HPA_CONFIG,
    KEDA_METRIC_TYPES,
    KEDA_SPEC,
    KEDA_SPEC_REQUIRED,
    KEDA_TARGET_REF,
    KEDA_TRIGGER,
    KEDA_TRIGGER_REQUIRED,
    PROMETHEUS_METADATA,
    PROMETHEUS_METADATA_REQUIRED,
    adapter_metric,
    assert_int32,
    quantity,
)
from tests.k8s.test_manifests import (
    CONTROLLER,
    K8S,
    NAMESPACE,
    OTHER_NAMESPACE,
    PROPOSER,
    VALIDATED_VERSIONS,
    effective,
    find,
    needs_kubectl,
    real_parse,
)

HPA_COMPONENT = COMPONENT_DIR / "autoscaling-proposers"
KEDA_COMPONENT = COMPONENT_DIR / "autoscaling-proposers-keda"
WANTED = "smartspec_proposer_replicas_wanted"
ADAPTER_CONFIG = "smartspec-prometheus-adapter-proposers"

RENDERS = {
    "hpa": lambda: kustomize_over(BASE, (HPA_COMPONENT,)),
    "keda": lambda: kustomize_over(BASE, (KEDA_COMPONENT,)),
    # With the verifiers' autoscaler of the same kind, on the GPU overlay, behind the
    # NetworkPolicies, in another namespace set below (k8s/README.md). The verifiers' component
    # comes first: its replacements select every object of its kind, ours by name.
    "hpa-with-verifiers-other": lambda: kustomize_over(
        GPU, (AUTOSCALING_HPA, HPA_COMPONENT, NETWORK_POLICIES), OTHER_NAMESPACE, namespace_below=True
    ),
    "keda-with-verifiers-other": lambda: kustomize_over(
        GPU, (AUTOSCALING_KEDA, KEDA_COMPONENT, NETWORK_POLICIES), OTHER_NAMESPACE, namespace_below=True
    ),
}
# Each render without the proposers' component, to compare with.
RENDERS_WITHOUT = {
    "hpa": lambda: kustomize_over(BASE),
    "keda": lambda: kustomize_over(BASE),
    "hpa-with-verifiers-other": lambda: kustomize_over(
        GPU, (AUTOSCALING_HPA, NETWORK_POLICIES), OTHER_NAMESPACE, namespace_below=True
    ),
    "keda-with-verifiers-other": lambda: kustomize_over(
        GPU, (AUTOSCALING_KEDA, NETWORK_POLICIES), OTHER_NAMESPACE, namespace_below=True
    ),
}
HPA_RENDERS = ("hpa", "hpa-with-verifiers-other")
KEDA_RENDERS = ("keda", "keda-with-verifiers-other")
_rendered: dict[tuple[str, bool], list[dict]] = {}


def rendered(name: str, without: bool = False) -> list[dict]:
    """A render of RENDERS, or (`without`) the same without the proposers' component."""
    if (name, without) not in _rendered:
        _rendered[name, without] = (RENDERS_WITHOUT if without else RENDERS)[name]()
    return _rendered[name, without]


_controller: dict[str, dict] = {}


def controller_settings(name: str) -> dict:
    """The controller's settings in a render, as the real `smartspec controller` parses them."""
    if not _controller:
        names = sorted(RENDERS)
        cases = [(c.args, c.env) for c in (effective(rendered(n), "controller") for n in names)]
        for n, parsed in zip(names, real_parse(cases), strict=True):
            assert "ok" in parsed, parsed.get("error")
            _controller[n] = parsed["ok"]
    return _controller[name]


def autoscaler(objects: list[dict]) -> dict:
    """The one autoscaler on the proposers."""
    found = [
        o
        for o in find_kind(objects, "HorizontalPodAutoscaler") + find_kind(objects, "ScaledObject")
        if o["spec"]["scaleTargetRef"]["name"] == PROPOSER
    ]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def bounds_and_behavior(scaler: dict) -> tuple[int, int, dict]:
    spec = scaler["spec"]
    if scaler["kind"] == "ScaledObject":
        return (
            spec["minReplicaCount"],
            spec["maxReplicaCount"],
            spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
        )
    return spec["minReplicas"], spec["maxReplicas"], spec["behavior"]


def adapter_rules(objects: list[dict]) -> list[dict]:
    config_map = find(objects, "ConfigMap", ADAPTER_CONFIG)
    assert config_map["metadata"]["namespace"] == ADAPTER_NAMESPACE
    assert set(config_map["data"]) == {"config.yaml"}, "the adapter reads config.yaml (its --config)"
    config = yaml.safe_load(config_map["data"]["config.yaml"])
    assert set(config) == {"externalRules"}, "external rules only: they combine with the verifiers' `rules`"
    return config["externalRules"]


def hpa_external_average_value(usage: float, average_value: float, current: int, low: int, high: int) -> int:
    """The replicas an HPA wants for one External metric with an AverageValue target, as
    Kubernetes' replica calculator computes them (GetExternalPerPodMetricReplicas: the current
    count within its default 10% tolerance, else ceil(usage / target)), within the bounds."""
    wanted = current
    if abs(1.0 - usage / (average_value * current)) > 0.1:
        wanted = math.ceil(usage / average_value)
    return min(max(wanted, low), high)


# --- rendering and validation -----------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("version", VALIDATED_VERSIONS)
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_renders_validate_strictly(name, version):
    objects = new_objects(rendered(name))
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "ConfigMap"} <= kinds and kinds & {"HorizontalPodAutoscaler", "ScaledObject"}, kinds
    errors = validation_errors(objects, version)
    assert not errors, errors


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_one_autoscaler_on_the_proposers_in_their_namespace_and_they_pin_no_replicas(name):
    objects = rendered(name)
    scaler = autoscaler(objects)
    deployment = find(objects, "Deployment", PROPOSER)
    namespace = OTHER_NAMESPACE if name.endswith("-other") else NAMESPACE
    assert scaler["metadata"]["namespace"] == deployment["metadata"]["namespace"] == namespace
    assert scaler["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": PROPOSER}
    assert "replicas" not in deployment["spec"]
    # The rest of the proposers' Deployment is the overlay's own.
    before = dict(find(rendered(name, without=True), "Deployment", PROPOSER)["spec"])
    del before["replicas"]
    assert deployment["spec"] == before


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_the_controller_stays_one_and_only_its_settings_change(name):
    """One controller, replaced not rolled (Recreate): a second would take half the verifiers'
    reports and push its own policy. The components change its ConfigMap's keys, nothing else."""
    objects, under = rendered(name), rendered(name, without=True)
    controller = find(objects, "Deployment", CONTROLLER)
    assert controller["spec"]["replicas"] == 1 and controller["spec"]["strategy"] == {"type": "Recreate"}
    assert not [o for o in find_kind(objects, "HorizontalPodAutoscaler") + find_kind(objects, "ScaledObject")
                if o["spec"]["scaleTargetRef"]["name"] == CONTROLLER]  # fmt: skip
    before = find(under, "Deployment", CONTROLLER)

    def without_config_map(deployment):
        text = yaml.safe_dump(deployment["spec"])
        for source in deployment["spec"]["template"]["spec"]["containers"][0]["envFrom"]:
            text = text.replace(source["configMapRef"]["name"], "<config>")
        return text

    assert without_config_map(controller) == without_config_map(before)
    added = set(effective(objects, "controller").env.items()) - set(effective(under, "controller").env.items())
    assert {k for k, _ in added} == {"SMARTSPEC_MIN_PROPOSERS", "SMARTSPEC_PROPOSER_TARGET_UTILIZATION",
                                     "SMARTSPEC_PROPOSER_WINDOW_S"}  # fmt: skip


# --- what they scale on -------------------------------------------------------------------


def controller_gauges() -> set[str]:
    return {name for name, series in exported()["controller"].items() if series.family.type == "gauge"}


def named_metrics(name: str) -> set[str]:
    objects = rendered(name)
    scaler = autoscaler(objects)
    if scaler["kind"] == "ScaledObject":
        return {s.metric for t in scaler["spec"]["triggers"] for s in parse(t["metadata"]["query"]).selectors}
    named = {m["external"]["metric"]["name"] for m in scaler["spec"]["metrics"]}
    return named | {series for rule in adapter_rules(objects) for series in adapter_metric(rule)}


@needs_kubectl
def test_every_metric_named_is_a_gauge_the_controller_exports():
    named = set().union(*(named_metrics(name) for name in RENDERS))
    assert named == {WANTED} and named <= controller_gauges(), sorted(named - controller_gauges())


@needs_kubectl
@pytest.mark.parametrize("name", HPA_RENDERS)
def test_the_hpa_wants_the_controllers_number(name):
    """An External metric with an AverageValue of 1: the HPA wants ceil(value / 1) replicas,
    whatever the current count, once it is more than its 10% tolerance away."""
    scaler = autoscaler(rendered(name))
    [metric] = scaler["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"] == {"name": WANTED}
    target = metric["external"]["target"]
    assert target["type"] == "AverageValue" and set(target) == {"type", "averageValue"}
    assert quantity(target["averageValue"]) == 1
    low, high, _ = bounds_and_behavior(scaler)
    for wanted in range(low, high + 1):
        for current in (low, high):
            got = hpa_external_average_value(wanted, quantity(target["averageValue"]), current, low, high)
            assert got == wanted or abs(1 - wanted / current) <= 0.1, (wanted, current, got)


@needs_kubectl
@pytest.mark.parametrize("name", HPA_RENDERS)
def test_adapter_rule_serves_the_controllers_gauge_per_namespace(name):
    objects = rendered(name)
    [rule] = adapter_rules(objects)
    assert set(rule) <= {"seriesQuery", "seriesFilters", "resources", "name", "metricsQuery"}, rule
    series, served = adapter_metric(rule)
    assert series == served == WANTED
    selector = parse(rule["seriesQuery"]).selectors[0]
    assert selector.matchers == (("namespace", "!=", ""),)
    # The adapter adds namespace="<the HPA's namespace>": each installation reads its controller.
    assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}}}
    query = rule["metricsQuery"]
    assert "<<.Series>>" in query and "<<.LabelMatchers>>" in query
    filled = query.replace("<<.Series>>", series).replace("<<.LabelMatchers>>", 'namespace="n"')
    assert not problems(filled, "controller"), problems(filled, "controller")
    # One value: the HPA adds up every series an external metric returns.
    assert parse(filled).selectors[0].within == ("max",)
    # With the verifiers' adapter rules too, both configurations make one: different keys.
    if name == "hpa-with-verifiers-other":
        verifiers = yaml.safe_load(find(objects, "ConfigMap", "smartspec-prometheus-adapter")["data"]["config.yaml"])
        ours = yaml.safe_load(find(objects, "ConfigMap", ADAPTER_CONFIG)["data"]["config.yaml"])
        assert not set(verifiers) & set(ours)


# --- KEDA ---------------------------------------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", KEDA_RENDERS)
def test_scaled_object_follows_kedas_schema_and_queries_this_namespaces_controller(name):
    objects = rendered(name)
    scaled = autoscaler(objects)
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert KEDA_SPEC_REQUIRED <= set(spec) <= KEDA_SPEC, set(spec) - KEDA_SPEC
    assert set(spec["scaleTargetRef"]) <= KEDA_TARGET_REF
    assert_int32(spec["minReplicaCount"], 1)  # never to zero
    assert_int32(spec["maxReplicaCount"], 1)
    assert_int32(spec["pollingInterval"], 1)
    assert "idleReplicaCount" not in spec
    assert set(spec["advanced"]) <= KEDA_ADVANCED
    assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) <= KEDA_HPA_CONFIG
    [trigger] = spec["triggers"]
    assert KEDA_TRIGGER_REQUIRED <= set(trigger) <= KEDA_TRIGGER, trigger
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue" in KEDA_METRIC_TYPES
    metadata = trigger["metadata"]
    assert PROMETHEUS_METADATA_REQUIRED <= set(metadata) <= PROMETHEUS_METADATA, metadata
    assert all(isinstance(v, str) for v in metadata.values())
    # AverageValue 1: KEDA's HPA wants ceil(value / 1), the controller's number.
    assert float(metadata["threshold"]) == 1
    # No series (the controller not scraped, or no capacity measured yet) is an error and the
    # replicas stay: not a zero.
    assert metadata["ignoreNullValues"] == "false"
    query = metadata["query"]
    assert not problems(query, "controller"), problems(query, "controller")
    [selector] = parse(query).selectors
    assert selector.metric == WANTED and selector.within == ("max",)
    assert selector.equals("namespace") == find(objects, "Deployment", PROPOSER)["metadata"]["namespace"]


@needs_kubectl
def test_hpa_and_keda_scale_alike():
    hpa, keda = autoscaler(rendered("hpa")), autoscaler(rendered("keda"))
    assert bounds_and_behavior(hpa) == bounds_and_behavior(keda)
    assert named_metrics("keda") <= named_metrics("hpa")


# --- bounds, pace, and the controller's side ------------------------------------------------


@needs_kubectl
@pytest.mark.parametrize("name", sorted(RENDERS))
def test_bounds_and_pace_agree_with_the_controller(name):
    objects = rendered(name)
    low, high, behavior = bounds_and_behavior(autoscaler(objects))
    controller = controller_settings(name)
    # With no demand the controller asks for MIN_PROPOSERS: the autoscaler's floor is the same.
    assert low == controller["min_proposers"] >= 1 and low < high
    assert 0 < controller["proposer_target_utilization"] <= 1
    # A restarted controller's window reads low until it refills: that must not shrink the fleet.
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 2 * controller["proposer_window_s"]
    assert all(p["value"] == 1 for p in behavior["scaleDown"]["policies"] if p["type"] == "Pods")
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] <= controller["proposer_window_s"]
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "behavior"},
        "spec": {"scaleTargetRef": {"kind": "Deployment", "name": PROPOSER}, "maxReplicas": high, "behavior": behavior},
    }
    for version in VALIDATED_VERSIONS:
        assert not validation_error(hpa, version)


@needs_kubectl
@pytest.mark.parametrize("name", HPA_RENDERS)
def test_the_deployed_controller_exports_what_the_hpa_acts_on(name):
    """The controller as configured in the render (its parsed settings), fed steps at a known
    demand and capacity: the replicas it exports are what the HPA then wants; with speculation
    off, the HPA's floor."""
    from controller.demand import ProposerDemand
    from controller_svc.servicer import ControllerMetrics

    settings = controller_settings(name)
    window = settings["proposer_window_s"]
    demand = ProposerDemand(window, settings["proposer_target_utilization"], settings["min_proposers"])
    now = [100.0]
    metrics = ControllerMetrics(demand=demand, clock=lambda: now[0])
    low, high, _ = bounds_and_behavior(autoscaler(rendered(name)))
    # Four verifiers, each asking for 8 tokens a step, 10 steps a second; 8 tokens drafted in
    # 40 ms: 200 tokens/s a replica.
    step = StepRecord(batch_size=4, num_batched_tokens=12, num_kv_tokens=400, verify_ms=20.0,
                      planned_k=(2, 2, 2, 2), drafts=(("", 2, 1),) * 4, draft_ms=40.0, step_ms=100.0)  # fmt: skip
    for v in range(4):
        demand.observe(f"v{v}", [step] * round(10 * window), arrived=now[0])
    wanted = metrics.registry.get_sample_value(WANTED)
    expected = math.ceil(4 * 80.0 / (200.0 * settings["proposer_target_utilization"]))
    assert metrics.registry.get_sample_value("smartspec_proposer_demand_tokens_per_second") == 4 * 80.0
    assert wanted == expected > low
    assert hpa_external_average_value(wanted, 1, current=low, low=low, high=high) == expected
    # Then a window of large batches with speculation off.
    off = StepRecord(batch_size=64, num_batched_tokens=64, num_kv_tokens=6400, verify_ms=60.0,
                     planned_k=(0,) * 64, step_ms=100.0)  # fmt: skip
    now[0] += window
    for v in range(4):
        demand.observe(f"v{v}", [off] * round(10 * window), arrived=now[0])
    wanted = metrics.registry.get_sample_value(WANTED)
    assert metrics.registry.get_sample_value("smartspec_proposer_demand_tokens_per_second") == 0
    assert wanted == low and hpa_external_average_value(wanted, 1, current=expected, low=low, high=high) == low


# --- documentation --------------------------------------------------------------------------


def test_readme_tells_what_the_proposer_autoscaler_watches():
    text = (K8S / "README.md").read_text()
    section = text[text.index("## Proposer autoscaling") :]
    for needle in ("components/autoscaling-proposers", "components/autoscaling-proposers-keda", WANTED,
                   "smartspec_proposer_demand_tokens_per_second", "smartspec_proposer_capacity_tokens_per_second",
                   "MIN_PROPOSERS", "PROPOSER_TARGET_UTILIZATION", "PROPOSER_WINDOW_S", ADAPTER_CONFIG,
                   "singleton", "externalRules"):  # fmt: skip
        assert needle in section, f"k8s/README.md's proposer autoscaling section says nothing of {needle}"
