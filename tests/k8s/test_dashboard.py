"""The Grafana dashboard (k8s/components/monitoring/dashboards/smartspec.json) and the ConfigMap that
hands it to Grafana's sidecar: valid JSON in the shape Grafana provisions, every query over series
the services really export (their real registries), quantiles only over histograms.

No Grafana or Prometheus here: whether the panels draw is not tested, what they ask for is.
"""

import json
import re

import pytest

from tests.k8s.renders import MONITORING, OTHER_NAMESPACE, new_objects, rendered, validation_errors
from tests.k8s.service_metrics import Selector, exported, parse, problems
from tests.k8s.test_manifests import VALIDATED_VERSIONS, find, needs_kubectl

DASHBOARD = MONITORING / "dashboards" / "smartspec.json"
RATE_INTERVAL = "$__rate_interval"
# What the dashboard must show (the panels' titles), each from the series named.
REQUIRED_PANELS = {
    "Goodput": {"smartspec_goodput_tokens_per_second"},
    "Chosen k": {"smartspec_chosen_k", "smartspec_chosen_k_bucket"},
    "Acceptance": {"smartspec_spec_decode_num_accepted_tokens_per_pos_total"},
    "Time to first token": {"smartspec_time_to_first_token_seconds_bucket"},
    "Inter-token latency": {"smartspec_inter_token_latency_seconds_bucket"},
    "End-to-end latency": {"smartspec_e2e_request_latency_seconds_bucket"},
    "Queue": {"smartspec_num_requests_running", "smartspec_num_requests_waiting"},
    "KV cache usage": {"smartspec_kv_cache_usage_perc"},
    "Proposer states": {"smartspec_proposer_states"},
    "Proposer evictions": {"smartspec_proposer_states_evicted_total"},
}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(board: dict) -> list[dict]:
    found = []
    for panel in board["panels"]:
        found.append(panel)
        found += panel.get("panels", [])  # a collapsed row holds its panels
    return found


