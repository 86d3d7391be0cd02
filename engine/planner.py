"""The per-step planning seam: how many draft tokens each scheduled request gets.

Policies: `off`, `fixed:K`, `smartspec[:KMAX]` (per-request goodput) and
`smartspec-uniform[:KMAX]` (one k for the batch). A request may carry its own
policy (off, or fixed with its own k) instead of the server's. Only requests
that are decoding (their one pending token is fed and a token is sampled) may
speculate.

`SpecPlanner` keeps what the goodput policies learn in this process: acceptance
per request and a cost model fitted on this verifier's own steps. A controller
may push a cost model fitted over all verifiers; the local fit is the fallback
whenever none is pushed or the controller is gone.
"""

from __future__ import annotations

import numpy as np

from controller.acceptance import AcceptanceEstimator
from controller.cost_model import CostModelFitter, CostParams, linear_prior
from controller.goodput import Batch, expected_tokens
from controller.goodput import plan as plan_goodput
from controller.policy import Mode, Policy
from controller.step import StepRecord


def draft_room(item) -> int:
    """How many drafts a scheduled item could use: 0 unless it is decoding (one pending token
    fed, a token sampled), and never more than its request can still emit."""
    if not item.sample or item.num_new != 1:
        return 0
    return max(0, item.seq.params.max_new_tokens - len(item.seq.output_ids) - 1)


class SpecPlanner:
    # A pushed cost model replaces the local fit (which starts from a calibration)
    # only once it has seen this many live steps.
    MIN_PUSHED_STEPS = 256

    def __init__(self, policy: Policy = Policy(), cost_prior: CostParams | None = None):
        self.policy = policy
        self.acceptance = AcceptanceEstimator()
        self.fitter = CostModelFitter(prior=cost_prior or linear_prior(20.0, 40.0))
        self.pushed_cost: CostParams | None = None

    @property
    def speculates(self) -> bool:
        """Whether the server's policy drafts at all (requests may still ask for their own)."""
        return self.policy.speculates

    @property
    def cost(self) -> CostParams:
        return self.pushed_cost or self.fitter.params

    def apply(self, policy: Policy, cost: CostParams | None = None, prior: float | None = None) -> None:
        """A policy from the controller; cost None keeps using the local fit."""
        self.policy = policy
        self.pushed_cost = cost if cost is not None and cost.num_steps >= self.MIN_PUSHED_STEPS else None
        if prior is not None and 0 < prior < 1 and self.acceptance.prior_trials < 100:
            self.acceptance.seed_prior(prior)

    def plan(self, items) -> list[int]:
        """k_i per scheduled item (0 = no speculation); never more than the request can still emit."""
        policy = self.policy
        ks = [0] * len(items)
        auto, other_tokens, forced = [], 0.0, 0
        new_tokens = kv_tokens = 0
        for i, item in enumerate(items):
            seq = item.seq
            new_tokens += item.num_new
            kv_tokens += seq.num_computed + item.num_new
            room = draft_room(item)
            own = seq.policy or policy
            if own.mode == Mode.OFF or room <= 0:
                other_tokens += 1 if item.sample else 0
            elif own.mode == Mode.FIXED:
                ks[i] = min(own.k, room)
                if own is not policy:  # drafts the goodput search does not choose still cost and yield
                    forced += ks[i]
                    other_tokens += float(expected_tokens(self.acceptance.rate(seq.request_id), ks[i]))
            else:
                auto.append((i, min(seq.draft_cap, room), seq.request_id))
        if auto:
            ids = [request_id for _, _, request_id in auto]
            chosen = plan_goodput(
                self.acceptance.rates(ids),
                np.array([cap for _, cap, _ in auto]),
                self.cost,
                Batch(len(items), new_tokens + forced, kv_tokens),
                policy.k_max,
                uniform=policy.mode == Mode.UNIFORM,
                other_tokens=other_tokens,
            )
            for (i, cap, request_id), k in zip(auto, chosen.tolist()):
                ks[i] = k
                if k == 0 and cap > 0:
                    self.acceptance.idle(request_id)
        return ks

    def observe(self, step: StepRecord) -> None:
        self.acceptance.observe_all(step.drafts)
        self.fitter.observe(step)

    def release(self, request_id: str) -> None:
        self.acceptance.release(request_id)
