"""Speculation lengths that maximise one step's goodput.

G(k) = sum_i E_i(k_i) / T(k), E_i(k) = 1 + a_i + ... + a_i^k: expected tokens per step. With the
cost model of cost_model.py, T depends on k only through S = sum k_i and the
draft depth m = max k_i (plus whether anything is drafted). So for each depth m
the best way to spend S draft tokens is the S largest marginal gains a_i^j with
j <= min(m, cap_i): E_i is concave, so taking marginals in descending order never
skips a lower position of the same request. Searching every (m, S) pair is
therefore exact, and it contains every uniform k (m = k, S = all positions up to
k), so it cannot stall at k = 0 the way a greedy walk from all-zero can.
`uniform=True` restricts the search to one k for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from controller.cost_model import CostParams


@dataclass(frozen=True)
class Batch:
    """What the planner needs to know about the step besides the plannable requests."""

    batch_size: int  # requests in the step, prefilling ones included
    base_tokens: int  # tokens fed to the target without any drafts (decode + prefill tokens)
    kv_tokens: int  # KV tokens attended over without drafts


def expected_tokens(a: np.ndarray, k: np.ndarray) -> np.ndarray:
    """E(k) = (1 - a^(k+1)) / (1 - a), = k + 1 at a = 1."""
    a = np.asarray(a, dtype=np.float64)
    k = np.asarray(k)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = (1 - a ** (k + 1)) / (1 - a)
    return np.where(a >= 1.0, k + 1.0, e)


def step_ms(cost: CostParams, batch: Batch, ks: np.ndarray) -> float:
    s = int(np.sum(ks))
    return float(
        cost.verify_ms(batch.batch_size, batch.base_tokens + s, batch.kv_tokens + s)
        + cost.propose_ms(int(np.max(ks, initial=0)), s)
    )


def goodput(cost: CostParams, batch: Batch, rates: np.ndarray, ks: np.ndarray, other_tokens: float = 0.0) -> float:
    """Expected tokens per millisecond; `other_tokens`: tokens the step yields outside `rates`."""
    return (other_tokens + float(np.sum(expected_tokens(rates, ks)))) / step_ms(cost, batch, ks)


def plan(
    rates: np.ndarray,
    caps: np.ndarray,
    cost: CostParams,
    batch: Batch,
    k_max: int,
    uniform: bool = False,
    other_tokens: float = 0.0,
) -> np.ndarray:
    """k_i per plannable request (int array), 0 <= k_i <= min(k_max, cap_i).

    `rates`: acceptance estimate per request; `caps`: most drafts its proposer can
    offer; `other_tokens`: tokens the rest of the step yields (prefill chunks
    that sample, requests that may not speculate).
    """
    n = len(rates)
    if n == 0 or k_max <= 0:
        return np.zeros(n, dtype=np.int64)
    rates = np.clip(np.asarray(rates, dtype=np.float64), 0.0, 1.0)
    caps = np.minimum(np.asarray(caps, dtype=np.int64), k_max)
    depth = np.arange(1, k_max + 1)  # [k_max]
    gains = rates[:, None] ** depth[None, :]  # [n, k_max]: marginal tokens of the j-th draft
    allowed = depth[None, :] <= caps[:, None]  # [n, k_max]
    base = other_tokens + n
    if uniform:
        return _plan_uniform(gains, allowed, caps, cost, batch, base)
    flat_gain = gains[allowed]
    if not flat_gain.size:
        return np.zeros(n, dtype=np.int64)
    owners, position = np.nonzero(allowed)  # row-major, as gains[allowed]; position = depth - 1
    order = (-flat_gain).argsort(kind="stable")
    flat_gain, position, owners = flat_gain[order], position[order], owners[order]
    # Row m-1: the marginals usable at depth m, in descending order (others contribute 0).
    usable = position[None, :] < depth[:, None]  # [k_max, n_allowed]
    tokens = np.where(usable, flat_gain[None, :], 0.0).cumsum(axis=1)
    spent = usable.cumsum(axis=1)
    # T(m, S) = verify(S) + propose(m, S): verify depends on S alone, so it is evaluated once
    # per S (entries where spent is 0 are unusable, and masked below).
    count = np.arange(1, len(flat_gain) + 1)
    verify = cost.verify_ms(batch.batch_size, batch.base_tokens + count, batch.kv_tokens + count)
    draft = (cost.proposer_rtt_ms + cost.draft_step_ms * depth)[:, None] + cost.draft_ms_per_token * spent
    g = np.where(usable, (base + tokens) / (verify[spent - 1] + draft), -np.inf)
    best = int(g.argmax())  # the first maximum, as g.max() would find it
    off_ms = cost.verify_ms_at(batch.batch_size, batch.base_tokens, batch.kv_tokens)
    if g.flat[best] <= base / off_ms:
        return np.zeros(n, dtype=np.int64)
    m, s = divmod(best, g.shape[1])
    return np.bincount(owners[: s + 1][usable[m, : s + 1]], minlength=n)  # the marginals summed into tokens[m, s]


def _plan_uniform(gains, allowed, caps, cost, batch, base) -> np.ndarray:
    k_max = gains.shape[1]
    per_k = np.concatenate([[0.0], np.cumsum(np.where(allowed, gains, 0.0).sum(axis=0))])  # [k_max+1]
    ks = np.minimum(np.arange(k_max + 1)[:, None], caps[None, :])  # [k_max+1, n]
    spent = ks.sum(axis=1)
    t = cost.verify_ms(batch.batch_size, batch.base_tokens + spent, batch.kv_tokens + spent) + cost.propose_ms(
        ks.max(axis=1), spent
    )
    best = int(np.argmax((base + per_k) / t))
    return ks[best].astype(np.int64)
