"""n-gram prompt lookup."""

from __future__ import annotations

import random

import pytest

from drafting.ngram import NgramIndex


def brute_force(tokens: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    for n in range(n_max, n_min - 1, -1):
        if len(tokens) < n:
            continue
        suffix = tokens[-n:]
        for start in range(len(tokens) - n - 1, -1, -1):  # latest earlier occurrence first
            if tokens[start : start + n] == suffix:
                return tokens[start + n : start + n + k]
    return []


def test_continues_the_longest_match():
    idx = NgramIndex(1, 3)
    idx.extend([1, 2, 3, 4, 5, 9, 2, 3])
    assert idx.propose(2) == [4, 5]  # "2 3" matched; "9 2 3" did not occur before
    idx.extend([7])
    assert idx.propose(3) == []  # 7 never occurred before


def test_prefers_longer_and_then_later_matches():
    idx = NgramIndex(1, 2)
    idx.extend([5, 1, 8, 6, 1, 9, 5, 1])
    assert idx.propose(1) == [8]  # "5 1" -> 8 beats the later "1" -> 9
    idx = NgramIndex(1, 1)
    idx.extend([1, 8, 1, 9, 1])
    assert idx.propose(1) == [9]  # the latest occurrence of "1"


def test_proposal_is_cut_at_the_end_of_the_context():
    idx = NgramIndex(1, 2)
    idx.extend([3, 4, 3])
    assert idx.propose(5) == [4, 3]


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force_on_random_contexts(seed):
    rng = random.Random(seed)
    idx = NgramIndex(2, 4)
    tokens: list[int] = []
    for _ in range(300):
        chunk = [rng.randrange(6) for _ in range(rng.randrange(1, 4))]
        idx.extend(chunk)
        tokens += chunk
        k = rng.randrange(0, 6)
        assert idx.propose(k) == brute_force(tokens, k, 2, 4)


def test_rejects_bad_bounds():
    with pytest.raises(ValueError):
        NgramIndex(0, 3)
    with pytest.raises(ValueError):
        NgramIndex(3, 2)
