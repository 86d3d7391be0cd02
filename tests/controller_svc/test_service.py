"""The Controller service over real gRPC: reports in, policy out, admin RPCs, bad input."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import grpc
import pytest
from service_threads import LoopThread

from controller_svc.server import Controller, ControllerConfig
from protocol.serving import from_options
from protocol.v1 import controller_pb2 as pb
from protocol.v1 import controller_pb2_grpc as pb_grpc


@pytest.fixture
def controller():
    loop = LoopThread()
    ctl = Controller(
        from_options(
            ControllerConfig,
            port=0,
            metrics_port=0,
            policy="smartspec:4",
            proposers="10.0.0.1:50061",
            push_interval_s=0.1,
        )
    )
    loop.run(ctl.start())
    channel = grpc.insecure_channel(f"127.0.0.1:{ctl.port}")
    yield ctl, pb_grpc.ControllerStub(channel)
    channel.close()
    loop.run(ctl.stop())
    loop.stop()


def step(i: int, batch: int = 4, k: int = 2, verify_ms: float | None = None) -> pb.StepMetrics:
    tokens = batch * (k + 1)
    return pb.StepMetrics(
        step_id=i,
        batch_size=batch,
        num_batched_tokens=tokens,
        num_kv_tokens=batch * 100,
        proposed=[k] * batch if k else [],
        accepted=[1] * batch if k else [],
        verify_ms=verify_ms or 20.0 + 2.0 * tokens,
        propose_ms=3.0,
        draft_ms=2.5,
        step_ms=30.0,
        emitted_tokens=2 * batch,
        draft_steps=k,
        draft_tokens=k * batch,
        planned_k=[k] * batch,
    )


def reports(n: int, verifier_id: str = "v1", then_wait_s: float = 3.0, sent: threading.Event | None = None):
    """n reports, then the stream stays open like a live verifier's; `sent` is set once all are handed over."""
    for i in range(n):
        yield pb.VerifierReport(
            verifier_id=verifier_id, steps=[step(i * 4 + j, batch=1 + (i + j) % 8, k=j % 4) for j in range(4)]
        )
    if sent is not None:
        sent.set()
    time.sleep(then_wait_s)


def test_connect_gets_the_policy_and_endpoints_then_fitted_updates(controller):
    ctl, stub = controller
    sent = threading.Event()
    call = stub.Connect(reports(30, sent=sent), timeout=20)
    first = next(call)
    assert first.policy.mode == pb.POLICY_MODE_SMARTSPEC and first.policy.k_max == 4
    assert list(first.endpoints.addresses) == ["10.0.0.1:50061"]
    for update in call:  # the periodic push after reports arrived carries a fitted model
        if update.policy.cost_model.num_steps:
            break
    cost = update.policy.cost_model
    assert cost.num_steps > 0 and update.policy.version > first.policy.version
    assert 0.5 < update.policy.acceptance_prior < 0.9  # 1 accepted of 1 or 2 tested per request step
    # Every report counts once it is in: wait for the stream to hand them all over (on busy
    # cores the first fitted update can come before), then for the controller to take them in.
    assert sent.wait(10)
    deadline = time.monotonic() + 10
    while (got := stub.GetPolicy(pb.GetPolicyRequest())).cost_model.num_steps < 120 and time.monotonic() < deadline:
        time.sleep(0.05)
    call.cancel()
    assert got.cost_model.num_steps == 120 and got.cost_model.draft_step_ms > 0


def test_a_disconnected_verifier_is_forgotten_with_its_goodput_series(controller):
    ctl, stub = controller
    sent = threading.Event()
    call = stub.Connect(reports(3, verifier_id="gone", then_wait_s=0.0, sent=sent), timeout=10)
    for _ in call:  # the stream ends when the verifier closes its side
        pass
    assert sent.is_set()
    deadline = time.monotonic() + 10
    while "gone" in ctl.state._recent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "gone" not in ctl.state._recent
    assert ctl.metrics.registry.get_sample_value("smartspec_goodput_tokens_per_second", {"verifier": "gone"}) is None
    assert ctl.state.fitter.num_seen == 12  # what it taught the fits stays
    forgotten = ctl.metrics.registry.get_sample_value
    assert forgotten("smartspec_controller_verifiers_forgotten_total", {"reason": "disconnected"}) == 1
    assert forgotten("smartspec_controller_verifiers_known") == 0


