"""Proposer demand and capacity (controller/demand.py): on steps the real engine recorded, and on
the real engine planning as it runs, k falling to 0 under load and coming back."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from engine_steps import step as engine_step

from controller.cost_model import TOKEN_KNOTS, CostParams
from controller.demand import ProposerDemand
from controller.policy import Policy
from controller.profile import read_step_log
from controller.step import StepRecord

REPO = Path(__file__).resolve().parents[2]
# Steps a verifier logged (--step-log) under `smartspec up` with a real proposer: a draft model,
# and prompt lookup (which proposes fewer tokens than asked when it finds no match).
RECORDED = sorted((REPO / "benchmarks" / "results").glob("simulate_validate_*/steps.jsonl.gz"))


def record(planned=(), proposed=(), draft_ms=0.0, step_ms=10.0, busy_ms=0.0) -> StepRecord:
    return StepRecord(
        batch_size=max(len(planned), 1),
        num_batched_tokens=1,
        num_kv_tokens=1,
        verify_ms=1.0,
        planned_k=tuple(planned),
        drafts=tuple(("", p, 0) for p in proposed),
        draft_ms=draft_ms,
        draft_busy_ms=busy_ms,
        step_ms=step_ms,
    )


class Sums:
    """What the window holds after each step, by brute force over prefix sums of the steps."""

    def __init__(self, steps: list[StepRecord], ends: list[float], window_s: float):
        self.ends, self.window_s = np.array(ends), window_s
        timed = [s.draft_ms > 0 for s in steps]
        proposed = [sum(p for _, p, _ in s.drafts) for s in steps]

        def prefix(values):
            return np.concatenate([[0], np.cumsum(values)])

        self.planned = prefix([sum(s.planned_k) for s in steps])
        self.proposed = prefix(proposed)
        self.timed_tokens = prefix([p if t else 0 for p, t in zip(proposed, timed)])
        self.draft_ms = prefix([s.draft_ms if t else 0.0 for s, t in zip(steps, timed)])

    def at(self, i: int) -> tuple[int, int, int, float]:
        """Sums over the steps that ended in (end_i - window, end_i], steps after i not yet seen."""
        lo = int(np.searchsorted(self.ends, self.ends[i] - self.window_s, side="right"))
        return tuple(v[i + 1] - v[lo] for v in (self.planned, self.proposed, self.timed_tokens, self.draft_ms))


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.parent.name)
def test_rates_over_recorded_steps_are_the_windows_sums(path):
    """Each step fed as it ended: demand is exactly sum(planned_k) / window, served the proposed
    tokens / window, capacity the tokens per second of drafting time over the window ending at the
    latest step that drafted (kept through windows with none), replicas the ceiling at the target
    utilisation."""
    log = read_step_log(str(path))
    window, target = 30.0, 0.7
    demand = ProposerDemand(window, target, min_replicas=1)
    sums = Sums(log.steps, log.ends, window)
    capacity, checked, turned_off, kept = None, 0, 0, 0
    for i, (step, end) in enumerate(zip(log.steps, log.ends)):
        demand.observe("v", [step], end)
        planned, proposed, timed, ms = sums.at(i)
        if step.draft_ms > 0 and timed > 0:
            capacity = 1e3 * timed / ms
        if i % 97:
            continue
        rates = demand.rates(end)
        assert rates.demand_tps == planned / window
        assert rates.served_tps == proposed / window
        if capacity is None:  # nothing drafted yet
            assert rates.capacity_tps is None and rates.replicas_wanted == (None if planned else 1)
            continue
        assert rates.capacity_tps == pytest.approx(capacity, rel=1e-9)
        kept += ms == 0
        if planned:
            assert rates.replicas_wanted == max(1, math.ceil(planned / window / (capacity * target)))
        else:
            assert rates.replicas_wanted == 1
            turned_off += 1
        checked += 1
    assert checked > 50 and capacity > 0
    # The logs hold `off` runs and idle gaps: windows with no demand, capacity carried through them.
    assert turned_off and kept


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.parent.name)
def test_steps_placed_back_from_their_report_by_their_own_durations(path):
    """As the controller receives them: a report every 0.25 s with the steps that ended since the
    previous one. Placed by step_ms back from the report's arrival, a step lands at most one
    report interval after it really ended and never before, so the demand can only gain the steps
    that ended in the interval just before the window; capacity moves by its window's edges."""
    log = read_step_log(str(path))
    window, interval = 30.0, 0.25
    grouped, exact = ProposerDemand(window), ProposerDemand(window)
    ends = np.array(log.ends)
    planned = np.concatenate([[0], np.cumsum([sum(s.planned_k) for s in log.steps])])
    tick, i, capacity_errors = log.ends[0], 0, []
    while i < len(log.steps):
        report = []
        while i < len(log.steps) and log.ends[i] <= tick:
            exact.observe("v", [log.steps[i]], log.ends[i])
            report.append(log.steps[i])
            i += 1
        grouped.observe("v", report, tick)
        a, b = grouped.rates(tick), exact.rates(tick)
        lo, hi = np.searchsorted(ends, [tick - window - interval, tick - window], side="right")
        assert -1e-9 <= a.demand_tps - b.demand_tps <= (planned[hi] - planned[lo]) / window + 1e-9
        assert (a.capacity_tps is None) == (b.capacity_tps is None)
        if b.capacity_tps is not None:
            capacity_errors.append(abs(a.capacity_tps / b.capacity_tps - 1))
        tick += interval
    assert len(capacity_errors) > 1000
    assert max(capacity_errors) < 0.1 and np.percentile(capacity_errors, 95) < 0.01


