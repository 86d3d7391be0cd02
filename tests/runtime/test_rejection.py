"""The rejection sampler keeps the target's distribution exactly."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.draft import Draft
from runtime.rejection import NOT_FINITE, SampleRequest, verify
from runtime.sampler import SamplingParams, processed_probs

V = 6


def verify_one(logits, draft, params, seed=0, position=0):
    return verify(logits, [SampleRequest(params, draft, seed, position)])[0]


def verify_trials(logits, drafts, params):
    """One batch of independent trials: trial i is a request with seed i over its own copy of the rows."""
    requests = [SampleRequest(params, d, seed=i) for i, d in enumerate(drafts)]
    return verify(logits.repeat(len(drafts), 1), requests)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum()
    support = probs > 0
    assert counts[~support].sum() == 0, "drew a token the target gives probability 0"
    expected = probs[support] * n
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = int(support.sum()) - 1
    return 1.0 - float(torch.distributions.Chi2(torch.tensor(float(df))).cdf(torch.tensor(stat)))


def test_greedy_accepts_the_matching_prefix_then_corrects():
    logits = torch.full((4, V), -5.0)
    for row, best in enumerate([2, 4, 1, 3]):
        logits[row, best] = 5.0
    params = SamplingParams()
    assert verify_one(logits, Draft([2, 4, 1]), params).token_ids == [2, 4, 1, 3]  # all + bonus
    got = verify_one(logits, Draft([2, 0, 1]), params)
    assert got.token_ids == [2, 4] and got.num_accepted == 1  # corrected at the mismatch
    assert verify_one(logits[:1], Draft([]), params).token_ids == [2]  # k = 0 is plain decoding
    assert verify_one(logits[:1], None, params).token_ids == [2]


def test_a_batch_of_different_draft_lengths_and_modes():
    """Requests with k = 0..3, greedy and sampled, in one call: each reads its own rows."""
    logits = torch.full((10, V), -5.0)
    best = [2, 4, 1, 3, 0, 5, 5, 1, 2, 3]
    logits[torch.arange(10), torch.tensor(best)] = 5.0
    sure = SamplingParams(temperature=1.0, top_k=1, seed=4)  # sampled, but only one token survives top-k
    requests = [
        SampleRequest(SamplingParams(), Draft([2, 4, 0])),  # rows 0-3: rejected at the third draft
        SampleRequest(sure, None, seed=5),  # row 4
        SampleRequest(sure, Draft([5, 5], [([5, 1], [0.5, 0.5]), ([5], [1.0])]), seed=6),  # rows 5-7: all kept
        SampleRequest(SamplingParams(), Draft([3])),  # rows 8-9: rejected at once
    ]
    got = verify(logits, requests)
    assert [v.token_ids for v in got] == [[2, 4, 1], [0], [5, 5, 1], [2]]
    assert [v.num_accepted for v in got] == [2, 0, 2, 0]


@pytest.mark.parametrize("draft_kind", ["sparse", "one-hot"])
def test_first_token_follows_the_target_and_acceptance_is_exact(draft_kind):
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.9, top_k=5, seed=0)
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -3.0], [0.3, 0.1, 0.0, -1.0, 2.0, 0.5]])
    p_target = processed_probs(logits, [params] * 2)[0]
    q = torch.tensor([0.1, 0.5, 0.3, 0.1, 0.0, 0.0])  # the draft over-weights token 1
    n = 6000
    if draft_kind == "sparse":
        xs = torch.multinomial(q, n, replacement=True, generator=gen).tolist()
        drafts = [Draft([x], [([0, 1, 2, 3], q[:4].tolist())]) for x in xs]
    else:
        drafts = [Draft([1])] * n
    outs = verify_trials(logits, drafts, params)
    counts = torch.bincount(torch.tensor([o.token_ids[0] for o in outs]), minlength=V).float()
    accepted = sum(o.num_accepted for o in outs)
    assert chi_square_p_value(counts, p_target) > 0.01
    if draft_kind == "sparse":
        expected = float(torch.minimum(q, p_target).sum())  # sum_x q(x) min(1, p(x)/q(x))
    else:
        expected = float(p_target[1])
    assert abs(accepted / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_bonus_token_follows_the_last_row():
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    logits = torch.tensor([[-9.0, -9.0, 9.0, -9.0, -9.0, -9.0], [0.5, 1.5, 0.0, 1.0, -1.0, 0.2]])
    outs = verify_trials(logits, [Draft([2])] * 3000, params)  # the target is sure of token 2: always accepted
    assert all(o.num_accepted == 1 for o in outs)
    counts = torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=V).float()
    assert chi_square_p_value(counts, processed_probs(logits, [params] * 2)[1]) > 0.01


def test_draft_outside_the_target_support_is_always_rejected():
    params = SamplingParams(temperature=1.0, top_k=2, seed=2)
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0] * V])
    for out in verify_trials(logits, [Draft([5], [([5], [1.0])])] * 200, params):
        assert out.num_accepted == 0 and out.token_ids[0] in (0, 1)


def test_seeded_verification_is_reproducible():
    params = SamplingParams(temperature=0.7, seed=3)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(4))
    draft = Draft([1, 2, 3], [([1, 2], [0.6, 0.4]), ([2], [1.0]), ([3, 4], [0.5, 0.5])])
    runs = [[verify_one(logits, draft, params, seed=9, position=p).token_ids for p in range(30)] for _ in range(2)]
    assert runs[0] == runs[1]
    other = [verify_one(logits, draft, params, seed=10, position=p).token_ids for p in range(30)]
    assert other != runs[0]


def test_every_position_of_a_long_draft_follows_the_target():
    """k = 3 sparse drafts per trial: the token emitted at position j, given the drafts before it
    were kept, follows the target's row j (rows are the target after those drafts)."""
    gen = torch.Generator().manual_seed(5)
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=5)
    logits = torch.randn(4, V, generator=gen) * 0.7
    p_target = processed_probs(logits, [params] * 4)
    q = torch.softmax(torch.randn(3, V, generator=gen), dim=1)  # the draft's own, different, rows
    n = 8000
    xs = torch.stack([torch.multinomial(q[j], n, replacement=True, generator=gen) for j in range(3)], dim=1)
    support = [(list(range(V)), q[j].tolist()) for j in range(3)]
    outs = verify_trials(logits, [Draft(x, support) for x in xs.tolist()], params)
    for j in range(3):
        reached = [o.token_ids[j] for o in outs if o.num_accepted >= j]
        counts = torch.bincount(torch.tensor(reached), minlength=V).float()
        assert len(reached) > 1000 and chi_square_p_value(counts, p_target[j]) > 0.01, j


