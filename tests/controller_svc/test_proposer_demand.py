"""The proposer fleet's sizing metrics through the real controller: verifiers' Connect streams over
gRPC in, the Prometheus text of its metrics port out."""

from __future__ import annotations

import math
import queue
import time
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_threads import LoopThread

from controller_svc.server import Controller, ControllerConfig
from protocol.serving import from_options
from protocol.v1 import controller_pb2 as pb
from protocol.v1 import controller_pb2_grpc as pb_grpc

DEMAND = "smartspec_proposer_demand_tokens_per_second"
SERVED = "smartspec_proposer_served_tokens_per_second"
CAPACITY = "smartspec_proposer_capacity_tokens_per_second"
WANTED = "smartspec_proposer_replicas_wanted"


@pytest.fixture
def start(unused_tcp_port):
    started = []

    def start(**settings):
        loop = LoopThread()
        config = from_options(ControllerConfig, port=0, metrics_port=unused_tcp_port, policy="smartspec", **settings)
        ctl = Controller(config)
        loop.run(ctl.start())
        channel = grpc.insecure_channel(f"127.0.0.1:{ctl.port}")
        started.append((loop, ctl, channel))
        return ctl, pb_grpc.ControllerStub(channel)

    yield start
    for loop, ctl, channel in started:
        channel.close()
        loop.run(ctl.stop(0))
        loop.stop()


def scrape(ctl) -> tuple[str, dict[str, float]]:
    """The metrics port's text, and the value of each sample without labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{ctl.config.server.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}
    return text, values


def step(planned: list[int], proposed: list[int], draft_ms: float, step_ms: float = 30.0) -> pb.StepMetrics:
    batch = len(planned)
    return pb.StepMetrics(
        batch_size=batch,
        num_batched_tokens=batch + sum(planned),
        num_kv_tokens=100 * batch,
        proposed=proposed,
        accepted=[0] * len(proposed),
        verify_ms=20.0,
        propose_ms=draft_ms + 1.0 if proposed else 0.0,
        draft_ms=draft_ms,
        step_ms=step_ms,
        emitted_tokens=batch,
        draft_steps=max(planned),
        draft_tokens=sum(planned),
        planned_k=planned,
    )


def stream(verifier_id: str, reports: queue.Queue):
    """A verifier's side of Connect: what the test puts in, until None."""
    while (steps := reports.get()) is not None:
        yield pb.VerifierReport(verifier_id=verifier_id, steps=steps)


def wait_for(ctl, name: str, condition, report=None, timeout_s: float = 10.0) -> dict[str, float]:
    """Scrapes until `condition` holds for the sample `name` (or time is up); `report`, if given,
    is called before each scrape, as a verifier keeps reporting."""
    deadline = time.monotonic() + timeout_s
    while True:
        if report is not None:
            report()
        _, values = scrape(ctl)
        if condition(values.get(name)) or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_metrics_sum_the_verifiers_reports_and_drop_a_disconnected_one(start):
    window, target = 30.0, 0.05
    ctl, stub = start(proposer_window_s=window, proposer_target_utilization=target, min_proposers=1)
    text, values = scrape(ctl)
    # Before any report: no demand and so the minimum; no capacity measured, so no sample.
    assert f"# TYPE {CAPACITY} gauge" in text and CAPACITY not in values
    assert (values[DEMAND], values[SERVED], values[WANTED]) == (0.0, 0.0, 1.0)

    first, second = queue.Queue(), queue.Queue()
    calls = [stub.Connect(stream("v1", first), timeout=30), stub.Connect(stream("v2", second), timeout=30)]
    # v1: 12 tokens asked and 10 served per step, 50 ms of drafting; v2: 8 asked, a timeout (no
    # drafting time) on every other step.
    for _ in range(5):
        first.put([step([4, 4, 4], [4, 4, 2], draft_ms=50.0)] * 4)
        second.put([step([8, 0], [8], draft_ms=40.0), step([8, 0], [], draft_ms=0.0)])
    planned, proposed = 5 * (4 * 12 + 2 * 8), 5 * (4 * 10 + 8)
    values = wait_for(ctl, SERVED, lambda v: v == proposed / window)
    capacity = 1e3 * (5 * 4 * 10 + 5 * 8) / (5 * 4 * 50.0 + 5 * 40.0)  # 200 tokens/s
    assert values[SERVED] == proposed / window
    assert values[DEMAND] == planned / window
    assert values[CAPACITY] == pytest.approx(capacity)
    assert values[WANTED] == math.ceil(planned / window / (capacity * target)) == 2

    second.put(None)  # v2 goes: what it asked for leaves the sum
    values = wait_for(ctl, DEMAND, lambda v: v == 5 * 4 * 12 / window)
    assert values[DEMAND] == 5 * 4 * 12 / window and values[SERVED] == 5 * 4 * 10 / window
    assert values[CAPACITY] == pytest.approx(capacity)  # what v2 measured of the proposers stays
    first.put(None)
    for call in calls:
        call.cancel()


def test_speculation_off_under_load_brings_the_minimum_and_drafting_brings_replicas_back(start):
    """The planner turning k to 0 (a large batch) empties the demand within the window: replicas
    wanted fall to --min-proposers, the capacity measured stays. k back above 0: so is demand."""
    window, target, minimum = 1.0, 0.05, 2
    ctl, stub = start(proposer_window_s=window, proposer_target_utilization=target, min_proposers=minimum)
    reports = queue.Queue()
    call = stub.Connect(stream("v", reports), timeout=30)

    def drafting():
        reports.put([step([4] * 8, [4] * 8, draft_ms=100.0)] * 4)

    def loaded():
        reports.put([step([0] * 32, [], draft_ms=0.0)] * 4)  # thirty-two requests, none drafting

    values = wait_for(ctl, WANTED, lambda v: v is not None and v > minimum, drafting)
    light_capacity = values[CAPACITY]
    assert values[DEMAND] > 0 and light_capacity == pytest.approx(320.0)  # 32 tokens per 100 ms
    assert values[WANTED] == math.ceil(values[DEMAND] / (light_capacity * target) - 1e-9) > minimum

    values = wait_for(ctl, DEMAND, lambda v: v == 0, loaded)
    assert (values[DEMAND], values[SERVED], values[WANTED]) == (0.0, 0.0, minimum)
    assert values[CAPACITY] == pytest.approx(light_capacity)

    values = wait_for(ctl, DEMAND, lambda v: v > 0, drafting)
    assert values[WANTED] == math.ceil(values[DEMAND] / (values[CAPACITY] * target) - 1e-9) > minimum
    reports.put(None)
    call.cancel()


@pytest.mark.parametrize(
    "settings,name",
    [
        (dict(proposer_window_s=0.0), "proposer_window_s"),
        (dict(proposer_target_utilization=1.5), "proposer_target_utilization"),
        (dict(min_proposers=-1), "min_proposers"),
    ],
)
def test_bad_sizing_settings_stop_the_controller_at_start(settings, name):
    with pytest.raises(ValueError, match=name):
        Controller(from_options(ControllerConfig, port=0, **settings))