def test_a_silent_verifier_is_forgotten_after_the_idle_timeout(controller):
    """A stream left open by a verifier that stopped reporting (hung, or its reports lost) does
    not keep its state and series for ever; reporting again brings it back."""
    ctl, stub = controller
    sent = threading.Event()
    call = stub.Connect(reports(2, verifier_id="quiet", then_wait_s=5.0, sent=sent), timeout=20)
    next(call)
    assert sent.wait(10)
    deadline = time.monotonic() + 10
    while "quiet" not in ctl.state._recent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ctl.servicer.forget_idle(3600.0) == []
    time.sleep(0.3)
    ctl.config = replace(ctl.config, verifier_idle_s=0.2)  # the periodic push applies it
    while "quiet" in ctl.state._recent and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "quiet" not in ctl.state._recent
    value = ctl.metrics.registry.get_sample_value
    assert value("smartspec_controller_verifiers_forgotten_total", {"reason": "idle"}) == 1
    assert value("smartspec_goodput_tokens_per_second", {"verifier": "quiet"}) is None
    call.cancel()


def test_set_policy_is_pushed_to_connected_verifiers(controller):
    ctl, stub = controller

    call = stub.Connect(reports(0), timeout=10)
    assert next(call).policy.mode == pb.POLICY_MODE_SMARTSPEC
    reply = stub.SetPolicy(pb.SetPolicyRequest(mode=pb.POLICY_MODE_FIXED, k=3))
    assert reply.mode == pb.POLICY_MODE_FIXED and reply.k == 3 and reply.k_max == 4
    pushed = next(call)
    assert pushed.policy.mode == pb.POLICY_MODE_FIXED and pushed.policy.version == reply.version
    kept = stub.SetPolicy(pb.SetPolicyRequest(k_max=6))  # unspecified mode keeps fixed:3
    assert (kept.mode, kept.k, kept.k_max) == (pb.POLICY_MODE_FIXED, 3, 6)
    call.cancel()


@pytest.mark.parametrize(
    "request_,field",
    [
        (pb.SetPolicyRequest(k=9), "k:"),
        (pb.SetPolicyRequest(k_max=-1), "k_max:"),
        (pb.SetPolicyRequest(mode=pb.POLICY_MODE_FIXED), "k:"),
        (pb.SetPolicyRequest(mode=42), "mode:"),
    ],
)
def test_bad_set_policy(controller, request_, field):
    _, stub = controller
    with pytest.raises(grpc.RpcError) as err:
        stub.SetPolicy(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert stub.GetPolicy(pb.GetPolicyRequest()).mode == pb.POLICY_MODE_SMARTSPEC  # nothing changed


@pytest.mark.parametrize(
    "report,field",
    [
        (pb.VerifierReport(steps=[step(0)]), "verifier_id"),
        (pb.VerifierReport(verifier_id="v", steps=[pb.StepMetrics(proposed=[2], accepted=[3])]), "steps[0].accepted"),
        (pb.VerifierReport(verifier_id="v", steps=[pb.StepMetrics(proposed=[2])]), "steps[0].accepted"),
        (pb.VerifierReport(verifier_id="v", steps=[pb.StepMetrics(verify_ms=float("nan"))]), "steps[0].verify_ms"),
    ],
)
def test_bad_reports_end_the_stream_naming_the_field(controller, report, field):
    _, stub = controller
    call = stub.Connect(iter([report]), timeout=10)
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    assert stub.GetPolicy(pb.GetPolicyRequest()).cost_model.num_steps == 0  # nothing ingested
