"""Fleets: verifiers sharing proposer replicas of finite capacity, which can fail."""

from __future__ import annotations

import pytest

from controller.policy import Policy
from runtime.draft import DraftRequest
from runtime.sampler import SamplingParams
from simulator.acceptance import AcceptanceModel
from simulator.model import DraftCost, Outage, ProposerPool
from simulator.run import Fleet, Workload, simulate

PARAMS = SamplingParams(max_new_tokens=8)


def ask(ids, k: int = 2) -> list[DraftRequest]:
    return [DraftRequest(str(i), [1, 2, 3], k, PARAMS) for i in ids]


def test_work_from_two_verifiers_queues_on_one_replica():
    pool = ProposerPool(DraftCost(step_ms=5.0, hop_ms=1.0))
    assert pool.propose(0.0, ask([0])) == ([True], 11.0, 10.0)  # 2 lockstep steps of 5 ms, then the hop
    # A second verifier asks 4 ms later: it waits for the first sub-batch (6 ms more) and its own.
    assert pool.propose(0.004, ask([1])) == ([True], 6.0 + 10.0 + 1.0, 10.0)
    assert pool.busy_ms == [20.0]


def test_past_the_deadline_a_replica_gives_nothing_and_is_skipped_for_its_backoff():
    pool = ProposerPool(DraftCost(step_ms=30.0, hop_ms=0.0, deadline_ms=100.0), replicas=2, backoff_s=1.0)
    ids = list(range(40))
    first = {i: pool.replica_for(str(i), 0.0) for i in ids}
    assert set(first.values()) == {0, 1}
    on_zero = [i for i in ids if first[i] == 0]
    pool.propose(0.0, ask(on_zero[:1]))  # replica 0 busy until 60 ms
    served, wait, _ = pool.propose(0.0, ask(on_zero[1:2], k=2))  # would finish at 120 ms: too late
    assert served == [False] and wait == 100.0 and pool.failures == 1
    # While replica 0 is skipped, its requests go to replica 1; after the back-off they return.
    assert all(pool.replica_for(str(i), 0.5) == 1 for i in ids)
    assert {i: pool.replica_for(str(i), 1.0) for i in ids} == first


def test_rendezvous_moves_only_the_requests_of_a_replica_that_goes():
    pool = ProposerPool(DraftCost(), replicas=4)
    before = {i: pool.replica_for(str(i), 0.0) for i in range(400)}
    pool.skip_until[2] = 10.0
    after = {i: pool.replica_for(str(i), 1.0) for i in range(400)}
    moved = {i for i in before if before[i] != after[i]}
    assert moved == {i for i in before if before[i] == 2} and 60 < len(moved) < 140


def test_a_replica_that_is_down_refuses_at_once():
    pool = ProposerPool(DraftCost(step_ms=1.0), replicas=1, outages=(Outage(0, 1.0, 2.0),))
    assert pool.propose(1.5, ask([0]))[:2] == ([False], 0.0)
    assert pool.propose(2.5, ask([0]))[0] == [True]


def workload(rate: float, n: int = 60) -> Workload:
    return Workload(rate, num_requests=n, prompt_len=(32, 64), output_len=(32, 64))


def mean_latency(requests) -> float:
    return sum(r.finish_s - r.arrival_s for r in requests) / len(requests)


def test_too_few_proposers_slow_a_fleet_and_enough_of_them_match_demand(profile):
    """A draft step costs 20 ms whatever the batch: one replica cannot keep four verifiers fed.
    Pinned per verifier, four replicas can; pinned per request (as the proposer client does),
    every verifier's step sends a sub-batch to every replica, each costing a full draft step,
    so more replicas add work as fast as capacity."""
    draft = DraftCost(step_ms=20.0, hop_ms=0.5, deadline_ms=1000.0)

    def run(m: int, pin: str):
        fleet = Fleet(4, m, pin=pin)
        return simulate(profile, workload(16.0), Policy.fixed(3), AcceptanceModel(0.8), draft, 0, fleet=fleet)

    (one, one_t), (four, four_t) = run(1, "verifier"), run(4, "verifier")
    assert mean_latency(one) > 1.3 * mean_latency(four)
    assert one_t["proposer_utilisation"][0] > 0.9  # saturated
    assert max(four_t["proposer_utilisation"]) < 0.9 and four_t["proposer_demand"] < 4
    assert four_t["proposer_demand"] == pytest.approx(sum(four_t["proposer_utilisation"]))
    spread, spread_t = run(4, "request")
    assert min(spread_t["proposer_utilisation"]) > 0.5 and spread_t["proposer_demand"] > 1.2 * four_t["proposer_demand"]
    assert mean_latency(spread) > mean_latency(four)


def test_an_outage_costs_drafts_not_requests(profile):
    """Replica 1 of 2 is down for 4 s: a step that asks it gets no drafts from it, and it is
    skipped for the 1 s back-off, so it costs a few steps' drafts, not one per step."""
    draft = DraftCost(step_ms=1.0, hop_ms=0.5)
    fleet = Fleet(2, 2, outages=(Outage(1, 2.0, 6.0),))
    requests, totals = simulate(profile, workload(8.0), Policy.fixed(3), AcceptanceModel(0.8), draft, 0, fleet=fleet)
    assert all(r.finish_s is not None for r in requests)
    assert 2 <= totals["proposer_failures"] <= 2 * (4 + 1)  # per verifier: once per back-off at most
    _, healthy = simulate(profile, workload(8.0), Policy.fixed(3), AcceptanceModel(0.8), draft, 0, fleet=Fleet(2, 2))
    assert healthy["proposer_failures"] == 0 and totals["steps"] > 200


@pytest.mark.parametrize("balance", ["round-robin", "least-loaded"])
def test_a_fleet_spreads_arrivals_and_finishes_every_request(profile, balance):
    fleet = Fleet(3, 1, balance=balance)
    requests, totals = simulate(profile, workload(12.0), Policy.parse("smartspec"), seed=1, fleet=fleet)
    assert all(r.finish_s is not None and r.finish_s > r.arrival_s for r in requests)
    alone, _ = simulate(profile, workload(12.0), Policy.parse("smartspec"), seed=1)
    # Three verifiers carry the same load with less queueing than one.
    assert sum(r.finish_s - r.arrival_s for r in requests) < sum(r.finish_s - r.arrival_s for r in alone)


def test_fleet_settings_are_checked():
    with pytest.raises(ValueError, match="verifier"):
        Fleet(0, 1)
    with pytest.raises(ValueError, match="replica"):
        Fleet(1, 2, outages=(Outage(2, 0.0, 1.0),))
    with pytest.raises(ValueError, match="balance"):
        Fleet(1, 1, balance="random")
