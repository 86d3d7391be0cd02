"""smartspec.v1.Controller: batch metrics in, policy and proposer endpoints out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from controller.demand import ProposerDemand
from controller.policy import MAX_K
from controller.state import ControllerState
from protocol.controller import MODE_FROM_PB, policy_to_pb, step_from_pb
from protocol.v1 import controller_pb2 as pb
from protocol.v1 import controller_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


class ProposerDemandCollector(Collector):
    """The proposer fleet's sizing rates (controller/demand.py), computed when scraped so that a
    window that emptied reads as such. Capacity and replicas-wanted have no sample until they are
    known: an autoscaler finding none holds the fleet as it is rather than act on a guess."""

    def __init__(self, demand: ProposerDemand, clock=time.monotonic):
        self.demand, self.clock = demand, clock

    def collect(self):
        rates = self.demand.rates(self.clock())
        window = f"over the last {self.demand.window_s:g} s of steps"
        families = [
            (
                "demand",
                rates.demand_tps,
                f"Draft tokens per second the verifiers' planners asked for (sum of k), {window}.",
            ),
            ("served", rates.served_tps, f"Draft tokens per second the proposers returned, {window}."),
            (
                "capacity",
                rates.capacity_tps,
                "Draft tokens one proposer replica serves per second of its own drafting time (a replica busy "
                f"all the time), over the last {self.demand.window_s:g} s of steps that drafted: kept while none do.",
            ),
        ]
        for name, value, text in families:
            family = GaugeMetricFamily(f"smartspec_proposer_{name}_tokens_per_second", text)
            if value is not None:
                family.add_metric([], value)
            yield family
        wanted = GaugeMetricFamily(
            "smartspec_proposer_replicas_wanted",
            "Proposer replicas for the demand: ceil(demand / (capacity * --proposer-target-utilization)), "
            "at least --min-proposers.",
        )
        if rates.replicas_wanted is not None:
            wanted.add_metric([], rates.replicas_wanted)
        yield wanted


class ControllerMetrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, demand: ProposerDemand | None = None, clock=time.monotonic
    ):
        """`clock`: the time the proposer rates are read at, on the clock reports are stamped with."""
        self.registry = r = registry or CollectorRegistry()
        self.demand = demand or ProposerDemand()
        r.register(ProposerDemandCollector(self.demand, clock))
        self.goodput = Gauge(
            "smartspec_goodput_tokens_per_second",
            "Tokens emitted per second of step time over a verifier's recent steps.",
            ["verifier"],
            registry=r,
        )
        self.chosen_k = Histogram(
            "smartspec_chosen_k",
            "k chosen per request per step, as verifiers report.",
            buckets=tuple(range(MAX_K + 1)),
            registry=r,
        )
        self.cost_error = Gauge(
            "smartspec_cost_model_relative_error",
            "Median absolute relative error of verify-time predictions on live steps.",
            registry=r,
        )
        self.prior = Gauge(
            "smartspec_acceptance_prior", "Global acceptance prior (per tested draft token).", registry=r
        )
        self.verifiers = Gauge("smartspec_connected_verifiers", "Verifiers with an open Connect stream.", registry=r)
        self.known = Gauge("smartspec_controller_verifiers_known", "Verifiers whose recent steps are kept.", registry=r)
        self.forgotten = Counter(
            "smartspec_controller_verifiers_forgotten",
            "Verifiers whose state was dropped: their stream ended (disconnected) or they went silent (idle).",
            ["reason"],
            registry=r,
        )
        self.version = Gauge("smartspec_policy_version", "Version of the policy in force.", registry=r)


# What a step can take, in ms: below a microsecond or beyond an hour it is not a step's time.
# Unbounded values (1e308 is finite) overflow the fit, and one such step would spoil the model
# pushed to every verifier for the fit's whole window.
MIN_REPORTED_MS, MAX_REPORTED_MS = 1e-3, 3.6e6
MAX_REPORTED_COUNT = 1 << 40  # requests, tokens, KV tokens in one step


def check_report(report: pb.VerifierReport) -> None:
    """Raises ValueError naming the first bad field."""
    if not report.verifier_id:
        raise ValueError("verifier_id: required")
    for i, s in enumerate(report.steps):
        where = f"steps[{i}]"
        if len(s.proposed) != len(s.accepted):
            raise ValueError(f"{where}.accepted: {len(s.accepted)} entries for {len(s.proposed)} proposed")
        if any(a < 0 or a > p for p, a in zip(s.proposed, s.accepted)):
            raise ValueError(f"{where}.accepted: each must be in [0, proposed]")
        for name in ("verify_ms", "propose_ms", "draft_ms", "step_ms"):
            value = getattr(s, name)
            if not (value == 0 or MIN_REPORTED_MS <= value <= MAX_REPORTED_MS):  # also refuses NaN
                raise ValueError(
                    f"{where}.{name}: must be 0 or in [{MIN_REPORTED_MS:g}, {MAX_REPORTED_MS:g}], got {value}"
                )
        for name in ("batch_size", "num_batched_tokens", "num_kv_tokens"):
            if not 0 <= getattr(s, name) <= MAX_REPORTED_COUNT:
                raise ValueError(f"{where}.{name}: must be in [0, {MAX_REPORTED_COUNT}]")


class ControllerServicer(pb_grpc.ControllerServicer):
    def __init__(self, state: ControllerState, metrics: ControllerMetrics, endpoints: list[str]):
        self.state = state
        self.metrics = metrics
        self.endpoints = pb.ProposerEndpoints(addresses=endpoints, version=1)
        self._streams: set[asyncio.Queue] = set()

    def broadcast_policy(self) -> None:
        update = pb.ControllerUpdate(policy=policy_to_pb(self.state.snapshot()))
        for queue in self._streams:
            queue.put_nowait(update)
        self.update_gauges()

    def update_gauges(self) -> None:
        snap = self.state.snapshot()
        if not math.isnan(snap.cost.verify_relative_error):
            self.metrics.cost_error.set(snap.cost.verify_relative_error)
        self.metrics.prior.set(snap.acceptance_prior)
        self.metrics.version.set(snap.version)
        self.metrics.verifiers.set(len(self._streams))
        self.metrics.known.set(self.state.verifiers)

    def forget(self, verifier_id: str, reason: str) -> None:
        """Drops what is kept per verifier, its metric labels included."""
        self.metrics.demand.forget(verifier_id)
        if self.state.forget(verifier_id):
            self.metrics.forgotten.labels(reason).inc()
        with contextlib.suppress(KeyError):  # never labelled, or removed already
            self.metrics.goodput.remove(verifier_id)
        self.update_gauges()

    def forget_idle(self, idle_s: float) -> list[str]:
        idle = self.state.idle(time.monotonic(), idle_s)
        for verifier_id in idle:
            log.info("verifier %s silent for over %.0f s: forgotten", verifier_id, idle_s)
            self.forget(verifier_id, "idle")
        return idle

    async def Connect(self, request_iterator, context):
        queue: asyncio.Queue = asyncio.Queue()
        self._streams.add(queue)
        self.update_gauges()
        reader = asyncio.ensure_future(self._read(request_iterator, context))
        get = None
        try:
            yield pb.ControllerUpdate(policy=policy_to_pb(self.state.snapshot()), endpoints=self.endpoints)
            while True:
                get = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    error = reader.result()
                    if error:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
                    return
                yield get.result()
        finally:
            for task in (get, reader):  # a cancelled stream leaves neither pending
                if task is not None:
                    task.cancel()
            self._streams.discard(queue)
            self.update_gauges()

    async def _read(self, request_iterator, context) -> str:
        """Ingests reports until the verifier closes its side; returns an error message or ''."""
        verifier_id = ""
        try:
            async for report in request_iterator:
                try:
                    check_report(report)
                except ValueError as e:
                    return str(e)
                verifier_id = report.verifier_id
                steps = [step_from_pb(s) for s in report.steps]
                now = time.monotonic()
                self.state.ingest(verifier_id, steps, now)
                self.metrics.demand.observe(verifier_id, steps, now)
                for step in steps:
                    for k in step.planned_k:
                        self.metrics.chosen_k.observe(k)
                self.metrics.goodput.labels(verifier_id).set(self.state.goodput(verifier_id))
        except (asyncio.CancelledError, grpc.aio.AioRpcError):
            pass
        finally:
            if verifier_id:
                log.info("verifier %s disconnected", verifier_id)
                self.forget(verifier_id, "disconnected")
        return ""

    async def GetPolicy(self, request, context):
        return policy_to_pb(self.state.snapshot())

    async def SetPolicy(self, request, context):
        if request.mode not in MODE_FROM_PB and request.mode != pb.POLICY_MODE_UNSPECIFIED:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"mode: unknown value {request.mode}")
        try:
            policy = self.state.set_policy(MODE_FROM_PB.get(request.mode), request.k, request.k_max)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        log.info("policy set to %s (version %d)", policy, self.state.version)
        self.broadcast_policy()
        return policy_to_pb(self.state.snapshot())