def test_verifiers_add_up_and_a_forgotten_one_leaves_the_sum():
    demand = ProposerDemand(window_s=10.0, target_utilization=0.5, min_replicas=2)
    # 40 tokens drafted in 100 ms of drafting: 400 tokens per second of a busy replica.
    demand.observe("a", [record([4, 4], [4, 4], draft_ms=20.0)] * 5, arrived=100.0)
    demand.observe("b", [record([8, 0, 2], [8, 2], draft_ms=30.0)] * 2, arrived=100.0)
    rates = demand.rates(100.0)
    assert rates.demand_tps == (40 + 20) / 10.0
    assert rates.served_tps == (40 + 20) / 10.0
    assert rates.capacity_tps == pytest.approx(1e3 * 60 / 160.0)
    assert rates.replicas_wanted == 2  # 6 / (375 * 0.5) rounds up to 1: the minimum
    assert demand.forget("b") and not demand.forget("b")
    assert demand.rates(100.0).demand_tps == 4.0


def test_steps_are_placed_by_their_durations_and_leave_the_window_by_them():
    demand = ProposerDemand(window_s=1.0)
    # Ten steps of 250 ms reported at t = 10: they ended at 7.75, 8.0, ..., 10.0.
    demand.observe("v", [record([1], [1], draft_ms=5.0, step_ms=250.0)] * 10, arrived=10.0)
    assert demand.rates(10.0).demand_tps == 4.0  # those ending in (9.0, 10.0]
    assert demand.rates(10.5).demand_tps == 2.0  # (9.5, 10.5]
    assert demand.rates(11.0).demand_tps == 0.0
    assert demand.rates(11.0).replicas_wanted == 1


