"""smartspec.v1.Controller messages <-> the goodput library's types, for both ends of Connect."""

from __future__ import annotations

import math

from controller.cost_model import TOKEN_KNOTS, CostParams
from controller.policy import MAX_K, Mode, Policy
from controller.state import Snapshot
from controller.step import StepRecord
from protocol.v1 import controller_pb2 as pb

MODE_TO_PB = {
    Mode.OFF: pb.POLICY_MODE_OFF,
    Mode.FIXED: pb.POLICY_MODE_FIXED,
    Mode.SMARTSPEC: pb.POLICY_MODE_SMARTSPEC,
    Mode.UNIFORM: pb.POLICY_MODE_SMARTSPEC_UNIFORM,
}
MODE_FROM_PB = {v: k for k, v in MODE_TO_PB.items()}


def cost_to_pb(cost: CostParams) -> pb.CostModel:
    return pb.CostModel(
        verify_token_knots=TOKEN_KNOTS,
        verify_ms_at_knots=cost.verify_ms_at_knots,
        verify_ms_per_kv_token=cost.verify_ms_per_kv_token,
        verify_ms_per_request=cost.verify_ms_per_request,
        draft_step_ms=cost.draft_step_ms,
        draft_ms_per_token=cost.draft_ms_per_token,
        proposer_rtt_ms=cost.proposer_rtt_ms,
        verify_relative_error=cost.verify_relative_error,
        num_steps=cost.num_steps,
    )


def cost_from_pb(msg: pb.CostModel) -> CostParams | None:
    """None when the controller has not fitted anything, fitted over other knots, or sent
    a value no step could cost (negative, NaN, infinite)."""
    if not msg.num_steps or tuple(msg.verify_token_knots) != TOKEN_KNOTS:
        return None
    costs = [*msg.verify_ms_at_knots, msg.draft_step_ms, msg.draft_ms_per_token, msg.proposer_rtt_ms]
    slopes = [msg.verify_ms_per_request, msg.verify_ms_per_kv_token]  # fitted: may lean either way
    if not all(math.isfinite(v) and v >= 0 for v in costs) or not all(math.isfinite(v) for v in slopes):
        return None
    return CostParams(
        tuple(msg.verify_ms_at_knots),
        msg.verify_ms_per_request,
        msg.verify_ms_per_kv_token,
        msg.draft_step_ms,
        msg.draft_ms_per_token,
        msg.proposer_rtt_ms,
        msg.verify_relative_error,
        msg.num_steps,
    )


def policy_to_pb(snap: Snapshot) -> pb.Policy:
    return pb.Policy(
        mode=MODE_TO_PB[snap.policy.mode],
        k=snap.policy.k,
        k_max=snap.policy.k_max,
        cost_model=cost_to_pb(snap.cost),
        acceptance_prior=snap.acceptance_prior,
        acceptance_prior_weight=snap.acceptance_prior_weight,
        version=snap.version,
    )


def policy_from_pb(msg: pb.Policy) -> tuple[Policy, CostParams | None, float]:
    """Raises ValueError naming the field when a pushed value is out of bounds: a verifier
    applies nothing it would not accept from its own command line."""
    mode = MODE_FROM_PB.get(msg.mode)
    if mode is None:
        raise ValueError(f"mode: unknown value {msg.mode}")
    if mode == Mode.FIXED and not 1 <= msg.k <= MAX_K:
        raise ValueError(f"k: must be in [1, {MAX_K}] for fixed mode, got {msg.k}")
    if not 0 <= msg.k_max <= MAX_K or (mode in (Mode.SMARTSPEC, Mode.UNIFORM) and msg.k_max < 1):
        raise ValueError(f"k_max: must be in [1, {MAX_K}], got {msg.k_max}")
    if not (math.isfinite(msg.acceptance_prior) and 0 <= msg.acceptance_prior <= 1):
        raise ValueError(f"acceptance_prior: must be in [0, 1], got {msg.acceptance_prior}")
    return (
        Policy(mode, msg.k if mode == Mode.FIXED else 0, msg.k_max),
        cost_from_pb(msg.cost_model),
        msg.acceptance_prior,
    )


def step_to_pb(step: StepRecord) -> pb.StepMetrics:
    return pb.StepMetrics(
        step_id=step.step_id,
        batch_size=step.batch_size,
        num_batched_tokens=step.num_batched_tokens,
        num_kv_tokens=step.num_kv_tokens,
        num_prefill_tokens=step.num_prefill_tokens,
        proposed=[p for _, p, _ in step.drafts],
        accepted=[a for _, _, a in step.drafts],
        verify_ms=step.verify_ms,
        propose_ms=step.propose_ms,
        draft_ms=step.draft_ms,
        draft_busy_ms=step.draft_busy_ms,
        step_ms=step.step_ms,
        emitted_tokens=step.emitted_tokens,
        draft_steps=step.draft_steps,
        draft_tokens=step.draft_tokens,
        planned_k=step.planned_k,
    )


def step_from_pb(msg: pb.StepMetrics) -> StepRecord:
    return StepRecord(
        step_id=msg.step_id,
        batch_size=msg.batch_size,
        num_batched_tokens=msg.num_batched_tokens,
        num_kv_tokens=msg.num_kv_tokens,
        num_prefill_tokens=msg.num_prefill_tokens,
        verify_ms=msg.verify_ms,
        planned_k=tuple(msg.planned_k),
        drafts=tuple(("", p, a) for p, a in zip(msg.proposed, msg.accepted)),
        propose_ms=msg.propose_ms,
        draft_ms=msg.draft_ms,
        draft_busy_ms=msg.draft_busy_ms,
        step_ms=msg.step_ms,
        emitted_tokens=msg.emitted_tokens,
    )
