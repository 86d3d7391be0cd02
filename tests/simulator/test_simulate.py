"""The simulator runs the engine's own step loop, with only the models replaced, and is
deterministic under a seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from controller.policy import Policy
from engine.engine import Engine
from engine.planner import SpecPlanner
from engine.scheduler import Scheduler
from simulator.acceptance import AcceptanceModel, accepted_prefix
from simulator.model import DraftCost
from simulator.run import Workload, simulate

PROFILE = "profiles/h200_transformers_eager.json#llama-7b"


def small(rate: float = 4.0) -> Workload:
    return Workload(rate, num_requests=40, prompt_len=(16, 64), output_len=(16, 48))


def test_the_engine_scheduler_and_planner_are_the_real_ones(profile, monkeypatch):
    """Counts calls into the engine's, scheduler's and planner's own methods: a simulator with
    a copy of any of them would leave these at zero."""
    calls = {"step": 0, "schedule": 0, "plan": 0}
    for cls, name in ((Engine, "step"), (Scheduler, "schedule"), (SpecPlanner, "plan")):
        real = getattr(cls, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(cls, name, counted)
    requests, totals = simulate(profile, small(), Policy.fixed(2), seed=1)
    assert all(r.finish_s is not None for r in requests)
    assert calls["step"] == calls["schedule"] == totals["steps"] > 0
    assert calls["plan"] > 0


def test_a_seed_reproduces_a_run_and_another_seed_does_not(profile):
    def run(seed):
        requests, totals = simulate(profile, small(), Policy.parse("smartspec"), seed=seed)
        return [(r.arrival_s, r.first_token_s, r.finish_s, r.accepted) for r in requests], totals

    assert run(3) == run(3)
    assert run(3)[0] != run(4)[0]


def test_step_times_are_the_profiles_and_outputs_their_lengths(profile, cost):
    """One request alone, no speculation: prefill then one decode step per token, each taking
    what the fitted profile predicts for its shape."""
    work = Workload(1.0, num_requests=1, prompt_len=(32, 32), output_len=(5, 5))
    requests, totals = simulate(profile, work, Policy(), seed=0)
    r = requests[0]
    prefill = float(cost.verify_ms(1, 32, 32))
    decodes = sum(float(cost.verify_ms(1, 1, 32 + i + 1)) for i in range(4))
    assert totals["steps"] == 5 and totals["drafted_tokens"] == 0
    assert r.first_token_s - r.arrival_s == pytest.approx(prefill / 1e3, rel=1e-9)
    assert r.finish_s - r.arrival_s == pytest.approx((prefill + decodes) / 1e3, rel=1e-9)


def test_speculation_pays_when_drafts_are_kept_and_costs_when_they_are_not(profile):
    """The 7B profile verifies a few tokens for about the price of one: with drafts that are
    nearly always kept fixed:3 beats off; with drafts never kept it loses to off."""

    def mean_e2e(policy, mean):
        requests, _ = simulate(profile, small(1.0), Policy.parse(policy), AcceptanceModel(mean, 50.0), seed=2)
        return np.mean([r.finish_s - r.arrival_s for r in requests])

    assert mean_e2e("fixed:3", 0.95) < 0.7 * mean_e2e("off", 0.95)
    assert mean_e2e("fixed:3", 0.0) > mean_e2e("off", 0.0)


def test_acceptance_process_is_a_geometric_prefix():
    rng = np.random.default_rng(0)
    kept = [accepted_prefix(rng, 0.6, 4) for _ in range(20000)]
    # P(m = j) = 0.6^j * 0.4 for j < 4, P(m = 4) = 0.6^4
    for j, want in enumerate([0.4, 0.24, 0.144, 0.0864, 0.1296]):
        assert abs(kept.count(j) / len(kept) - want) < 0.01
    assert accepted_prefix(rng, 1.0, 3) == 3 and accepted_prefix(rng, 0.0, 3) == 0
    rates = [AcceptanceModel(0.7, 20.0).draw_rate(rng) for _ in range(5000)]
    assert abs(np.mean(rates) - 0.7) < 0.01 and 0.05 < np.std(rates) < 0.15
    with pytest.raises(ValueError):
        AcceptanceModel(1.5)


def test_the_cli_writes_the_live_sweeps_points(tmp_path):
    from smartspec.cli import main

    out = tmp_path / "sim.json"
    rc = main(
        ["simulate", "--profile", PROFILE, "--rates", "1,4", "--policies", "off,fixed:2", "--seeds", "2",
         "--num-requests", "20", "--prompt-len", "16:32", "--output-len", "8:16", "--output", str(out)]
    )  # fmt: skip
    assert rc == 0
    data = json.loads(out.read_text())
    assert len(data["points"]) == 2 * 2 * 2 and data["simulated"]["acceptance"]["mean"] == 0.7
    keys = {"rate", "policy", "repeat", "mean_e2e_ms", "p99_e2e_ms", "mean_tpot_ms", "acceptance", "errors"}
    assert all(keys <= set(p) and p["errors"] == 0 for p in data["points"])
    assert (tmp_path / "latency_vs_rate.png").exists()


def test_draft_costs_reach_the_clock(profile):
    work = Workload(1.0, num_requests=1, prompt_len=(32, 32), output_len=(9, 9))
    slow = simulate(profile, work, Policy.fixed(2), AcceptanceModel(0.0), DraftCost(step_ms=50.0), seed=0)[0][0]
    fast = simulate(profile, work, Policy.fixed(2), AcceptanceModel(0.0), DraftCost(step_ms=0.0), seed=0)[0][0]
    # Nothing is ever accepted: the same 8 decode steps, the first six drafting 2 tokens, the
    # seventh 1 (one token of room left), the last none; 50 ms per lockstep draft step.
    assert (slow.finish_s - fast.finish_s) == pytest.approx(0.05 * (6 * 2 + 1), rel=1e-6)
