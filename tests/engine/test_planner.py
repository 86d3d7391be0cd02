"""The verifier's planning seam: policies, overrides, and the goodput planner fed by live outcomes."""

from __future__ import annotations

import pytest

from controller.cost_model import TOKEN_KNOTS, CostParams
from controller.policy import MAX_K, Mode, Policy
from controller.step import StepRecord
from engine.planner import SpecPlanner
from engine.scheduler import ScheduledItem, Sequence
from runtime.sampler import SamplingParams

FLAT = CostParams(tuple(30.0 for _ in TOKEN_KNOTS), proposer_rtt_ms=0.5, num_steps=1000)
STEEP = CostParams(tuple(10.0 + 8.0 * k for k in TOKEN_KNOTS), draft_step_ms=2.0, proposer_rtt_ms=0.5, num_steps=1000)


def decoding(request_id: str, max_new_tokens: int = 64, **spec) -> ScheduledItem:
    seq = Sequence(request_id, [1, 2, 3], SamplingParams(max_new_tokens=max_new_tokens), **spec)
    seq.num_computed = 2
    return ScheduledItem(seq, 1, sample=True)


def step(drafts=(), batch_size: int = 2, tokens: int = 10, ms: float = 30.0) -> StepRecord:
    return StepRecord(
        batch_size=batch_size, num_batched_tokens=tokens, num_kv_tokens=100, verify_ms=ms, drafts=tuple(drafts)
    )


def prefill(request_id: str) -> ScheduledItem:
    return ScheduledItem(Sequence(request_id, list(range(40)), SamplingParams()), 32, sample=False)


@pytest.mark.parametrize(
    "text,policy",
    [
        ("off", Policy()),
        ("fixed:3", Policy(Mode.FIXED, 3)),
        ("smartspec", Policy(Mode.SMARTSPEC, 0, MAX_K)),
        ("smartspec:4", Policy(Mode.SMARTSPEC, 0, 4)),
        ("smartspec-uniform", Policy(Mode.UNIFORM, 0, MAX_K)),
    ],
)
def test_parse_round_trip(text, policy):
    assert Policy.parse(text) == policy
    assert Policy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["fixed", "fixed:0", "fixed:9", "smartspec:0", "smartspec:x", "off:1", "auto"])
def test_parse_rejects(text):
    with pytest.raises(ValueError, match="policy must be"):
        Policy.parse(text)


def test_fixed_and_overrides():
    planner = SpecPlanner(Policy.fixed(3))
    items = [
        decoding("a"),
        decoding("b", policy=Policy()),
        decoding("c", policy=Policy(Mode.FIXED, 5)),
        prefill("d"),
        decoding("e", max_new_tokens=2),
    ]
    # e may emit one more token after this step's: at most one draft.
    assert planner.plan(items) == [3, 0, 5, 0, 1]


def test_goodput_policy_follows_the_cost_model():
    planner = SpecPlanner(Policy.parse("smartspec"))
    items = [decoding(str(i)) for i in range(8)]
    planner.apply(planner.policy, FLAT)
    assert all(k > 0 for k in planner.plan(items))
    planner.apply(planner.policy, STEEP)
    assert planner.plan(items) == [0] * 8


def test_learns_acceptance_per_request_from_outcomes():
    planner = SpecPlanner(Policy.parse("smartspec"))
    planner.apply(
        planner.policy, CostParams(tuple(30.0 + 0.3 * k for k in TOKEN_KNOTS), proposer_rtt_ms=0.5, num_steps=1000)
    )
    items = [decoding("good"), decoding("bad")]
    for _ in range(50):
        planner.observe(step([("good", 4, 4), ("bad", 4, 0)]))
    good, bad = planner.plan(items)
    assert good > bad
    planner.release("good")
    assert "good" not in planner.acceptance._requests


def test_uniform_gives_one_k():
    planner = SpecPlanner(Policy.parse("smartspec-uniform"))
    planner.apply(planner.policy, FLAT)
    for _ in range(50):
        planner.observe(step([("good", 4, 4), ("bad", 4, 0)]))
    ks = planner.plan([decoding("good"), decoding("bad")])
    assert ks[0] == ks[1] > 0


def test_proposer_caps_limit_the_plan():
    planner = SpecPlanner(Policy.parse("smartspec"))
    planner.apply(planner.policy, FLAT)
    item = decoding("a")
    item.seq.draft_cap = 1  # the n-gram proposer found nothing last step
    assert planner.plan([item]) == [1]


def test_local_fit_until_a_cost_model_is_pushed():
    planner = SpecPlanner(Policy.parse("smartspec"))
    for _ in range(40):
        planner.observe(step(batch_size=4, tokens=4, ms=50.0))
    assert planner.cost is planner.fitter.params
    planner.apply(planner.policy, FLAT)
    assert planner.cost is FLAT
    planner.apply(planner.policy, None)  # controller gone
    assert planner.cost is planner.fitter.params


def test_a_young_pushed_model_does_not_replace_the_calibrated_local_fit():
    planner = SpecPlanner(Policy.parse("smartspec"))
    planner.apply(planner.policy, CostParams(tuple(30.0 for _ in TOKEN_KNOTS), num_steps=10))
    assert planner.cost is planner.fitter.params
