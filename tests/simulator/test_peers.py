"""Each peer's rule for k on hand-made situations, against its documented behaviour."""

from __future__ import annotations

import pytest

from controller.cost_model import CostModelFitter, linear_prior
from controller.step import StepRecord
from engine.scheduler import ScheduledItem, Sequence
from runtime.sampler import SamplingParams
from simulator.model import DraftCost
from simulator.peers import (
    HFHeuristic,
    PaperController,
    SGLangAdaptive,
    TRTLLMSchedule,
    VLLMDynamic,
    VLLMv0Disable,
    make_planner,
    tuned_table,
)


def decoding(n: int, room: int = 100) -> list[ScheduledItem]:
    """n requests each decoding (one pending token, a token sampled) with `room` tokens left."""
    items = []
    for i in range(n):
        seq = Sequence(str(i), [1, 2, 3], SamplingParams(max_new_tokens=room + 2), output_ids=[5])
        items.append(ScheduledItem(seq, num_new=1, sample=True))
    return items


def step(drafts) -> StepRecord:
    return StepRecord(batch_size=1, num_batched_tokens=1, num_kv_tokens=1, verify_ms=0.0, drafts=tuple(drafts))


def test_every_peer_leaves_prefill_alone_and_respects_the_room_left():
    prefill = ScheduledItem(Sequence("p", [1] * 8, SamplingParams()), num_new=8, sample=True)
    for peer in (HFHeuristic(), VLLMv0Disable(4, 100), TRTLLMSchedule({64: 4}), VLLMDynamic([(1, 64, 4)])):
        assert peer.plan([prefill, *decoding(1, room=2)]) == [0, 2]


def test_hf_heuristic_adds_two_after_all_kept_and_drops_one_otherwise():
    hf = HFHeuristic(start=3)
    items = decoding(2)
    assert hf.plan(items) == [3, 3]
    hf.observe(step([("0", 3, 3), ("1", 3, 1)]))
    assert hf.plan(items) == [5, 2]
    for _ in range(5):
        hf.observe(step([("0", 5, 5), ("1", 2, 0)]))
    assert hf.plan(items) == [8, 1]  # capped at MAX_K; never below 1
    hf.release("0")
    assert hf.plan(items)[0] == 3


def test_vllm_dynamic_ranges_gaps_take_the_range_before_and_past_the_last_the_last():
    peer = VLLMDynamic([(1, 16, 3), (32, 128, 2), (256, 2048, 0)], num_speculative_tokens=8)
    assert [peer.choose(None, b) for b in (1, 16, 17, 31, 32, 128, 129, 255, 256, 5000)] == [
        3,
        3,
        3,
        3,
        2,
        2,
        2,
        2,
        0,
        0,
    ]
    assert VLLMDynamic([(1, 8, 5)], num_speculative_tokens=2).choose(None, 1) == 2
    with pytest.raises(ValueError):
        VLLMDynamic([(2, 8, 5)])


def test_vllm_v0_disables_every_request_once_the_running_batch_reaches_the_threshold():
    peer = VLLMv0Disable(k=4, disable_at=3)
    assert peer.plan(decoding(2)) == [4, 4]
    assert peer.plan(decoding(3)) == [0, 0, 0]


def test_trtllm_each_length_applies_up_to_its_key_and_nothing_past_the_largest():
    peer = TRTLLMSchedule({4: 4, 8: 2, 32: 1})
    assert [peer.choose(None, b) for b in (1, 4, 5, 8, 9, 32, 33)] == [4, 4, 2, 2, 1, 1, 0]


def test_sglang_buckets_pad_to_a_graph_size_then_take_the_largest_key_below():
    peer = SGLangAdaptive()
    assert [peer.slot(b).candidates for b in (1, 3, 5, 8, 20, 64, 100)] == [
        [1, 3, 5, 7], [1, 3, 5, 7], [0, 1, 3], [0, 1, 3], [0, 1, 3], [0], [0]
    ]  # fmt: skip


def test_sglang_steps_down_to_what_the_drafts_earn_after_warm_up():
    peer = SGLangAdaptive()
    items = decoding(1)
    for verify in range(1, 16):
        ks = peer.plan(items)
        assert ks == [7 if verify <= 15 else 3]
        peer.observe(step([("0", ks[0], 1)]))  # one draft kept a step
    # EMA from 6 towards 1: about 1.18 at the 15th verify; 1.18 <= 5 - 0.75 and <= 3 - 0.75, > 1 - 0.75.
    assert peer.plan(items) == [3]
    empty = SGLangAdaptive({1: ([0, 2], 0.0)})
    empty.slots[1].index = 0
    for _ in range(15):
        empty.plan(items)
        empty.observe(step([]))
    assert empty.plan(items) == [2]  # a bucket at 0 probes the next candidate


def test_paper_controller_rechooses_one_k_every_interval_with_a_margin_for_off():
    flat = linear_prior(0.0, 20.0)  # verifying more tokens costs nothing: drafts pay if kept
    peer = PaperController(flat, interval=4, prior_rate=0.9)
    items = decoding(4)
    assert peer.plan(items) == [8] * 4
    for _ in range(3):  # within the interval k stays, whatever happens
        peer.observe(step([(str(i), 8, 0) for i in range(4)]))
        assert peer.plan(items) == [8] * 4
    for _ in range(40):
        peer.observe(step([(str(i), 8, 0) for i in range(4)]))
    peer.steps = 0
    assert peer.plan(items) == [0] * 4  # nothing kept: off


def test_table_peers_are_tuned_on_the_profile(profile):
    cheap = linear_prior(0.0, 10.0)  # flat: the best k is the largest at any batch size
    steep = linear_prior(5.0, 1.0)  # every token costs: drafting loses at a low acceptance
    assert set(tuned_table(cheap, 0.8, DraftCost(step_ms=0.0, hop_ms=0.0), 100).values()) == {8}
    assert set(tuned_table(steep, 0.2, DraftCost(), 100).values()) == {0}
    assert isinstance(make_planner("trtllm", profile), TRTLLMSchedule)
    ours = make_planner("fixed:2", profile)
    assert ours.policy.k == 2
    # Seeded as a verifier's --cost-profile seeds it: the profile's steps are in its fit.
    fitted = CostModelFitter().seed(profile).verify_ms_at_knots
    assert ours.cost.verify_ms_at_knots == pytest.approx(fitted, rel=1e-3)
