"""The rejection sampler keeps the target's distribution exactly."""

from __future__ import annotations

import math

import pytest
import torch

from runtime.draft import Draft
from runtime.rejection import verify
from runtime.sampler import SamplingParams, processed_probs

V = 6


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
    assert verify(logits, Draft([2, 4, 1]), params, None).token_ids == [2, 4, 1, 3]  # all + bonus
    got = verify(logits, Draft([2, 0, 1]), params, None)
    assert got.token_ids == [2, 4] and got.num_accepted == 1  # corrected at the mismatch
    assert verify(logits[:1], Draft([]), params, None).token_ids == [2]  # k = 0 is plain decoding


@pytest.mark.parametrize("draft_kind", ["sparse", "one-hot"])
def test_first_token_follows_the_target_and_acceptance_is_exact(draft_kind):
    gen = torch.Generator().manual_seed(0)
    params = SamplingParams(temperature=0.9, top_k=5, seed=0)
    logits = torch.tensor([[1.0, 0.2, -0.5, 2.0, 0.0, -3.0], [0.3, 0.1, 0.0, -1.0, 2.0, 0.5]])
    p_target = processed_probs(logits, [params] * 2)[0]
    q = torch.tensor([0.1, 0.5, 0.3, 0.1, 0.0, 0.0])  # the draft over-weights token 1
    counts = torch.zeros(V)
    accepted = 0
    n = 6000
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=gen)) if draft_kind == "sparse" else 1
        probs = [([0, 1, 2, 3], q[:4].tolist())] if draft_kind == "sparse" else None
        out = verify(logits, Draft([x], probs), params, gen)
        counts[out.token_ids[0]] += 1
        accepted += out.num_accepted
    assert chi_square_p_value(counts, p_target) > 0.01
    if draft_kind == "sparse":
        expected = float(torch.minimum(q, p_target).sum())  # sum_x q(x) min(1, p(x)/q(x))
    else:
        expected = float(p_target[1])
    assert abs(accepted / n - expected) < 4 * math.sqrt(expected * (1 - expected) / n)


def test_bonus_token_follows_the_last_row():
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=1)
    logits = torch.tensor([[-9.0, -9.0, 9.0, -9.0, -9.0, -9.0], [0.5, 1.5, 0.0, 1.0, -1.0, 0.2]])
    counts = torch.zeros(V)
    for _ in range(3000):
        out = verify(logits, Draft([2]), params, gen)  # the target is sure of token 2: always accepted
        assert out.num_accepted == 1
        counts[out.token_ids[1]] += 1
    assert chi_square_p_value(counts, processed_probs(logits, [params] * 2)[1]) > 0.01


def test_draft_outside_the_target_support_is_always_rejected():
    gen = torch.Generator().manual_seed(2)
    params = SamplingParams(temperature=1.0, top_k=2, seed=2)
    logits = torch.tensor([[3.0, 2.0, 0.0, 0.0, 0.0, 0.0], [0.0] * V])
    for _ in range(200):
        out = verify(logits, Draft([5], [([5], [1.0])]), params, gen)
        assert out.num_accepted == 0 and out.token_ids[0] in (0, 1)


def test_seeded_verification_is_reproducible():
    params = SamplingParams(temperature=0.7, seed=3)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(4))
    draft = Draft([1, 2, 3], [([1, 2], [0.6, 0.4]), ([2], [1.0]), ([3, 4], [0.5, 0.5])])
    runs = [
        [verify(logits, draft, params, torch.Generator().manual_seed(9)).token_ids for _ in range(1)] for _ in range(2)
    ]
    assert runs[0] == runs[1]