def test_capacity_is_kept_through_windows_without_drafting_and_absent_before_any():
    demand = ProposerDemand(window_s=1.0, target_utilization=1.0, min_replicas=0)
    assert demand.rates(0.0).replicas_wanted == 0  # no demand: the minimum, no capacity needed
    # Asked for but never served (every exchange timed out: no drafting time): no capacity yet,
    # so no replica count either.
    demand.observe("v", [record([3, 3], [], draft_ms=0.0)], arrived=1.0)
    rates = demand.rates(1.0)
    assert rates.demand_tps == 6.0 and rates.served_tps == 0.0
    assert rates.capacity_tps is None and rates.replicas_wanted is None
    # Drafting that yields nothing measures nothing either (prompt lookup finding no match).
    demand.observe("v", [record([3], [0], draft_ms=2.0)], arrived=1.1)
    assert demand.rates(1.1).capacity_tps is None
    demand.observe("v", [record([3, 3], [3, 3], draft_ms=3.0)], arrived=1.2)  # 6 tokens in 5 ms
    assert demand.rates(1.2).capacity_tps == pytest.approx(1200.0)
    assert demand.rates(1.2).replicas_wanted == 1  # 15 tokens/s of 1200
    # Speculation off: no drafting in the window, the last capacity stays.
    demand.observe("v", [record([0, 0, 0])], arrived=5.0)
    rates = demand.rates(5.0)
    assert (rates.demand_tps, rates.capacity_tps, rates.replicas_wanted) == (0.0, pytest.approx(1200.0), 0)
    demand.observe("v", [record([8] * 300, [8] * 300)], arrived=6.0)  # 2400 tokens/s, untimed
    assert demand.rates(6.0).replicas_wanted == 2


def test_capacity_counts_every_replicas_drafting_time_when_a_step_spread_over_several():
    """Two replicas each drafted 6 tokens in 5 ms: the step waited 5 ms, the fleet was busy 10."""
    demand = ProposerDemand(window_s=1.0)
    demand.observe("v", [record([3] * 4, [3] * 4, draft_ms=5.0, busy_ms=10.0)], arrived=1.0)
    assert demand.rates(1.0).capacity_tps == pytest.approx(1200.0)  # one replica: 12 tokens / 10 ms
    older = ProposerDemand(window_s=1.0)  # a verifier that reports only the slowest replica's time
    older.observe("v", [record([3] * 4, [3] * 4, draft_ms=5.0)], arrived=1.0)
    assert older.rates(1.0).capacity_tps == pytest.approx(2400.0)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(window_s=0.0), "proposer_window_s"),
        (dict(window_s=float("nan")), "proposer_window_s"),
        (dict(target_utilization=0.0), "proposer_target_utilization"),
        (dict(target_utilization=1.5), "proposer_target_utilization"),
        (dict(min_replicas=-1), "min_proposers"),
    ],
)
def test_bad_settings_are_refused_by_name(settings, message):
    with pytest.raises(ValueError, match=message):
        ProposerDemand(**settings)


# --- the real engine and its planner --------------------------------------------------------

# Verify time flat up to 8 batched tokens, then 10 ms more per token: drafting is nearly free for
# one request and never pays at 16 (each draft token would cost more time than it could yield).
SATURATING = CostParams(
    tuple(20.0 + 10.0 * max(0, t - 8) for t in TOKEN_KNOTS),
    draft_step_ms=0.5,
    draft_ms_per_token=0.05,
    proposer_rtt_ms=0.2,
    num_steps=1000,
)


def record_phases(model, draft, tokenizer, phases: list[tuple[int, int]]) -> list[list[StepRecord]]:
    """Steps of a real engine whose goodput planner plans on SATURATING, drafting with the target as
    its own draft model (every draft accepted): for each (requests in flight, steps) phase, that
    many steps with that many requests running (new ones added, extra ones aborted)."""
    from drafting.draft_model import DraftModelBackend
    from drafting.local import LocalProposer
    from engine.config import CacheConfig, EngineConfig
    from engine.engine import Engine
    from engine.planner import SpecPlanner
    from engine.scheduler import SchedulerConfig
    from runtime.sampler import SamplingParams

    planner = SpecPlanner(Policy.parse("smartspec"))
    planner.apply(planner.policy, SATURATING)
    proposer = LocalProposer(DraftModelBackend(draft, kv_cache_tokens=32768))
    config = EngineConfig(CacheConfig(kv_cache_tokens=32768), SchedulerConfig(), planner.policy)
    engine = Engine(model, tokenizer, config, proposer, planner)
    prompt = tokenizer("a b c d e f").input_ids
    ids, added, recorded = [], 0, []
    for in_flight, steps in phases:
        recorded.append([])
        for _ in range(steps):
            ids = [i for i in ids if engine.get(i) is not None]
            while len(ids) > in_flight:
                engine.abort(ids.pop())
            while len(ids) < in_flight:
                ids.append(f"r{added}")
                added += 1
                engine.add_request(ids[-1], prompt, SamplingParams(max_new_tokens=400))
            engine_step(engine)
            recorded[-1].append(engine.last_step)
    return recorded