def queries(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target."""
    return [
        (f"{panel['title']}/{target['refId']}", target["expr"])
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def test_dashboard_is_valid_json_in_the_shape_grafana_provisions():
    board = dashboard()
    assert board["uid"] == "smartspec" and board["title"]
    assert isinstance(board["schemaVersion"], int)
    # Provisioned from a file, `__inputs` (an export's import prompts) are never asked: the data
    # source is a variable the viewer picks, every query uses it.
    assert "__inputs" not in board
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(board):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    # No two panels on the same cell.
    cells = [(x, y) for p in panels(board) for x in range(p["gridPos"]["x"], p["gridPos"]["x"] + p["gridPos"]["w"])
             for y in range(p["gridPos"]["y"], p["gridPos"]["y"] + p["gridPos"]["h"])]  # fmt: skip
    assert len(cells) == len(set(cells)), "panels overlap"


def test_dashboard_shows_what_an_operator_watches():
    by_title = {p["title"]: p for p in panels(dashboard())}
    for title, series in REQUIRED_PANELS.items():
        assert title in by_title, f"no panel {title!r}"
        used = {s.metric for t in by_title[title]["targets"] for s in parse(t["expr"]).selectors}
        assert series <= used, f"{title}: {sorted(series - used)} not shown"
    for title in ("Time to first token", "Inter-token latency", "End-to-end latency"):
        expressions = [t["expr"] for t in by_title[title]["targets"]]
        assert {re.match(r"histogram_quantile\(([\d.]+),", e)[1] for e in expressions} >= {"0.5", "0.9", "0.99"}


@pytest.mark.parametrize(("where", "expr"), queries(dashboard()))
def test_every_query_uses_series_the_services_export(where, expr):
    found = problems(expr)
    assert not found, f"{where}: {expr}\n" + "\n".join(found)
    for selector in parse(expr).selectors:
        # One namespace at a time, and each series from the service that means it.
        assert selector.equals("namespace") == "$namespace", f"{where}: {selector.metric} is not filtered by namespace"
        assert selector.equals("component") in exported(), f"{where}: {selector.metric} names no component"


def test_rates_span_grafanas_rate_interval():
    for where, expr in queries(dashboard()):
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == RATE_INTERVAL, f"{where}: [{window}] (a fixed window misses scrapes at a coarse step)"


def test_variable_queries_use_exported_series():
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        metric, label = match[1], match[2]
        series = [s[metric] for s in exported().values() if metric in s]
        assert series and all(label in s.labels for s in series), f"{variable['name']}: {metric} by {label}"


@needs_kubectl
@pytest.mark.parametrize("name", ["monitoring", "monitoring-other"])
def test_dashboard_config_map_is_for_the_grafana_sidecar(name):
    objects = rendered(name)
    config_map = find(objects, "ConfigMap", "smartspec-dashboard")
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config_map["data"]["smartspec.json"]) == dashboard()
    # Beside the pods it shows, wherever an overlay put them.
    namespace = find(objects, "Deployment", "smartspec-verifier")["metadata"]["namespace"]
    assert (
        config_map["metadata"]["namespace"] == namespace == (OTHER_NAMESPACE if name.endswith("other") else "smartspec")
    )
    # Small enough for `kubectl apply`'s last-applied annotation (256 KiB for all annotations).
    assert len(config_map["data"]["smartspec.json"]) < 128 * 1024


@needs_kubectl
@pytest.mark.parametrize("version", VALIDATED_VERSIONS)
def test_monitoring_objects_validate_strictly(version):
    objects = new_objects(rendered("monitoring"))
    errors = validation_errors(objects, version)
    assert not errors, errors


# --- the PromQL reader ---------------------------------------------------------------------


def test_promql_reader_finds_selectors_and_what_surrounds_them():
    parsed = parse(
        'histogram_quantile(0.9, sum by (le, pod) (rate(a_bucket{component="verifier", code=~"5.."}[5m])))'
        ' / ignoring(pod) group_left sum(b_total offset 1h30m) > bool 0 and on (x) {__name__="c", y!="{}"}'
    )
    assert parsed.selectors == (
        Selector(
            "a_bucket", (("component", "=", "verifier"), ("code", "=~", "5..")), ("histogram_quantile", "sum", "rate")
        ),
        Selector("b_total", (), ("sum",)),
        Selector("c", (("y", "!=", "{}"),), ()),
    )
    assert parsed.grouping == {"le", "pod", "x"}
    # A trailing `by` and a function-less aggregation over a bare name.
    assert parse("sum(x) by (reason)").grouping == {"reason"}
    assert parse("max(y)").selectors == (Selector("y", (), ("max",)),)


def test_promql_checks_catch_what_they_are_for():
    verifier = 'component="verifier"'
    assert not problems(
        f"histogram_quantile(0.5, sum by (le) (rate(smartspec_e2e_request_latency_seconds_bucket{{{verifier}}}[1m])))"
    )
    # A quantile over a gauge, or over a histogram without its buckets.
    assert problems(f"histogram_quantile(0.5, sum by (le) (rate(smartspec_chosen_k_bucket{{{verifier}}}[1m])))")
    assert problems(f"histogram_quantile(0.5, rate(smartspec_e2e_request_latency_seconds_sum{{{verifier}}}[1m]))")
    # The controller's chosen_k is a histogram, the verifier's a gauge; both export a goodput gauge,
    # per verifier over different spans: a name two services export needs its component.
    assert not problems(
        'histogram_quantile(0.5, sum by (le) (rate(smartspec_chosen_k_bucket{component="controller"}[1m])))'
    )
    assert not problems("smartspec_chosen_k")
    assert problems("smartspec_goodput_tokens_per_second")
    assert not problems('smartspec_goodput_tokens_per_second{component="controller", verifier="v"}')
    # Buckets aggregated without `le`, a rate of a gauge, a name no one exports, a label it lacks.
    assert problems(
        f"histogram_quantile(0.5, sum(rate(smartspec_e2e_request_latency_seconds_bucket{{{verifier}}}[1m])))"
    )
    assert problems(f"rate(smartspec_kv_cache_usage_perc{{{verifier}}}[1m])")
    assert problems("smartspec_requests_waiting")
    assert problems(f"sum by (reason) (rate(smartspec_request_success_total{{{verifier}}}[1m]))")
    assert not problems(f"sum by (finish_reason) (rate(smartspec_request_success_total{{{verifier}}}[1m]))")
    # The proposer's collector families (read when scraped), with their labels.
    assert not problems('sum by (reason) (rate(smartspec_proposer_states_evicted_total{component="proposer"}[1m]))')