def test_logprobs_are_the_processed_target_rows_that_decided_each_token():
    """Every emitted token's log-probability is read from the row that decided it, after the
    request's temperature and top-k, whether the token was an accepted draft or not; requests
    that do not ask get none, and the top alternatives are the row's most likely tokens."""
    torch.manual_seed(0)
    logits = torch.randn(7, V) * 3
    greedy_lp = SamplingParams(logprobs=3)
    sampled_lp = SamplingParams(temperature=0.7, top_k=3, logprobs=5, seed=1)
    best = logits.argmax(dim=1).tolist()
    requests = [
        SampleRequest(greedy_lp, Draft([best[0], best[1]])),  # rows 0-2: both drafts kept + bonus
        SampleRequest(SamplingParams(), None),  # row 3: does not ask
        SampleRequest(sampled_lp, Draft([best[4], best[5]], [([best[4]], [1.0]), ([best[5]], [1.0])]), seed=3),
    ]
    got = verify(logits, requests)
    assert got[1].logprobs is None
    assert got[0].token_ids == best[:3]
    for i, (token, entry) in enumerate(zip(got[0].token_ids, got[0].logprobs)):
        row = torch.log_softmax(logits[i], dim=0)
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-6)
        assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
    processed = torch.log(processed_probs(logits[4:7], [sampled_lp] * 3))
    for i, (token, entry) in enumerate(zip(got[2].token_ids, got[2].logprobs)):
        assert entry.logprob == pytest.approx(float(processed[i, token]), abs=1e-5)
        assert len(entry.top) == 3  # top-k left three tokens: the -inf rest is not offered
        assert [t for t, _ in entry.top] == processed[i].topk(3).indices.tolist()


def test_logprobs_on_the_plain_greedy_path_with_zero_alternatives():
    logits = torch.randn(2, V)
    got = verify(logits, [SampleRequest(SamplingParams(logprobs=0)), SampleRequest(SamplingParams())])
    assert got[0].logprobs[0].top == ()
    assert got[0].logprobs[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], 0).max()), abs=1e-6)
    assert got[1].logprobs is None


def test_plain_greedy_rows_that_are_not_finite_fail_alone():
    """NaN or +inf anywhere in a row fails that request; -inf is a masked token, ties go to the
    first maximum (as argmax)."""

    logits = torch.tensor(
        [
            [0.0, 2.0, 2.0, -1.0],  # tie: the first
            [0.0, float("nan"), 5.0, 1.0],
            [float("inf"), 0.0, 1.0, 2.0],
            [float("-inf"), -3.0, float("-inf"), -4.0],
        ]
    )
    out = verify(logits, [SampleRequest(SamplingParams(), None, 0, 0)] * 4)
    assert [(v.token_ids, v.error) for v in out] == [([1], ""), ([], NOT_FINITE), ([], NOT_FINITE), ([1], "")]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_request_with_non_finite_rows_leaves_the_rest_of_a_sampled_batch_as_it_was(bad):
    """Speculating and sampled requests beside one whose rows hold NaN or +inf: that one fails,
    and every other request emits exactly what it emits in a batch without it."""
    gen = torch.Generator().manual_seed(3)
    v = 7
    requests = [
        SampleRequest(
            SamplingParams(temperature=0.9, top_p=0.8, seed=1),
            Draft([2, 4], [([2, 3], [0.7, 0.3]), ([4], [1.0])]),
            1,
            5,
        ),
        SampleRequest(SamplingParams(), Draft([1])),
        SampleRequest(SamplingParams(temperature=1.1, top_k=3, seed=2), None, 2, 0),
        SampleRequest(
            SamplingParams(temperature=0.7, seed=4),
            Draft([0, 6, 5], [([0], [1.0]), ([6, 1], [0.5, 0.5]), ([5], [1.0])]),
            4,
            9,
        ),
    ]
    rows = [3, 2, 1, 4]
    logits = torch.randn(sum(rows), v, generator=gen) * 2
    alone = verify(logits, requests)
    poisoned = SampleRequest(
        SamplingParams(temperature=0.8, seed=9), Draft([3, 3], [([3], [1.0]), ([3, 2], [0.6, 0.4])]), 9, 2
    )
    bad_rows = torch.randn(3, v, generator=gen)
    bad_rows[1, 2] = bad
    for at in range(len(requests) + 1):
        start = sum(rows[:at])
        mixed = torch.cat([logits[:start], bad_rows, logits[start:]])
        got = verify(mixed, requests[:at] + [poisoned] + requests[at:])
        assert got[at].error == NOT_FINITE and got[at].token_ids == []
        others = got[:at] + got[at + 1 :]
        assert [(r.token_ids, r.num_accepted, r.error) for r in others] == [
            (r.token_ids, r.num_accepted, r.error) for r in alone
        ]
