"""The verifier's proposer client: rendezvous pinning, DNS endpoints, deadlines."""

from __future__ import annotations

import asyncio
import time

from service_threads import ProposerThread

from drafting.ngram import NgramBackend
from runtime.draft import DraftRequest
from runtime.sampler import SamplingParams
from verifier_svc.proposer_client import ProposerClient, rendezvous


def requests(n: int, k: int = 2) -> list[DraftRequest]:
    return [DraftRequest(f"r{i}", [1, 2, 3, 1, 2], k, SamplingParams()) for i in range(n)]


def test_rendezvous_moves_only_the_requests_of_a_changed_endpoint():
    ids = [f"req-{i}" for i in range(2000)]
    three = ["a:1", "b:1", "c:1"]
    before = {i: rendezvous(i, three) for i in ids}
    after = {i: rendezvous(i, three + ["d:1"]) for i in ids}
    moved = [i for i in ids if before[i] != after[i]]
    assert all(after[i] == "d:1" for i in moved)  # only to the new endpoint
    assert 0.18 < len(moved) / len(ids) < 0.32  # about a quarter
    assert {rendezvous(i, three) for i in ids} == set(three)  # every endpoint gets requests
    without_b = {i: rendezvous(i, ["a:1", "c:1"]) for i in ids}
    assert all(without_b[i] == before[i] for i in ids if before[i] != "b:1")


def test_dns_name_is_resolved_and_drafts_arrive():
    proposer = ProposerThread()
    try:
        client = ProposerClient([f"dns:127.0.0.1:{proposer.server.port}"], deadline_s=2.0)

        async def go():
            proposal = await client.propose(requests(3))
            await client.close()
            return proposal.drafts

        drafts = asyncio.run(go())
        assert list(client.replicas) == [proposer.address]
        assert [d.token_ids for d in drafts] == [[3, 1]] * 3
    finally:
        proposer.kill()


class StoppingBackend(NgramBackend):
    """A real n-gram backend whose drafts say a confidence stop ended them, as a draft model's would."""

    def propose(self, calls):
        drafts = super().propose(calls)
        for d in drafts:
            d.stopped_early = True
        return drafts


def test_a_confidence_stop_reaches_the_verifier():
    plain, stopping = ProposerThread(), ProposerThread(backend=StoppingBackend())
    try:

        async def go(address):
            client = ProposerClient([address], deadline_s=2.0)
            proposal = await client.propose(requests(2, k=4))
            await client.close()
            return proposal.drafts

        for proposer, stopped in ((plain, False), (stopping, True)):
            drafts = asyncio.run(go(proposer.address))
            assert [d.token_ids for d in drafts] == [[3, 1, 2]] * 2  # short of k = 4 either way
            assert [d.stopped_early for d in drafts] == [stopped] * 2
    finally:
        plain.kill()
        stopping.kill()


class SlowBackend(NgramBackend):
    """A real n-gram backend that takes its time, as an overloaded replica would."""

    def propose(self, calls):
        time.sleep(0.3)
        return super().propose(calls)


def test_a_slow_replica_costs_only_this_steps_drafts():
    slow, fast = ProposerThread(backend=SlowBackend()), ProposerThread()
    try:
        client = ProposerClient([slow.address, fast.address], deadline_s=0.1, backoff_s=60)

        async def go():
            first = await client.propose(requests(40))
            second = await client.propose(requests(40))  # the slow one is in back-off: all go to the fast one
            await client.close()
            return first.drafts, first.failures, second.drafts

        first, failures, second = asyncio.run(go())
        assert failures == 1
        on_slow = [d is None for d in first]
        assert any(on_slow) and not all(on_slow)
        assert all(d is not None and d.token_ids == [3, 1] for d in second)
    finally:
        slow.kill()
        fast.kill()
