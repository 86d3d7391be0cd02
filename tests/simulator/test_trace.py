"""Live runs as simulator input: step logs, traced rounds, replayed workloads."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from controller.profile import StepLog, load_profile, read_step_log, step_line
from controller.step import StepRecord
from engine.config import CacheConfig
from engine.scheduler import SchedulerConfig
from simulator.acceptance import RequestProcess, TraceAcceptance
from simulator.run import Replay, run_now, simulate
from simulator.trace import acceptance, empty_contexts, fit_step_log, host_ms, replays, request_process


def test_a_requests_rates_per_position_come_from_its_rounds():
    # (k, proposed, accepted): all 3 kept; 1 of 3 kept; nothing offered.
    p = request_process([(3, 3, 3), (3, 3, 1), (3, 0, 0)])
    # Tested per position: 2, 2, 1; kept: 2, 1, 1; overall 4/5, two pseudo-trials of it each.
    assert p.rates == pytest.approx(((2 + 1.6) / 4, (1 + 1.6) / 4, (1 + 1.6) / 3))


def test_contexts_without_a_draft_are_read_off_a_fixed_k_run():
    # Prompt of 10: the first round starts at 11 tokens; each round adds its accepted + 1.
    rounds = [(2, 0, 0), (1, 1, 1), (2, 2, 0), (2, 0, 0), (1, 0, 0)]
    assert empty_contexts(10, rounds) == {11, 15, 16}


def test_the_proposer_offers_nothing_where_the_trace_found_no_match():
    from runtime.draft import DraftRequest
    from runtime.sampler import SamplingParams
    from simulator.clock import VirtualClock
    from simulator.model import DraftCost, ProposerPool, SimProposer

    processes = {"a": RequestProcess((0.5,), frozenset({4}))}
    proposer = SimProposer(ProposerPool(DraftCost()), VirtualClock(), processes)

    def offered(context: int) -> int:
        request = DraftRequest("a", [1] * context, 3, SamplingParams(max_new_tokens=8))
        (draft,) = run_now(proposer.propose([request])).drafts
        return len(draft.token_ids)

    assert [offered(c) for c in (3, 4, 5)] == [3, 0, 3]


def test_position_rates_drive_the_accepted_prefix():
    rng = np.random.default_rng(0)
    p = RequestProcess((1.0, 0.0))
    assert {p.accepted(rng, k) for k in (1, 2, 5) for _ in range(50)} == {1}
    half = RequestProcess((0.5,))
    mean = np.mean([half.accepted(rng, 3) for _ in range(20000)])
    assert mean == pytest.approx(0.5 + 0.25 + 0.125, abs=0.02)


def sweep_with(rounds_by_point: dict) -> dict:
    points = []
    for (rate, policy, repeat), per_request in rounds_by_point.items():
        requests = [
            {"send_s": 0.5 * i, "prompt_tokens": 10 + i, "completion_tokens": 8, "rounds": r, "error": None}
            for i, r in enumerate(per_request)
        ]
        points.append({"rate": rate, "policy": policy, "repeat": repeat, "requests": requests})
    return {"points": points}


def test_acceptance_pools_a_requests_rounds_over_the_points_of_its_repetition():
    sweep = sweep_with(
        {
            (1.0, "off", 0): [[], []],
            (1.0, "fixed:1", 0): [[(1, 1, 1)], [(1, 0, 0)]],
            (2.0, "fixed:1", 0): [[(1, 1, 0)], []],
            (1.0, "fixed:1", 1): [[(1, 1, 1)] * 9, [(1, 1, 1)]],
        }
    )
    trace = acceptance(sweep, 0)
    assert isinstance(trace, TraceAcceptance) and len(trace.processes) == 2
    assert trace.processes[0].rates == pytest.approx(((1 + 2 * 0.5) / (2 + 2),))
    # Never drafted for: the mean rate, and the context where nothing was on offer (prompt 11 + 1).
    assert trace.processes[1] == RequestProcess((trace.processes[0].rates[0],), frozenset({12}))
    assert trace.processes[0].no_match == frozenset()
    assert acceptance(sweep, 1).processes[0].rates[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no drafted rounds"):
        acceptance(sweep_with({(1.0, "off", 0): [[]]}), 0)


def test_replays_keep_each_points_successful_requests_as_sent():
    sweep = sweep_with({(1.0, "off", 0): [[], []]})
    sweep["points"][0]["requests"][1]["error"] = "UNAVAILABLE"
    replay = replays(sweep)[(1.0, "off", 0)]
    assert replay == Replay(1.0, ((0.0, 10, 8),))


def record(b: int, tokens: int, verify: float, **kw) -> StepRecord:
    return StepRecord(batch_size=b, num_batched_tokens=tokens, num_kv_tokens=100 * b, verify_ms=verify, **kw)


def test_a_step_log_round_trips_and_is_a_profile(tmp_path):
    steps = [
        record(2, 6, 12.5, planned_k=(2, 2), drafts=(("a", 2, 1), ("b", 2, 2)), propose_ms=3.0, draft_ms=2.0),
        record(1, 1, 9.0, step_ms=10.0),
    ]
    path = tmp_path / "steps.jsonl"
    config = {"cache": {"block_size": 16, "kv_cache_tokens": 4096}, "scheduler": {"max_num_seqs": 8}}
    path.write_text(
        json.dumps({"config": config}) + "\n" + "\n".join(step_line(s, 5.0 + i) for i, s in enumerate(steps))
    )
    log = read_step_log(str(path))
    assert log.steps == steps and log.ends == [5.0, 6.0] and log.config == config
    assert load_profile(str(path)) == steps
    packed = tmp_path / "steps.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert read_step_log(str(packed)) == log


def test_fit_takes_the_targets_cost_the_drafts_cost_and_the_hosts_work_from_the_log():
    rng = np.random.default_rng(0)
    steps, ends, t = [], [], 0.0
    for _ in range(300):
        b, k = int(rng.integers(1, 9)), int(rng.integers(0, 4))
        tokens = b * (1 + k)
        verify = 10.0 + 0.5 * tokens
        draft = 2.0 * k + 0.1 * b * k
        propose = draft + 1.5 if k else 0.0
        step = verify + propose + 0.4
        steps.append(record(b, tokens, verify, planned_k=(k,) * b, propose_ms=propose, draft_ms=draft, step_ms=step))
        t += (step + 0.6) / 1e3  # 0.6 ms between steps
        ends.append(t)
    config = {"cache": {"block_size": 16, "kv_cache_tokens": 8192}, "scheduler": {"max_num_seqs": 8}}
    fit = fit_step_log(StepLog(config, steps, ends), deadline_ms=100.0)
    assert float(fit.cost.verify_ms(4, 8, 400)) == pytest.approx(14.0, rel=0.05)
    assert (fit.draft.step_ms, fit.draft.per_token_ms) == pytest.approx((2.0, 0.1), rel=0.05)
    assert fit.draft.hop_ms == pytest.approx(1.5) and fit.draft.deadline_ms == 100.0
    assert fit.host_ms == pytest.approx(0.4 + 0.6, rel=1e-3)
    assert fit.cache == CacheConfig(16, 8192) and fit.scheduler == SchedulerConfig(max_num_seqs=8)


def test_idle_gaps_do_not_count_as_host_work():
    steps = [record(1, 1, 10.0, step_ms=10.5) for _ in range(5)]
    ends = [0.011, 0.022, 5.0, 5.011, 5.022]  # an idle wait of ~5 s in the middle
    assert host_ms(StepLog({}, steps, ends)) == pytest.approx(0.5 + 0.5, rel=1e-3)


def test_a_replayed_run_keeps_its_requests_times_and_lengths(profile):
    replay = Replay(1.0, ((0.0, 32, 5), (0.25, 16, 3)))
    trace = TraceAcceptance((RequestProcess((1.0,)), RequestProcess((0.0,))))
    requests, _ = simulate(profile, replay, "fixed:2", trace, seed=0)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests] == list(replay.requests)
    first, second = requests
    assert first.accepted == first.proposed > 0 and second.accepted == 0 < second.proposed
    # Where the trace found no match, the simulated proposer offers nothing.
    nothing = TraceAcceptance((RequestProcess((1.0,), frozenset(range(100))),))
    requests, _ = simulate(profile, replay, "fixed:2", nothing, seed=0)
    assert all(r.proposed == 0 for r in requests)