def test_demand_follows_the_planner_off_under_load_and_back(tiny_llama_dir, smollm2_tokenizer):
    """One request: the planner drafts, and demand is the window's sum of k. Sixteen: speculation
    does not pay, k = 0 for all, demand 0 and the minimum of replicas, capacity kept. One again:
    drafts come back, and so do demand and replicas.

    The engine's steps are fed as reports on a clock that advances by each step's own duration.
    Their durations vary with the machine, so the window is chosen afterwards: a little shorter
    than the last three steps of the quickest phase, so that at each phase's end it holds that
    phase's steps only. A low target utilisation makes one verifier's demand ask for several
    replicas, so that the fall to the minimum shows."""
    from runtime.models import load_model

    model, draft = load_model(tiny_llama_dir), load_model(tiny_llama_dir)
    # The first steps warm the models up (first forwards are slow, and would set the window).
    phases = record_phases(model, draft, smollm2_tokenizer, [(1, 2), (1, 4), (16, 4), (1, 4)])[1:]
    steps = [s for phase in phases for s in phase]
    phase_of = [p for p, phase in enumerate(phases) for _ in phase]
    ends = np.cumsum([s.step_ms for s in steps]) / 1e3
    lasts = list(np.cumsum([len(phase) for phase in phases]) - 1)
    window = 0.999 * min(ends[last] - ends[last - 3] for last in lasts)
    target = 0.05
    demand = ProposerDemand(window, target, min_replicas=1)

    def capacity_at(i: int) -> tuple[int, float]:
        """(the latest step up to i that drafted, tokens per second of drafting over the window
        that ends with it)."""
        last = max(j for j in range(i + 1) if steps[j].draft_ms > 0)
        timed = [steps[j] for j in range(last + 1) if steps[j].draft_ms > 0 and ends[j] > ends[last] - window]
        return last, 1e3 * sum(p for s in timed for _, p, _ in s.drafts) / sum(s.draft_ms for s in timed)

    checked = []
    for i, (step, end) in enumerate(zip(steps, ends)):
        demand.observe("verifier-0", [step], end)
        if i not in lasts:
            continue
        in_window = [j for j in range(i + 1) if ends[j] > end - window]
        assert {phase_of[j] for j in in_window} == {phase_of[i]}
        planned = sum(sum(steps[j].planned_k) for j in in_window)
        rates = demand.rates(end)
        assert rates.demand_tps == planned / window
        last_drafted, capacity = capacity_at(i)
        assert rates.capacity_tps == pytest.approx(capacity)
        if phase_of[i] == 1:  # sixteen requests
            assert all(len(steps[j].planned_k) == 16 and not any(steps[j].planned_k) for j in in_window)
            assert (rates.demand_tps, rates.served_tps, rates.replicas_wanted) == (0.0, 0.0, 1)
            # Nothing drafted in the window: the capacity of the last window that drafted stays.
            assert ends[last_drafted] <= end - window
        else:
            assert planned > 0 and last_drafted == i
            assert rates.replicas_wanted == max(1, math.ceil(rates.demand_tps / (rates.capacity_tps * target) - 1e-9))
            assert rates.replicas_wanted >= 2
        checked.append(rates)
    assert len(checked) == 3
