"""What the simulator puts in place of the models: the only parts of the stack it replaces.

`SimExecutor` stands where the engine's model executor runs the target: a step takes the
time the cost profile gives for its shape (batch, batched tokens, KV tokens), on the
virtual clock, and each request keeps the prefix of its
drafts its acceptance process says. `ProposerPool` stands where proposer replicas answer:
drafting takes the draft profile's time plus the hop, queued behind other verifiers'
work on the same replica; past the verifier's deadline, or from a replica that is down,
the step goes without drafts, as with live proposers. Scheduling, planning, acceptance
estimation, the cost fit and the step loop around them are the engine's own.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from controller.cost_model import CostParams
from engine.scheduler import SchedulerOutput
from runtime.draft import Draft, DraftRequest, Proposal
from runtime.rejection import Verified
from simulator.acceptance import RequestProcess
from simulator.clock import VirtualClock

TOKEN = 1  # every simulated token: content does not matter, only counts and times do


class SimExecutor:
    runner = None  # no model

    def __init__(
        self,
        cost: CostParams,
        clock: VirtualClock,
        processes: dict[str, RequestProcess],
        rng: np.random.Generator,
        vocab_size: int = 32000,
        max_len: int = 1 << 20,
    ):
        self.cost, self.clock, self.processes, self.rng = cost, clock, processes, rng
        self.vocab_size, self.max_len = vocab_size, max_len
        self.eos_token_ids: frozenset[int] = frozenset()  # requests end at their length
        self.num_steps = 0

    def execute(self, sched: SchedulerOutput) -> tuple[list[Verified | None], float]:
        items = sched.items
        tokens = kv = 0
        results: list[Verified | None] = []
        processes, rng = self.processes, self.rng
        for it in items:
            k = len(it.draft.token_ids) if it.draft else 0
            tokens += it.num_new + k
            kv += it.seq.num_computed + it.num_new
            if not it.sample:
                results.append(None)  # a prefill chunk
                continue
            accepted = processes[it.seq.request_id].accepted(rng, k) if k else 0
            results.append(Verified([TOKEN] * (accepted + 1), accepted))
        self.clock.advance_ms(float(self.cost.verify_ms_at(len(items), tokens, kv)))
        self.num_steps += 1
        return results, 0.0


@dataclass(frozen=True)
class DraftCost:
    """A proposer's time: `step_ms` per lockstep draft step (max k of them), `per_token_ms`
    per drafted token, plus the network hop each way together. `deadline_ms`: how long the
    verifier waits for drafts (its --proposer-deadline-ms)."""

    step_ms: float = 1.0
    per_token_ms: float = 0.0
    hop_ms: float = 0.5
    deadline_ms: float = float("inf")

    def draft_ms(self, ks: list[int]) -> float:
        return self.step_ms * max(ks) + self.per_token_ms * sum(ks)


@dataclass(frozen=True)
class Outage:
    """Proposer replica `replica` is down from `start_s` until `end_s` (simulated seconds)."""

    replica: int
    start_s: float
    end_s: float


class ProposerPool:
    """Proposer replicas with finite capacity, shared by every verifier of a fleet.

    As the verifiers' proposer client does (`pin="request"`): each request is pinned to one
    available replica by rendezvous hashing; a step's sub-batches go to their replicas at
    once and the verifier waits for the slowest, up to its deadline. With `pin="verifier"`
    a verifier's whole batch goes to one replica (rendezvous on the verifier): where a draft
    step costs the same at any batch size, that is what lets replicas add capacity. A
    replica drafts one sub-batch at a time, so work from several verifiers queues. A
    replica that is down or misses the deadline gives no drafts for its sub-batch and is
    skipped for `backoff_s`; work it had accepted still keeps it busy. Rebuilding a moved
    request's draft state is not charged.
    """

    def __init__(
        self,
        cost: DraftCost,
        replicas: int = 1,
        outages: tuple[Outage, ...] = (),
        backoff_s: float = 1.0,
        pin: str = "request",
    ):
        if replicas < 1:
            raise ValueError(f"a proposer pool needs at least one replica, got {replicas}")
        if pin not in ("request", "verifier"):
            raise ValueError(f"pin must be request or verifier, got {pin!r}")
        self.cost, self.outages, self.backoff_s, self.pin = cost, outages, backoff_s, pin
        self.busy_until = [0.0] * replicas  # s
        self.busy_ms = [0.0] * replicas  # drafting time, for utilisation
        self.skip_until = [0.0] * replicas
        self.failures = 0

    @property
    def replicas(self) -> int:
        return len(self.busy_until)

    def down(self, replica: int, now: float) -> bool:
        return any(o.replica == replica and o.start_s <= now < o.end_s for o in self.outages)

    def replica_for(self, key: str, now: float) -> int:
        if self.replicas == 1:
            return 0
        up = [r for r in range(self.replicas) if self.skip_until[r] <= now] or list(range(self.replicas))
        return max(up, key=lambda r: zlib.crc32(f"{r}|{key}".encode()))

    def propose(self, now: float, requests: list[DraftRequest], verifier: int = 0):
        """Per request whether drafts came back; the verifier's wait (ms); the slowest draft time (ms)."""
        groups: dict[int, list[int]] = {}
        if self.replicas == 1 and requests:  # one replica: nothing to choose
            groups[0] = list(range(len(requests)))
        elif self.replicas > 1:
            for i, r in enumerate(requests):
                key = r.request_id if self.pin == "request" else f"verifier-{verifier}"
                groups.setdefault(self.replica_for(key, now), []).append(i)
        served = [False] * len(requests)
        wait = draft = 0.0
        for replica, idxs in groups.items():
            if self.down(replica, now):  # refused at once
                self._fail(replica, now)
                continue
            ms = self.cost.draft_ms([requests[i].k for i in idxs])
            start = max(now, self.busy_until[replica])
            self.busy_until[replica] = start + ms / 1e3
            self.busy_ms[replica] += ms
            done = 1e3 * (start - now) + ms + self.cost.hop_ms
            if done > self.cost.deadline_ms:
                self._fail(replica, now)
                wait = self.cost.deadline_ms
                continue
            wait, draft = max(wait, done), max(draft, ms)
            for i in idxs:
                served[i] = True
        return served, wait, draft

    def _fail(self, replica: int, now: float) -> None:
        self.failures += 1
        self.skip_until[replica] = now + self.backoff_s


