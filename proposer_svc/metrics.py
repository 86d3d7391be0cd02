"""Prometheus metrics of a proposer, read from its servicer's counts when scraped."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

_DRAFT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


class ProposerMetrics(Collector):
    def __init__(self, servicer, registry: CollectorRegistry | None = None):
        self.servicer = servicer
        self.registry = registry or CollectorRegistry()
        self.registry.register(self)
        self.exchange = Histogram(
            "smartspec_proposer_exchange_seconds",
            "Time to answer one ProposeRequest (all its items' drafts).",
            buckets=_DRAFT_BUCKETS,
            registry=self.registry,
        )

    def collect(self):
        s = self.servicer
        yield GaugeMetricFamily("smartspec_proposer_states", "Per-request draft states held.", value=len(s.store))
        yield GaugeMetricFamily("smartspec_proposer_streams", "Verifier streams open.", value=len(s.streams))
        evicted = CounterMetricFamily(
            "smartspec_proposer_states_evicted",
            "States dropped other than by release: capacity (least recently used), idle, or owner "
            "(the verifier stream that held them ended).",
            labels=["reason"],
        )
        for reason in ("capacity", "idle", "owner"):
            evicted.add_metric([reason], s.store.evicted[reason])
        yield evicted
        yield CounterMetricFamily("smartspec_proposer_items", "Items answered.", value=s.num_items)
        yield CounterMetricFamily(
            "smartspec_proposer_resyncs", "Items that came with their full context.", value=s.num_resyncs
        )
