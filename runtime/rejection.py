"""Lossless verification of drafted tokens.

For one request with k draft tokens x_1..x_k, the target's k + 1 rows of
logits are the distributions after the context, after x_1, ..., after x_k.

- accepted tokens: the longest prefix of drafts the target keeps;
- recovered token: at the first rejection, a token drawn from the target's
  residual normalise(max(0, p_t - p_d)) (greedy: the target's argmax there);
- bonus token: when all k drafts are accepted, one more token from the last
  row, for free.

So a step emits accepted + 1 tokens. Greedy requests accept a draft iff it
equals the target's argmax; sampled requests accept x with probability
min(1, p_t(x) / p_d(x)), which makes the output distributed exactly as the
target alone. p_d is the draft's exact (truncated) distribution, given sparse;
a deterministic draft (n-gram) has p_d = one-hot, given as None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.draft import Draft
from runtime.sampler import SamplingParams, processed_probs


@dataclass
class Verified:
    token_ids: list[int]  # accepted drafts + the recovered or bonus token
    num_accepted: int


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None) -> Verified:
    """logits: [k + 1, V] target logits for one request."""
    k = len(draft.token_ids)
    assert logits.shape[0] == k + 1, (logits.shape, k)
    logits = logits.float().cpu()  # request generators live on the CPU
    if params.greedy:
        target = logits.argmax(dim=1).tolist()
        m = 0
        while m < k and draft.token_ids[m] == target[m]:
            m += 1
        return Verified(draft.token_ids[:m] + [target[m]], m)
    p_target = processed_probs(logits, [params] * (k + 1))  # [k + 1, V]
    for j, x in enumerate(draft.token_ids):
        p_draft = _dense(draft, j, p_target.shape[1])
        ratio = p_target[j, x] / p_draft[x] if p_draft[x] > 0 else torch.tensor(0.0)
        if torch.rand((), generator=generator) < ratio:  # accept with probability min(1, ratio)
            continue
        residual = (p_target[j] - p_draft).clamp_min(0.0)
        total = residual.sum()
        # A zero residual has probability zero of being reached (p_t <= p_d everywhere
        # only when they are equal); fall back to the target row for float safety.
        row = residual / total if total > 0 else p_target[j]
        token = int(torch.multinomial(row, 1, generator=generator))
        return Verified(draft.token_ids[:j] + [token], j)
    bonus = int(torch.multinomial(p_target[k], 1, generator=generator))
    return Verified(draft.token_ids + [bonus], k)


def _dense(draft: Draft, j: int, vocab: int) -> torch.Tensor:
    p = torch.zeros(vocab)
    if draft.probs is None:
        p[draft.token_ids[j]] = 1.0
    else:
        ids, probs = draft.probs[j]
        p[torch.tensor(ids, dtype=torch.long)] = torch.tensor(probs, dtype=torch.float32)
    return p
