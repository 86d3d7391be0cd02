"""Prometheus metrics of the verifier, named as vLLM users already chart them."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "smartspec_time_to_first_token_seconds",
            "Arrival to first generated token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "smartspec_inter_token_latency_seconds",
            "Time between generated tokens.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "smartspec_e2e_request_latency_seconds", "Arrival to finish.", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.step = Histogram(
            "smartspec_step_seconds", "Engine step time by phase.", ["phase"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.running = Gauge("smartspec_num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge("smartspec_num_requests_waiting", "Requests in the waiting queue.", registry=r)
        self.kv_usage = Gauge("smartspec_kv_cache_usage_perc", "Fraction of KV blocks in use (0-1).", registry=r)
        self.goodput = Gauge(
            "smartspec_goodput_tokens_per_second",
            "Tokens emitted per second of engine step time, last step.",
            registry=r,
        )
        self.chosen_k = Gauge("smartspec_chosen_k", "Mean speculation length chosen, last step.", registry=r)
        self.cpu_linear = Gauge(
            "smartspec_cpu_linear_kernel",
            "1 for the product (linear, transposed, packed) the target's CPU linear layers of one weight shape "
            "use over a range of row counts, as chosen at start-up.",
            ["shape", "rows", "kernel"],
            registry=r,
        )
        self.cost_model_error = Gauge(
            "smartspec_cost_model_relative_error",
            "Median absolute relative error of this verifier's verify-time predictions.",
            registry=r,
        )
        self.batch_tokens = Histogram(
            "smartspec_step_batched_tokens",
            "Tokens fed to the target per step.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self.prompt_tokens = Counter("smartspec_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("smartspec_generation_tokens", "Generated tokens.", registry=r)
        self.preemptions = Counter("smartspec_num_preemptions", "Requests preempted for lack of KV blocks.", registry=r)
        self.finished = Counter(
            "smartspec_request_success", "Finished requests by reason.", ["finish_reason"], registry=r
        )
        self.rejected = Counter("smartspec_request_rejected", "Requests refused by status code.", ["code"], registry=r)
        self.draft_tokens = Counter("smartspec_spec_decode_num_draft_tokens", "Draft tokens verified.", registry=r)
        self.accepted_tokens = Counter(
            "smartspec_spec_decode_num_accepted_tokens", "Draft tokens accepted.", registry=r
        )
        self.accepted_per_pos = Counter(
            "smartspec_spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft (0-based).",
            ["position"],
            registry=r,
        )
        self.proposer_failures = Counter(
            "smartspec_proposer_failures",
            "Proposer replicas that failed or timed out in a step (no drafts).",
            registry=r,
        )
        self.cancelled = Counter("smartspec_request_cancelled", "Requests cancelled by their client.", registry=r)

    def serve(self, port: int, host: str = "0.0.0.0"):
        """Serves /metrics over HTTP on its own port; returns (server, thread)."""
        return start_http_server(port, addr=host, registry=self.registry)
