import itertools

import numpy as np
import pytest

from controller.cost_model import TOKEN_KNOTS, CostParams
from controller.goodput import Batch, expected_tokens, goodput, plan


def random_cost(rng) -> CostParams:
    """Flat for a random number of knots, then rising at a random slope; random draft and hop costs."""
    widths = np.diff(np.concatenate([[0], TOKEN_KNOTS]))
    rise = rng.uniform(0, 3, len(TOKEN_KNOTS)) * widths * rng.uniform(0, 1)
    rise[: rng.integers(0, len(TOKEN_KNOTS))] = 0
    knots = tuple(rng.uniform(5, 50) + np.cumsum(rise))
    return CostParams(
        knots, rng.uniform(0, 1), rng.uniform(0, 0.01), rng.uniform(0, 10), rng.uniform(0, 3), rng.uniform(0, 5)
    )


def brute_force(cost, batch, rates, caps):
    return max(goodput(cost, batch, rates, np.array(ks)) for ks in itertools.product(*[range(c + 1) for c in caps]))


def test_expected_tokens():
    assert expected_tokens(np.array([0.5]), np.array([0]))[0] == 1
    assert expected_tokens(np.array([0.5]), np.array([2]))[0] == pytest.approx(1.75)
    assert expected_tokens(np.array([1.0]), np.array([3]))[0] == 4


@pytest.mark.parametrize("uniform", [False, True])
def test_against_brute_force_for_small_batches(uniform):
    rng = np.random.default_rng(0)
    worst = 1.0
    for _ in range(300):
        b, k_max = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        cost, rates = random_cost(rng), rng.uniform(0, 1, b)
        caps = rng.integers(0, k_max + 1, b)
        batch = Batch(b + int(rng.integers(0, 3)), b + int(rng.integers(0, 20)), int(rng.integers(10, 5000)))
        ks = plan(rates, caps, cost, batch, k_max, uniform=uniform)
        assert ((0 <= ks) & (ks <= caps)).all()
        if uniform:
            assert len({min(int(k), int(c)) for k, c in zip(ks, caps) if k < c or k == ks.max()}) <= 1
        worst = min(worst, goodput(cost, batch, rates, ks) / brute_force(cost, batch, rates, caps))
    if uniform:
        assert worst > 0.5  # one k for the batch is allowed to lose something
    else:
        assert worst >= 0.98


def test_per_request_beats_uniform_on_mixed_acceptance():
    cost = CostParams(tuple(20.0 + 0.5 * k for k in TOKEN_KNOTS), proposer_rtt_ms=1.0)
    rates = np.array([0.95, 0.95, 0.05, 0.05])
    batch = Batch(4, 4, 400)
    per_request = plan(rates, np.full(4, 8), cost, batch, 8)
    uniform = plan(rates, np.full(4, 8), cost, batch, 8, uniform=True)
    assert per_request[:2].min() > per_request[2:].max()
    assert goodput(cost, batch, rates, per_request) > goodput(cost, batch, rates, uniform)


def test_no_speculation_when_verify_is_steep_and_acceptance_low():
    steep = CostParams(tuple(10.0 + 8.0 * k for k in TOKEN_KNOTS), draft_step_ms=2.0, proposer_rtt_ms=0.5)
    rates = np.full(16, 0.3)
    assert plan(rates, np.full(16, 8), steep, Batch(16, 16, 16 * 200), 8).sum() == 0
    assert plan(rates, np.full(16, 8), steep, Batch(16, 16, 16 * 200), 8, uniform=True).sum() == 0


def test_speculates_when_verify_is_flat():
    flat = CostParams(tuple(30.0 + 0.001 * k for k in TOKEN_KNOTS), draft_step_ms=1.0, proposer_rtt_ms=0.5)
    ks = plan(np.full(16, 0.6), np.full(16, 8), flat, Batch(16, 16, 16 * 200), 8)
    assert (ks > 0).all()


def test_caps_limit_what_is_planned():
    flat = CostParams(tuple(30.0 for _ in TOKEN_KNOTS))
    ks = plan(np.array([0.9, 0.9, 0.9]), np.array([0, 2, 8]), flat, Batch(3, 3, 30), 4)
    assert ks.tolist() == [0, 2, 4]


def test_empty_and_disabled():
    cost = CostParams(tuple(1.0 for _ in TOKEN_KNOTS))
    assert plan(np.array([]), np.array([]), cost, Batch(0, 0, 0), 8).tolist() == []
    assert plan(np.array([0.9]), np.array([8]), cost, Batch(1, 1, 1), 0).tolist() == [0]


def grid_plan(rates, caps, cost, batch, k_max, other_tokens=0.0):
    """The search written out over the whole (depth, spent) grid, each step time from
    `verify_ms` and `propose_ms` on the grid: what `plan` must choose, tie for tie."""
    n = len(rates)
    rates, caps = np.clip(rates, 0.0, 1.0), np.minimum(caps, k_max)
    depth = np.arange(1, k_max + 1)
    gains = rates[:, None] ** depth[None, :]
    allowed = depth[None, :] <= caps[:, None]
    base = other_tokens + n
    flat_gain, flat_depth = gains[allowed], np.broadcast_to(depth, gains.shape)[allowed]
    order = np.argsort(-flat_gain, kind="stable")
    flat_gain, flat_depth = flat_gain[order], flat_depth[order]
    usable = flat_depth[None, :] <= depth[:, None]
    tokens = np.cumsum(np.where(usable, flat_gain[None, :], 0.0), axis=1)
    spent = np.cumsum(usable, axis=1)
    t = cost.verify_ms(batch.batch_size, batch.base_tokens + spent, batch.kv_tokens + spent) + cost.propose_ms(
        np.broadcast_to(depth[:, None], spent.shape), spent
    )
    g = np.where(usable, (base + tokens) / t, -np.inf)
    ks = np.zeros(n, dtype=np.int64)
    if g.size == 0 or g.max() <= base / float(cost.verify_ms(batch.batch_size, batch.base_tokens, batch.kv_tokens)):
        return ks
    m, s = np.unravel_index(int(np.argmax(g)), g.shape)
    owners = np.broadcast_to(np.arange(n)[:, None], gains.shape)[allowed][order]
    np.add.at(ks, owners[np.flatnonzero(usable[m, : s + 1])], 1)
    return ks


def test_the_search_chooses_what_the_full_grid_chooses():
    """`plan` evaluates each step time once per number of drafts instead of over the whole grid:
    the same k for every request, including ties (repeated rates, rates of 0 and 1, flat costs)."""
    rng = np.random.default_rng(1)
    for trial in range(600):
        n, k_max = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        cost = random_cost(rng) if trial % 3 else CostParams(tuple(30.0 for _ in TOKEN_KNOTS), proposer_rtt_ms=0.5)
        rates = rng.choice([0.0, 0.5, 0.7, 1.0], n) if trial % 4 == 0 else rng.beta(7, 3, n)
        caps = rng.integers(0, k_max + 1, n)
        batch = Batch(n + int(rng.integers(0, 4)), n + int(rng.integers(0, 300)), int(rng.integers(10, 20000)))
        other = float(rng.integers(0, 3))
        expected = grid_plan(rates, caps, cost, batch, k_max, other)
        assert plan(rates, caps, cost, batch, k_max, other_tokens=other).tolist() == expected.tolist()
