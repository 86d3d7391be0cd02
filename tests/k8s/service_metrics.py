"""What the services export to Prometheus, read from their real metric registries, and the metric
names and labels a PromQL expression uses, so the manifests' queries (the dashboard, the autoscalers,
the adapter's rules) can be checked against what exists.

The PromQL reading is a tokenizer and a walk over the expression, not a full parser: enough for
selectors, the functions and aggregations around them, and grouping clauses. Its tests are in
test_dashboard.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache

from prometheus_client.metrics import MetricWrapperBase

# Labels the scrape adds to every series: Prometheus (job, instance), the Prometheus Operator's
# pod discovery (namespace, pod, container, endpoint) and the PodMonitor's relabelling (component).
TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint", "component"})
# The series each metric type exposes, by suffix.
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


@dataclass(frozen=True)
class Family:
    component: str
    name: str
    type: str
    labels: frozenset[str]


@dataclass(frozen=True)
class Series:
    """One series name a component exports: a metric family and which of its parts."""

    family: Family
    suffix: str

    @property
    def labels(self) -> frozenset[str]:
        return self.family.labels | TARGET_LABELS | ({"le"} if self.suffix == "_bucket" else set())


def _families(component: str, owner, registry) -> list[Family]:
    # Label names of the metric objects the service holds: a labelled metric with no child yet has no
    # samples to read them from. prometheus_client keeps them in `_labelnames`.
    declared = {m._name: frozenset(m._labelnames) for m in vars(owner).values() if isinstance(m, MetricWrapperBase)}
    families = []
    for family in registry.collect():
        sampled = frozenset(k for s in family.samples for k in s.labels if k != "le")
        families.append(Family(component, family.name, family.type, declared.get(family.name, frozenset()) | sampled))
    return families


@cache
def exported() -> dict[str, dict[str, Series]]:
    """component -> series name -> Series, from a fresh instance of each service's metrics."""
    from controller_svc.servicer import ControllerMetrics
    from drafting.ngram import NgramBackend
    from proposer_svc.metrics import ProposerMetrics
    from proposer_svc.servicer import ProposerServicer
    from verifier_svc.metrics import Metrics

    verifier, controller = Metrics(), ControllerMetrics()
    # The proposer's collector reads its servicer's counts when scraped: a real servicer, with the
    # backend that needs no model.
    proposer = ProposerMetrics(ProposerServicer(NgramBackend()))
    owners = {"verifier": verifier, "controller": controller, "proposer": proposer}
    result = {}
    for component, owner in owners.items():
        series = {}
        for family in _families(component, owner, owner.registry):
            for suffix in SUFFIXES[family.type]:
                series[family.name + suffix] = Series(family, suffix)
        result[component] = series
    return result


