"""Live runs as simulator input.

- A verifier's step log (`smartspec verifier --step-log`) gives the step-time profile (the
  cost model fitted the way the planner fits it), the proposer's cost (draft time per
  lockstep step and per token, the hop), the host's work between forwards, and the
  engine's cache and scheduler settings.
- A sweep's results (`smartspec bench --rates`, which asks the verifier to trace every
  request's speculative rounds) give each run's workload — when each request was sent,
  its prompt and output tokens — and each request's acceptance: per draft position, the
  share of tested tokens the target kept, over every run that drafted for it; and where
  its proposer offered nothing. Greedy output is the same under every policy, so a
  lookup that finds no match at some context finds none there under any policy: those
  contexts are read off a fixed-k run, in which every decode step is a traced round.

Within one repetition of a sweep, request i is the same prompt at every rate and under
every policy (same seed), so its rounds are pooled across them.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from controller.cost_model import CostModelFitter, CostParams
from controller.profile import StepLog
from controller.step import StepRecord
from engine.config import CacheConfig
from engine.scheduler import SchedulerConfig
from simulator.acceptance import RequestProcess, TraceAcceptance
from simulator.model import DraftCost
from simulator.run import Replay

PRIOR_WEIGHT = 2.0  # pseudo-trials pulling a sparse position's rate toward its request's


@dataclass(frozen=True)
class LiveFit:
    profile: list[StepRecord]  # the target's steps, for `simulate`
    cost: CostParams
    draft: DraftCost
    host_ms: float
    cache: CacheConfig
    scheduler: SchedulerConfig


def fit_step_log(log: StepLog, deadline_ms: float = float("inf")) -> LiveFit:
    """What the simulator takes from a live verifier's steps."""
    fitter = CostModelFitter()
    cost = fitter.seed(log.steps)
    drafted = [s for s in log.steps if s.draft_ms > 0 and s.propose_ms > 0]
    hop = float(np.median([s.propose_ms - s.draft_ms for s in drafted])) if drafted else cost.proposer_rtt_ms
    draft = DraftCost(cost.draft_step_ms, cost.draft_ms_per_token, max(hop, 0.0), deadline_ms)
    return LiveFit(log.steps, cost, draft, host_ms(log), *_engine_config(log.config))


def host_ms(log: StepLog) -> float:
    """The host's work per step beyond the forward and the proposal: the step's own scheduling
    and emitting, plus the serving loop's streaming until the next step starts. Gaps in which the
    engine sat idle are the long tail; the median over consecutive steps leaves them out."""
    own = [s.step_ms - s.verify_ms - s.propose_ms for s in log.steps]
    between = [1e3 * (end - prev_end) - s.step_ms for s, prev_end, end in zip(log.steps[1:], log.ends, log.ends[1:])]
    if not own:
        return 0.0
    return float(np.median(own) + (np.median(between) if between else 0.0))


def _engine_config(config: dict) -> tuple[CacheConfig, SchedulerConfig]:
    cache = CacheConfig(**config.get("cache", {}))
    scheduler = SchedulerConfig(**config.get("scheduler", {}))
    return cache, scheduler


def replays(sweep: dict) -> dict[tuple[float, str, int], Replay]:
    """Each live point's workload by (rate, policy, repeat): its successful requests as sent."""
    out = {}
    for p in sweep["points"]:
        requests = tuple(
            (r["send_s"], r["prompt_tokens"], r["completion_tokens"]) for r in p["requests"] if r["error"] is None
        )
        out[(p["rate"], p["policy"], p["repeat"])] = Replay(p["rate"], requests)
    return out


def acceptance(sweep: dict, repeat: int) -> TraceAcceptance:
    """Request i of repetition `repeat`: its kept share per draft position, pooled over every
    point of that repetition that drafted for it; requests never drafted for get the mean."""
    rounds: dict[int, list] = defaultdict(list)
    no_match: dict[int, set] = defaultdict(set)
    for p in sweep["points"]:
        if p["repeat"] == repeat:
            for i, r in enumerate(p["requests"]):
                rounds[i].extend(r["rounds"])
                if p["policy"].startswith("fixed:"):
                    no_match[i] |= empty_contexts(r["prompt_tokens"], r["rounds"])
    count = max(rounds, default=-1) + 1
    drafted = [i for i in range(count) if any(proposed for _, proposed, _ in rounds[i])]
    if not drafted:
        raise ValueError(f"repetition {repeat} of the trace has no drafted rounds to learn acceptance from")
    fitted = {i: request_process(rounds[i], frozenset(no_match[i])) for i in drafted}
    mean = (float(np.mean([f.rates[0] for f in fitted.values()])),)
    return TraceAcceptance(tuple(fitted.get(i) or RequestProcess(mean, frozenset(no_match[i])) for i in range(count)))


def empty_contexts(prompt_tokens: int, rounds: list) -> set[int]:
    """Context lengths at which the proposer offered nothing, from the rounds of a run in which
    every decode step drafted: the first round starts after the first token, and each round
    moves the context on by its accepted drafts plus one."""
    out, context = set(), prompt_tokens + 1
    for _, proposed, accepted in rounds:
        if proposed == 0:
            out.add(context)
        context += accepted + 1
    return out


def request_process(rounds: list, no_match: frozenset[int] = frozenset()) -> RequestProcess:
    """From one request's rounds (k asked, proposed, accepted): P(keep position j | reached it),
    shrunk toward the request's overall rate where positions were tested rarely."""
    depth = max((proposed for _, proposed, _ in rounds), default=0)
    tested = np.zeros(depth)
    kept = np.zeros(depth)
    for _, proposed, accepted in rounds:
        reached = min(accepted + 1, proposed)  # positions tested: the accepted ones and the first rejected
        tested[:reached] += 1
        kept[:accepted] += 1
    overall = kept.sum() / tested.sum() if tested.sum() else 0.0
    rates = (kept + PRIOR_WEIGHT * overall) / (tested + PRIOR_WEIGHT)
    return RequestProcess(tuple(float(r) for r in rates) or (overall,), no_match)