class SimProposer:
    """One verifier's view of the pool: asks at the verifier's time, waits on its clock."""

    def __init__(
        self,
        pool: ProposerPool,
        clock: VirtualClock,
        processes: dict[str, RequestProcess] | None = None,
        rng: np.random.Generator | None = None,
        verifier: int = 0,
    ):
        self.pool, self.clock, self.verifier = pool, clock, verifier
        self.processes = processes if processes is not None else {}
        self.rng = rng if rng is not None else np.random.default_rng(0)

    async def propose(self, requests: list[DraftRequest]) -> Proposal:
        served, wait_ms, draft_ms = self.pool.propose(self.clock.now, requests, self.verifier)
        self.clock.advance_ms(wait_ms)
        drafts: list[Draft | None] = []
        processes = self.processes
        for r, ok in zip(requests, served):
            if not ok:
                drafts.append(None)
                continue
            process = processes.get(r.request_id)
            if process is not None and len(r.token_ids) in process.no_match:
                drafts.append(Draft([]))  # no match: the engine asks for at most one token next step
            else:
                drafts.append(Draft([TOKEN] * r.k))
        return Proposal(drafts, draft_ms=draft_ms, failures=0 if all(served) else 1)

    def release(self, request_ids: list[str]) -> None:
        pass

    async def flush(self) -> None:
        pass