# --- PromQL ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""\s*(?:
      (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<range>\[[^\]]*\])
    | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},])
    )""",
    re.VERBOSE,
)
AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                          "bottomk", "topk", "quantile", "limitk", "limit_ratio"})  # fmt: skip
# Functions whose argument must be a counter (or a histogram's counters).
RATES = frozenset({"rate", "irate", "increase", "resets"})
_GROUPING = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_BINARY = frozenset({"and", "or", "unless", "bool", "atan2"})


@dataclass(frozen=True)
class Selector:
    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)
    within: tuple[str, ...]  # the functions and aggregations around it, outermost first

    def equals(self, label: str) -> str | None:
        return next((v for name, op, v in self.matchers if name == label and op == "="), None)


@dataclass(frozen=True)
class Expression:
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]  # labels of by/without/on/ignoring/group_left/group_right clauses


def tokens(expr: str) -> list[tuple[str, str]]:
    out, position = [], 0
    while position < len(expr.rstrip()):
        match = _TOKEN.match(expr, position)
        assert match and match.end() > position, f"cannot read PromQL at {expr[position:]!r} in {expr!r}"
        out.append((match.lastgroup, match[match.lastgroup]))
        position = match.end()
    return out


def parse(expr: str) -> Expression:
    toks = tokens(expr)
    selectors, grouping, stack = [], set(), []
    i = 0

    def text(j: int) -> str | None:
        return toks[j][1] if j < len(toks) else None

    def labels_in_parens(j: int) -> int:
        """Reads `( a, b )` from j, adding the labels to `grouping`; returns the index after it."""
        assert text(j) == "(", f"expected ( at token {j} of {expr!r}"
        j += 1
        while text(j) != ")":
            kind, value = toks[j]
            assert kind == "ident" or value == ",", f"not a label list in {expr!r}"
            if kind == "ident":
                grouping.add(value)
            j += 1
        return j + 1

    def matchers_in_braces(j: int) -> tuple[tuple[tuple[str, str, str], ...], int]:
        assert text(j) == "{"
        j += 1
        found = []
        while text(j) != "}":
            if text(j) == ",":
                j += 1
                continue
            (kind, label), (_, op), (vkind, value) = toks[j], toks[j + 1], toks[j + 2]
            assert kind == "ident" and op in ("=", "!=", "=~", "!~") and vkind == "string", f"bad matcher in {expr!r}"
            found.append((label, op, value[1:-1]))
            j += 3
        return tuple(found), j + 1

    while i < len(toks):
        kind, value = toks[i]
        if kind == "ident" and value in _GROUPING:
            # group_left and group_right may come without a label list.
            i = labels_in_parens(i + 1) if text(i + 1) == "(" else i + 1
        elif kind == "ident" and value in _BINARY:
            i += 1
        elif kind == "ident" and value == "offset":
            # A duration: numbers and units (5m, 1h30m), read as numbers and names.
            i += 1
            while i + 1 < len(toks) and toks[i][0] == "number" and toks[i + 1][0] == "ident":
                i += 2
        elif kind == "ident" and value in AGGREGATIONS and text(i + 1) != "{":
            i += 1
            if text(i) in ("by", "without"):
                i = labels_in_parens(i + 1)
            assert text(i) == "(", f"{value} without its argument in {expr!r}"
            stack.append(value)
            i += 1
        elif kind == "ident" and text(i + 1) == "(":
            stack.append(value)
            i += 2
        elif kind == "ident" or value == "{":
            metric = value if kind == "ident" else None
            i += 1 if kind == "ident" else 0
            matchers = ()
            if text(i) == "{":
                matchers, i = matchers_in_braces(i)
            names = [v for label, op, v in matchers if label == "__name__" and op == "="]
            metric = metric or (names[0] if names else None)
            assert metric, f"a selector without a metric name in {expr!r}"
            selectors.append(Selector(metric, tuple(m for m in matchers if m[0] != "__name__"), tuple(stack)))
        elif value == "(":
            stack.append("")
            i += 1
        elif value == ")":
            assert stack, f"unbalanced ) in {expr!r}"
            stack.pop()
            i += 1
        else:
            i += 1
    assert not stack, f"unbalanced ( in {expr!r}"
    return Expression(tuple(selectors), frozenset(grouping))


def problems(expr: str, default_component: str | None = None) -> list[str]:
    """What is wrong with `expr` against what the services export: unknown series, labels no series
    of the expression has, a histogram_quantile over anything but histogram buckets, a rate over a
    gauge. A selector's component is its `component="..."` matcher, else `default_component`, else
    the one service that exports the name."""
    found = []
    parsed = parse(expr)
    every = exported()
    available = set(TARGET_LABELS)
    for selector in parsed.selectors:
        component = selector.equals("component") or default_component
        candidates = [every[component]] if component else [s for s in every.values()]
        matches = {s[selector.metric] for s in candidates if selector.metric in s}
        if not matches:
            where = component or "any service"
            found.append(f"{selector.metric}: {where} exports no such series")
            continue
        if len(matches) > 1:
            services = sorted(m.family.component for m in matches)
            found.append(f"{selector.metric} comes from {services}, which mean different things: name the component")
            continue
        series = next(iter(matches))
        for label, _, _ in selector.matchers:
            if label not in series.labels:
                found.append(f"{selector.metric} has no label {label!r}")
        available |= series.labels
        if "histogram_quantile" in selector.within and (series.family.type, series.suffix) != ("histogram", "_bucket"):
            found.append(f"histogram_quantile over {selector.metric}, not a histogram's buckets")
        if RATES & set(selector.within) and series.family.type not in ("counter", "histogram"):
            found.append(f"a rate of {selector.metric}, a {series.family.type}")
    for label in parsed.grouping - available:
        found.append(f"grouping by {label!r}, which no series of the expression has")
    if any("histogram_quantile" in s.within for s in parsed.selectors) and "le" not in parsed.grouping:
        found.append("histogram_quantile over an aggregation that drops `le`")
    return found
