"""Token selection and lossless verification of drafted tokens, for a whole batch at once.

Request b with k_b draft tokens x_1..x_k owns k_b + 1 consecutive rows of the
target's logits: the distributions after the context, after x_1, ..., after x_k
(plain decoding is k_b = 0: one row).

- accepted tokens: the longest prefix of drafts the target keeps;
- recovered token: at the first rejection, a token drawn from the target's
  residual normalise(max(0, p_t - p_d)) (greedy: the target's argmax there);
- bonus token: when all k drafts are accepted, one more token from the last
  row, for free.

So a request emits accepted + 1 tokens a step. Greedy requests accept a draft
iff it equals the target's argmax; sampled requests accept x with probability
min(1, p_t(x) / p_d(x)), which makes the output distributed exactly as the
target alone. p_d is the draft's exact (truncated) distribution, given sparse;
a deterministic draft (n-gram) has p_d = one-hot, given as None.

Everything runs as tensors over [requests, k_max] on the logits' device, with
no result read back before the end: small host-to-device copies in (the batch's
integers; with sampled requests, the draft distributions and sampling
parameters), one device-to-host copy of the emitted tokens and accept counts out. Random
numbers are counter-based (`runtime.counter_rng`): the acceptance test of draft
j uses (seed, position + j, stream 0) and the final token (seed, position + m,
stream 1), where position is the index of the request's first output token
decided this step.

A request that asks for log-probabilities gets, for each emitted token, its log-probability
under the target's processed distribution at the row that decided it (after temperature,
top-k and top-p: the same numbers whether the token was a draft the target accepted or not)
and the most likely alternatives there; a second copy back, only when some request asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.counter_rng import SEED_BITS, uniform
from runtime.draft import Draft
from runtime.sampler import SamplingParams, processed_logprobs, processed_probs

ACCEPT_STREAM, TOKEN_STREAM = 0, 1


@dataclass
class SampleRequest:
    params: SamplingParams
    draft: Draft | None = None
    seed: int = 0  # keys the request's random numbers; unused when greedy
    position: int = 0  # output index of the first token this step decides


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float  # of the emitted token
    top: tuple[tuple[int, float], ...] = ()  # (token, logprob), most likely first; no -inf entries


@dataclass
class Verified:
    token_ids: list[int]  # accepted drafts + the recovered or bonus token
    num_accepted: int
    error: str = ""  # set when this request's logits could not be used: it emits nothing
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked


NOT_FINITE = "the target's logits for this request are not finite (NaN or +inf)"


def verify(logits: torch.Tensor, requests: list[SampleRequest]) -> list[Verified]:
    """logits: [sum(k_b + 1), V], request b's rows in order -> what each request emits.

    A request with a NaN or +inf in any of its rows gets `error` and no tokens; the rest of the
    batch is decided as if it were not there."""
    if not requests:
        return []
    ks = [len(r.draft.token_ids) if r.draft else 0 for r in requests]
    assert logits.shape[0] == sum(ks) + len(ks), (logits.shape, ks)
    if not any(ks) and all(r.params.greedy for r in requests):  # plain greedy decoding: the argmax is all
        # A row's max is NaN when it holds one, +inf when it holds that: either is not finite.
        top, token = logits.max(dim=1)
        host = torch.where(top < float("inf"), token, -1).tolist()
        results = [Verified([t], 0) if t >= 0 else Verified([], 0, NOT_FINITE) for t in host]
        return _with_logprobs(logits, requests, list(range(len(ks))), results)
    # NaN compares False too; -inf is a masked token. Such rows are computed like the rest (no
    # check that would wait on the device): per-row operations keep them from the other rows,
    # the inverse CDF clamps what they index, and their requests' results are dropped.
    bad_row = ~(logits < float("inf")).all(dim=1)
    dev, width = logits.device, max(ks)
    starts, row = [], 0
    for k in ks:
        starts.append(row)
        row += k + 1
    sampled = [not r.params.greedy for r in requests]
    header = [
        [s, k, r.seed % 2**SEED_BITS, r.position, int(smp)] + (r.draft.token_ids if r.draft else []) + [0] * (width - k)
        for s, k, r, smp in zip(starts, ks, requests, sampled)
    ]
    ints = torch.tensor(header, dtype=torch.long).to(dev, non_blocking=True)
    start, k, seed, position, is_sampled = ints[:, :5].unbind(1)
    drafts = ints[:, 5:]  # [B, K]
    owner = torch.repeat_interleave(torch.arange(len(ks), device=dev), k + 1, output_size=logits.shape[0])
    bad = torch.zeros(len(ks), dtype=torch.long, device=dev).index_add_(0, owner, bad_row.long()).clamp_(max=1)
    j = torch.arange(width, device=dev)
    valid = j < k.unsqueeze(1)
    rows = torch.where(valid, start.unsqueeze(1) + j, start.unsqueeze(1))  # padding reads a real row
    argmax = logits.argmax(dim=1)  # [R]
    accept = valid & (argmax[rows] == drafts)
    probs = support = None
    if any(sampled):
        row_params = [r.params for r, k_b in zip(requests, ks) for _ in range(k_b + 1)]
        probs = processed_probs(logits, row_params)  # [R, V]
        support = _draft_support(requests, width, dev)
        ids, p = support
        p_draft = (p * (ids == drafts.unsqueeze(2))).sum(2)  # [B, K]: p_d(x_j)
        p_target = probs[rows, drafts]
        u = uniform(seed.unsqueeze(1), position.unsqueeze(1) + j, ACCEPT_STREAM)
        accept_sampled = valid & (p_draft > 0) & (u * p_draft < p_target)  # u < p_t / p_d
        accept = torch.where(is_sampled.bool().unsqueeze(1), accept_sampled, accept)
    accepted = accept.long().cumprod(dim=1).sum(dim=1)  # [B]
    last = start + accepted
    final = argmax[last]
    if probs is not None:
        final = torch.where(is_sampled.bool(), _draw(probs[last], accepted, k, support, seed, position), final)
    out = torch.nn.functional.pad(drafts, (0, 1))
    out.scatter_(1, accepted.unsqueeze(1), final.unsqueeze(1))
    host = torch.cat([out, accepted.unsqueeze(1), bad.unsqueeze(1)], dim=1).tolist()  # the step's one copy back
    results = [Verified([], 0, NOT_FINITE) if h[-1] else Verified(h[: h[-2] + 1], h[-2]) for h in host]
    return _with_logprobs(logits, requests, starts, results)


def _with_logprobs(
    logits: torch.Tensor, requests: list[SampleRequest], starts: list[int], results: list[Verified]
) -> list[Verified]:
    """Fills `Verified.logprobs` for the requests that ask: emitted token i of request b was
    decided by row starts[b] + i."""
    asking = [b for b, r in enumerate(requests) if r.params.logprobs is not None and results[b].token_ids]
    if not asking:
        return results
    rows, tokens, row_params = [], [], []
    for b in asking:
        emitted = results[b].token_ids
        rows.extend(range(starts[b], starts[b] + len(emitted)))
        tokens.extend(emitted)
        row_params.extend([requests[b].params] * len(emitted))
    dev = logits.device
    lp = processed_logprobs(logits[torch.tensor(rows, device=dev)], row_params)
    chosen = lp.gather(1, torch.tensor(tokens, device=dev).unsqueeze(1))
    n = max(requests[b].params.logprobs for b in asking)
    if n:
        top = lp.topk(min(n, lp.shape[1]), dim=1)
        host_lp, top_lp, top_ids = chosen.squeeze(1).tolist(), top.values.tolist(), top.indices.tolist()
    else:
        host_lp, top_lp, top_ids = chosen.squeeze(1).tolist(), [[]] * len(rows), [[]] * len(rows)
    i = 0
    for b in asking:
        want, entries = requests[b].params.logprobs, []
        for _ in results[b].token_ids:
            top_b = tuple((t, v) for t, v in zip(top_ids[i][:want], top_lp[i][:want]) if v != float("-inf"))
            entries.append(TokenLogprob(host_lp[i], top_b))
            i += 1
        results[b].logprobs = entries
    return results


def _draft_support(requests: list[SampleRequest], width: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Each draft position's distribution as padded sparse tensors ([B, K, S] ids, [B, K, S] probs).

    A deterministic draft is a one-hot on its token; padding has probability 0.
    """
    rows_ids, rows_p = [], []
    for r in requests:
        tokens = r.draft.token_ids if r.draft else []
        if r.draft is not None and r.draft.probs is not None:
            dists = r.draft.probs
        else:
            dists = [([t], [1.0]) for t in tokens]
        rows_ids.append([ids for ids, _ in dists])
        rows_p.append([p for _, p in dists])
    size = max((len(ids) for row in rows_ids for ids in row), default=1)
    ids = [[d + [0] * (size - len(d)) for d in row] + [[0] * size] * (width - len(row)) for row in rows_ids]
    p = [[d + [0.0] * (size - len(d)) for d in row] + [[0.0] * size] * (width - len(row)) for row in rows_p]
    shape = (len(requests), width, size)  # explicit: with no drafts the nested lists have no depth
    return (
        torch.tensor(ids, dtype=torch.long).view(shape).to(dev, non_blocking=True),
        torch.tensor(p, dtype=torch.float32).view(shape).to(dev, non_blocking=True),
    )


def _draw(probs, accepted, k, support, seed, position) -> torch.Tensor:
    """[B, V] target rows at each request's last position -> a token each, by inverse CDF.

    Where a draft was rejected the row becomes the residual max(0, p_t - p_d).
    """
    ids, p = support
    if ids.shape[1] > 0:
        at = accepted.clamp(max=ids.shape[1] - 1)
        b = torch.arange(len(at), device=at.device)
        rejected = (accepted < k).unsqueeze(1)
        residual = probs.scatter_add(1, ids[b, at], -p[b, at] * rejected).clamp_min(0.0)
        # A zero residual has probability zero of being reached (p_t <= p_d everywhere only
        # when they are equal); the target row stands in for float safety.
        probs = torch.where(residual.sum(1, keepdim=True) > 0, residual, probs)
    cdf = probs.double().cumsum(dim=1)
    u = uniform(seed, position + accepted, TOKEN_STREAM)
    # The first index whose cumulative mass exceeds u * total: never a zero-probability token.
    token = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    return token.clamp(max=probs.shape[1] - 1)
