"""One simulated run: arrivals into the engines' own step loop on virtual clocks.

The step is the live one (`Engine.step()`: scheduler, planner, proposal, verification,
emit), with the executor and the proposer pool of `simulator.model` in place of the
models and a `VirtualClock` per verifier in place of the wall clock. A fleet is several
verifiers sharing proposer replicas; one verifier with one replica is the local stack.
A request's latencies are measured on its verifier's clock from its arrival.
"""

from __future__ import annotations

import gc
import heapq
from dataclasses import dataclass

import numpy as np

from controller.cost_model import CostModelFitter
from controller.policy import Policy
from controller.step import StepRecord
from engine.config import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from runtime.sampler import SamplingParams
from simulator.acceptance import AcceptanceModel, RequestProcess, TraceAcceptance
from simulator.clock import VirtualClock
from simulator.model import DraftCost, Outage, ProposerPool, SimExecutor, SimProposer
from simulator.peers import make_planner


def run_now(coro):
    """Runs a step coroutine to its end without an event loop: in a simulation nothing it awaits
    waits for anything (the proposer and executor answer at once), so it ends on its first
    resumption, and an event loop would only add its own overhead to every step."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a simulated step waited for something: only the virtual clock may pass")


@dataclass(frozen=True)
class Workload:
    rate: float  # requests per second
    num_requests: int = 200
    prompt_len: tuple[int, int] = (64, 512)  # uniform, inclusive
    output_len: tuple[int, int] = (64, 256)
    burstiness: float = 1.0  # gamma shape of the gaps: 1 is Poisson, below 1 burstier

    def arrivals(self, rng: np.random.Generator) -> list[tuple[float, int, int]]:
        """(arrival time s, prompt tokens, output tokens) per request, in arrival order."""
        gaps = rng.gamma(self.burstiness, 1.0 / (self.rate * self.burstiness), self.num_requests)
        prompts = rng.integers(self.prompt_len[0], self.prompt_len[1] + 1, self.num_requests)
        outputs = rng.integers(self.output_len[0], self.output_len[1] + 1, self.num_requests)
        return list(zip(np.cumsum(gaps).tolist(), prompts.tolist(), outputs.tolist()))


@dataclass(frozen=True)
class Replay:
    """A recorded workload: the requests of a live run, sent when they were sent."""

    rate: float
    requests: tuple[tuple[float, int, int], ...]  # (send time s, prompt tokens, output tokens)

    @property
    def num_requests(self) -> int:
        return len(self.requests)

    def arrivals(self, rng: np.random.Generator) -> list[tuple[float, int, int]]:
        return sorted(self.requests)


@dataclass
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_token_s: float | None = None
    finish_s: float | None = None
    proposed: int = 0
    accepted: int = 0


@dataclass(frozen=True)
class Fleet:
    """Verifiers and the proposer replicas they share. Arrivals go to the verifiers in turn
    (`round-robin`, a client-side balancer) or to the one with the fewest requests in flight
    (`least-loaded`, a queue-aware gateway)."""

    verifiers: int = 1
    proposers: int = 1
    outages: tuple[Outage, ...] = ()
    balance: str = "round-robin"
    pin: str = "request"  # how drafting is spread over replicas (`ProposerPool`)

    def __post_init__(self) -> None:
        if self.verifiers < 1:
            raise ValueError(f"a fleet needs at least one verifier, got {self.verifiers}")
        if any(not 0 <= o.replica < self.proposers for o in self.outages):
            raise ValueError(f"an outage names a replica outside 0..{self.proposers - 1}")
        if self.balance not in ("round-robin", "least-loaded"):
            raise ValueError(f"balance must be round-robin or least-loaded, got {self.balance!r}")


class SimVerifier:
    """One verifier: the engine on its own virtual clock, ahead of the others while it steps."""

    def __init__(self, index: int, engine: Engine, clock: VirtualClock):
        self.index, self.engine, self.clock = index, engine, clock
        self.steps = self.drafting = self.planned = 0
        self.draft_ms = 0.0


def simulate(
    profile: list[StepRecord],
    workload: Workload | Replay,
    policy: str | Policy,
    acceptance: AcceptanceModel | TraceAcceptance = AcceptanceModel(),
    draft: DraftCost = DraftCost(),
    seed: int = 0,
    cache: CacheConfig = CacheConfig(kv_cache_tokens=1 << 20),
    scheduler: SchedulerConfig = SchedulerConfig(max_waiting=1 << 20),
    host_ms: float = 0.0,
    fleet: Fleet = Fleet(),
) -> tuple[list[SimRequest], dict]:
    """The requests with their simulated times, and the fleet's totals (steps, mean k, proposer
    use). `profile`: the target's measured steps (`controller.profile`): each step's time is
    theirs, interpolated by the cost model, and they seed the planners as a verifier's
    --cost-profile does. `policy`: one of SmartSpec's (a `Policy` or its text) or a peer's
    (`simulator.peers.PEERS`);
    `host_ms`: the host's work per step around the forward (scheduling, emitting, streaming).

    Each verifier steps atomically on its own clock; the one furthest behind steps next, and an
    arrival is handed out once every busy verifier has reached its time, so the proposer pool
    sees requests in time order."""
    # A run allocates millions of short-lived objects and almost no reference cycles (about
    # 300 after 10,000 requests): reference counting frees them, while the cyclic collector's
    # passes over every live object cost ~10% of the run. It pauses for the run.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _simulate(profile, workload, policy, acceptance, draft, seed, cache, scheduler, host_ms, fleet)
    finally:
        if paused:
            gc.enable()


def _simulate(profile, workload, policy, acceptance, draft, seed, cache, scheduler, host_ms, fleet):
    rng = np.random.default_rng(seed)
    cost = CostModelFitter().seed(profile)
    processes: dict[str, RequestProcess] = {}
    pending = [SimRequest(t, p, o) for t, p, o in workload.arrivals(rng)]
    ctx = int(np.mean([r.prompt_tokens + r.output_tokens // 2 for r in pending]))  # a request's typical context
    pool = ProposerPool(draft, fleet.proposers, fleet.outages, pin=fleet.pin)
    verifiers = []
    for i in range(fleet.verifiers):
        clock = VirtualClock()
        planner = make_planner(policy, profile, acceptance.mean, draft, ctx)
        config = EngineConfig(cache, scheduler, getattr(planner, "policy", Policy()))
        executor = SimExecutor(cost, clock, processes, rng)
        proposer = SimProposer(pool, clock, processes, rng, i)
        verifiers.append(
            SimVerifier(i, Engine(None, None, config, proposer, planner, executor=executor, clock=clock), clock)
        )
    by_id: dict[str, SimRequest] = {}
    busy: list[tuple[float, int]] = []  # (clock, verifier index) of verifiers with work
    next_arrival = 0
    while next_arrival < len(pending) or busy:
        if next_arrival < len(pending) and (not busy or pending[next_arrival].arrival_s <= busy[0][0]):
            req = pending[next_arrival]
            v = _balance(verifiers, fleet, next_arrival)
            was_busy = v.engine.has_work()
            v.clock.advance_to(req.arrival_s)
            params = SamplingParams(max_new_tokens=req.output_tokens, ignore_eos=True)
            request_id = str(next_arrival)
            v.engine.add_request(request_id, [1] * req.prompt_tokens, params).arrival_time = req.arrival_s
            by_id[request_id] = req
            processes[request_id] = acceptance.draw(rng, next_arrival)
            next_arrival += 1
            if not was_busy:
                heapq.heappush(busy, (v.clock.now, v.index))
            continue
        v = verifiers[heapq.heappop(busy)[1]]
        outputs = run_now(v.engine.step())
        v.clock.advance_ms(host_ms)  # the host's work around the forward, outside what the planner times
        for out in outputs:
            req = by_id[out.request_id]
            if req.first_token_s is None and out.token_ids:
                req.first_token_s = v.clock.now
            if out.finish_reason is not None:
                req.finish_s = v.clock.now
                req.proposed, req.accepted = out.seq.num_proposed, out.seq.num_accepted
                del processes[out.request_id]
        _count(v)
        if v.engine.has_work():
            heapq.heappush(busy, (v.clock.now, v.index))
    return pending, _totals(verifiers, pool)


def _balance(verifiers: list[SimVerifier], fleet: Fleet, index: int) -> SimVerifier:
    if fleet.balance == "least-loaded":
        return min(verifiers, key=lambda v: (v.engine.num_requests, v.index))
    return verifiers[index % len(verifiers)]


def _count(v: SimVerifier) -> None:
    v.steps += 1
    record = v.engine.last_step
    if record is not None:
        v.drafting += len(record.planned_k) - record.planned_k.count(0)
        v.planned += record.draft_tokens
        v.draft_ms += record.draft_ms


def _totals(verifiers: list[SimVerifier], pool: ProposerPool) -> dict:
    span = max(v.clock.now for v in verifiers)
    drafting, planned = sum(v.drafting for v in verifiers), sum(v.planned for v in verifiers)
    return {
        "steps": sum(v.steps for v in verifiers),
        "simulated_s": span,
        "drafted_tokens": planned,
        "mean_k_when_drafting": planned / max(drafting, 1),
        # Replica-seconds of drafting per second: the proposers the planner's demand needs at full use.
        "proposer_demand": sum(pool.busy_ms) / 1e3 / span if span > 0 else 0.0,
        "proposer_utilisation": [ms / 1e3 / span if span > 0 else 0.0 for ms in pool.busy_ms],
        "proposer_failures": pool.failures,
    }
