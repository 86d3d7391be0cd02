"""One simulated run: arrivals into the engine's own step loop on a virtual clock.

The loop is the live one (`Engine.step()`: scheduler, planner, proposal, verification,
emit), with the executor and the proposer of `simulator.model` in place of the models
and a `VirtualClock` in place of the wall clock. Between steps, requests that have
arrived by the clock's time are added; an idle engine jumps the clock to the next
arrival. A request's latencies are measured on the same clock from its arrival.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.cost_model import CostParams
from controller.policy import Policy
from engine.config import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from runtime.sampler import SamplingParams
from simulator.acceptance import AcceptanceModel
from simulator.clock import VirtualClock
from simulator.model import DraftCost, SimExecutor, SimProposer
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


@dataclass
class SimRequest:
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    first_token_s: float | None = None
    finish_s: float | None = None
    proposed: int = 0
    accepted: int = 0


def simulate(
    cost: CostParams,
    workload: Workload,
    policy: str | Policy,
    acceptance: AcceptanceModel = AcceptanceModel(),
    draft: DraftCost = DraftCost(),
    seed: int = 0,
    cache: CacheConfig = CacheConfig(kv_cache_tokens=1 << 20),
    scheduler: SchedulerConfig = SchedulerConfig(max_waiting=1 << 20),
) -> tuple[list[SimRequest], dict]:
    """The requests with their simulated times, and the engine's totals (steps, mean k).
    `policy`: one of SmartSpec's (a `Policy` or its text) or a peer's (`simulator.peers.PEERS`)."""
    rng = np.random.default_rng(seed)
    clock = VirtualClock()
    executor = SimExecutor(cost, clock, acceptance, rng)
    ctx = (sum(workload.prompt_len) + sum(workload.output_len) // 2) // 2  # a request's typical context
    planner = make_planner(policy, cost, acceptance.mean, draft, ctx)
    config = EngineConfig(cache, scheduler, getattr(planner, "policy", Policy()))
    engine = Engine(None, None, config, SimProposer(draft, clock), planner, executor=executor, clock=clock)
    pending = [SimRequest(t, p, o) for t, p, o in workload.arrivals(rng)]
    by_id: dict[str, SimRequest] = {}
    steps = drafting = planned = 0
    next_arrival = 0
    while next_arrival < len(pending) or engine.has_work():
        while next_arrival < len(pending) and pending[next_arrival].arrival_s <= clock.now:
            req = pending[next_arrival]
            params = SamplingParams(max_new_tokens=req.output_tokens, ignore_eos=True)
            seq = engine.add_request(str(next_arrival), [1] * req.prompt_tokens, params)
            seq.arrival_time = req.arrival_s
            by_id[str(next_arrival)] = req
            next_arrival += 1
        if not engine.has_work():
            clock.advance_to(pending[next_arrival].arrival_s)
            continue
        for out in run_now(engine.step()):
            req = by_id[out.request_id]
            if req.first_token_s is None and out.token_ids:
                req.first_token_s = clock.now
            if out.finish_reason is not None:
                req.finish_s = clock.now
                req.proposed, req.accepted = out.seq.num_proposed, out.seq.num_accepted
                executor.forget(out.request_id)
        record = engine.last_step
        steps += 1
        if record is not None:
            drafting += sum(1 for k in record.planned_k if k)
            planned += sum(record.planned_k)
    totals = {
        "steps": steps,
        "simulated_s": clock.now,
        "drafted_tokens": planned,
        "mean_k_when_drafting": planned / max(drafting, 1),
    }
    return pending, totals
