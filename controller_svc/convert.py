"""Messages <-> the controller library's plain types, for both ends of Controller.Connect."""

from __future__ import annotations

from controller.cost_model import TOKEN_KNOTS, CostParams, StepSample
from controller.policy import Mode, Policy
from controller.state import Snapshot, StepReport
from smartspec.v1 import controller_pb2 as pb

MODE_TO_PB = {Mode.OFF: pb.POLICY_MODE_OFF, Mode.FIXED: pb.POLICY_MODE_FIXED,
              Mode.SMARTSPEC: pb.POLICY_MODE_SMARTSPEC, Mode.UNIFORM: pb.POLICY_MODE_SMARTSPEC_UNIFORM}
MODE_FROM_PB = {v: k for k, v in MODE_TO_PB.items()}


def cost_to_pb(cost: CostParams) -> pb.CostModel:
    return pb.CostModel(
        verify_token_knots=TOKEN_KNOTS, verify_ms_at_knots=cost.verify_ms_at_knots,
        verify_ms_per_kv_token=cost.verify_ms_per_kv_token, verify_ms_per_request=cost.verify_ms_per_request,
        draft_step_ms=cost.draft_step_ms, draft_ms_per_token=cost.draft_ms_per_token,
        proposer_rtt_ms=cost.proposer_rtt_ms, verify_relative_error=cost.verify_relative_error,
        num_steps=cost.num_steps)


def cost_from_pb(msg: pb.CostModel) -> CostParams | None:
    """None when the controller has not fitted anything, or fitted over other knots."""
    if not msg.num_steps or tuple(msg.verify_token_knots) != TOKEN_KNOTS:
        return None
    return CostParams(tuple(msg.verify_ms_at_knots), msg.verify_ms_per_request, msg.verify_ms_per_kv_token,
                      msg.draft_step_ms, msg.draft_ms_per_token, msg.proposer_rtt_ms, msg.verify_relative_error,
                      msg.num_steps)


def policy_to_pb(snap: Snapshot) -> pb.Policy:
    return pb.Policy(mode=MODE_TO_PB[snap.policy.mode], k=snap.policy.k, k_max=snap.policy.k_max,
                     cost_model=cost_to_pb(snap.cost), acceptance_prior=snap.acceptance_prior,
                     acceptance_prior_weight=snap.acceptance_prior_weight, version=snap.version)


def policy_from_pb(msg: pb.Policy) -> tuple[Policy, CostParams | None, float]:
    mode = MODE_FROM_PB.get(msg.mode, Mode.OFF)
    return Policy(mode, msg.k if mode == Mode.FIXED else 0, msg.k_max), cost_from_pb(msg.cost_model), \
        msg.acceptance_prior


def step_to_pb(step_id: int, stats, propose_ms: float, draft_ms: float, step_ms: float,
               emitted_tokens: int) -> pb.StepMetrics:
    """`stats`: the engine's StepStats."""
    return pb.StepMetrics(
        step_id=step_id, batch_size=stats.batch_size, num_batched_tokens=stats.num_batched_tokens,
        num_kv_tokens=stats.num_kv_tokens, num_prefill_tokens=stats.num_prefill_tokens,
        proposed=[p for _, p, _ in stats.drafts], accepted=[a for _, _, a in stats.drafts],
        verify_ms=(stats.forward_s + stats.sample_s) * 1e3, propose_ms=propose_ms, draft_ms=draft_ms,
        step_ms=step_ms, emitted_tokens=emitted_tokens, draft_steps=max(stats.planned, default=0),
        draft_tokens=sum(stats.planned), planned_k=stats.planned)


def report_from_pb(msg: pb.StepMetrics) -> StepReport:
    sample = StepSample(msg.batch_size, msg.num_batched_tokens, msg.num_kv_tokens, msg.verify_ms,
                        msg.draft_steps, msg.draft_tokens, msg.propose_ms, msg.draft_ms)
    return StepReport(sample, list(zip(msg.proposed, msg.accepted)), list(msg.planned_k), msg.emitted_tokens,
                      msg.step_ms)
