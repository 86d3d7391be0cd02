"""What the simulator puts in place of the models: the only parts of the stack it replaces.

`SimExecutor` stands where the engine's model executor runs the target: a step takes the
time the cost profile gives for its shape (batch, batched tokens, KV tokens), on the
virtual clock, and each request keeps the prefix of its drafts its acceptance process
says. `SimProposer` stands where a proposer answers: drafting takes the draft profile's
time plus the hop. Scheduling, planning, acceptance estimation, the cost fit and the
step loop around them are the engine's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.cost_model import CostParams
from engine.scheduler import SchedulerOutput
from runtime.draft import Draft, DraftRequest, Proposal
from runtime.rejection import Verified
from simulator.acceptance import AcceptanceModel, accepted_prefix
from simulator.clock import VirtualClock

TOKEN = 1  # every simulated token: content does not matter, only counts and times do


class SimExecutor:
    runner = None  # no model

    def __init__(
        self,
        cost: CostParams,
        clock: VirtualClock,
        acceptance: AcceptanceModel,
        rng: np.random.Generator,
        vocab_size: int = 32000,
        max_len: int = 1 << 20,
    ):
        self.cost, self.clock, self.acceptance, self.rng = cost, clock, acceptance, rng
        self.vocab_size, self.max_len = vocab_size, max_len
        self.eos_token_ids: frozenset[int] = frozenset()  # requests end at their length
        self.rates: dict[str, float] = {}  # request id -> its acceptance rate
        self.num_steps = 0

    def execute(self, sched: SchedulerOutput) -> tuple[list[Verified | None], float]:
        items = sched.items
        tokens = sum(it.num_new + (len(it.draft.token_ids) if it.draft else 0) for it in items)
        kv = sum(it.seq.num_computed + it.num_new for it in items)
        self.clock.advance_ms(float(self.cost.verify_ms(len(items), tokens, kv)))
        self.num_steps += 1
        results: list[Verified | None] = []
        for it in items:
            if not it.sample:
                results.append(None)  # a prefill chunk
                continue
            k = len(it.draft.token_ids) if it.draft else 0
            accepted = accepted_prefix(self.rng, self.rate(it.seq.request_id), k) if k else 0
            results.append(Verified([TOKEN] * (accepted + 1), accepted))
        return results, 0.0

    def rate(self, request_id: str) -> float:
        if request_id not in self.rates:
            self.rates[request_id] = self.acceptance.draw_rate(self.rng)
        return self.rates[request_id]

    def forget(self, request_id: str) -> None:
        self.rates.pop(request_id, None)


@dataclass(frozen=True)
class DraftCost:
    """A proposer's time: `step_ms` per lockstep draft step (max k of them), `per_token_ms`
    per drafted token, plus the network hop each way together."""

    step_ms: float = 1.0
    per_token_ms: float = 0.0
    hop_ms: float = 0.5


class SimProposer:
    def __init__(self, cost: DraftCost, clock: VirtualClock):
        self.cost, self.clock = cost, clock

    async def propose(self, requests: list[DraftRequest]) -> Proposal:
        draft_ms = self.cost.step_ms * max(r.k for r in requests) + self.cost.per_token_ms * sum(r.k for r in requests)
        self.clock.advance_ms(draft_ms + self.cost.hop_ms)
        return Proposal([Draft([TOKEN] * r.k) for r in requests], draft_ms=draft_ms)

    def release(self, request_ids: list[str]) -> None:
        pass
