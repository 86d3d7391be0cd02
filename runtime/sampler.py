"""Sampling parameters and the target distribution they define: temperature, top-k, top-p.

Tokens are drawn in `runtime.rejection.verify`, for plain decoding and speculation alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Below this a temperature decodes greedily: dividing logits by 1e-40 overflows float32, and
# at 1e-5 the softmax is already one-hot to float32 precision for any realistic logit gap.
MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # below MIN_TEMPERATURE (0 included): greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no truncation
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # Return each emitted token's log-probability and this many most likely alternatives
    # (0: the chosen token's only); None: no log-probabilities.
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, V] logits -> [n, V] float32 probabilities after temperature, top-k, top-p.

    Rows of greedy requests are left as plain softmax (callers take the argmax).
    """
    return torch.softmax(processed_logits(logits, params), dim=1)


def processed_logprobs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """The log of `processed_probs`, computed stably (truncated tokens are -inf)."""
    return torch.log_softmax(processed_logits(logits, params), dim=1)


def processed_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, V] logits -> float32 logits divided by the temperature (1 for greedy rows), with the
    tokens top-k and top-p leave out set to -inf: their softmax is the target distribution."""
    logits = logits.float()
    dev = logits.device
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=dev).unsqueeze(1)
    logits = logits / temps
    vocab = logits.shape[1]
    # Each cut runs on the rows that ask only: a row's result must not depend on its batch (a
    # running total rounding up to 1 would cut a top_p = 1 row's tail), and the rest skip it.
    limited = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if limited:
        # The k largest, not a sort of the whole vocabulary: an order of magnitude less work
        # for the small k sampling uses.
        k_col = torch.tensor([params[i].top_k for i in limited], device=dev).unsqueeze(1)
        kmax = max(params[i].top_k for i in limited)
        logits = _cut(logits, limited, lambda rows: rows < torch.topk(rows, kmax, dim=1).values.gather(1, k_col - 1))
    nucleus = [i for i, p in enumerate(params) if p.top_p < 1.0]
    if nucleus:
        top_ps = torch.tensor([params[i].top_p for i in nucleus], device=dev).unsqueeze(1)
        logits = _cut(logits, nucleus, lambda rows: _top_p_drop(torch.softmax(rows, dim=1), top_ps))
    return logits


def _cut(logits: torch.Tensor, rows: list[int], drop) -> torch.Tensor:
    """`logits` with the tokens `drop(logits of these rows)` marks set to -inf, in these rows."""
    if len(rows) == len(logits):
        return logits.masked_fill(drop(logits), -math.inf)
    index = torch.tensor(rows, device=logits.device)
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[index] = drop(logits[index])
    return logits.masked_fill(mask, -math.inf)


# On a CPU, top-p first looks among the most likely few hundred tokens, then a few thousand:
# a sort of the whole vocabulary costs about 20 times a topk of 256 and 5 times one of 4,096
# (64 rows of 49,152), and a real model's top-p 0.9 mass mostly lies within the first few
# hundred. Rows whose mass lies past every candidate set are sorted whole.
TOP_P_CANDIDATES = (256, 4096)


def _top_p_drop(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """[n, V] bool: the tokens top-p leaves out. A token goes when the probability of the tokens
    more likely than it already reaches top_p (the top token always stays). Tokens of equal
    probability stay or go together, so the result does not depend on the order a sort or topk
    leaves ties in, nor on which way a row was computed."""
    if probs.device.type != "cpu":
        return _sorted_drop(probs, top_ps)
    n, vocab = probs.shape
    drop, rows = None, torch.arange(n)  # rows: those not decided yet
    for size in TOP_P_CANDIDATES:
        if size >= vocab or not len(rows):
            break
        every = len(rows) == n
        top = torch.topk(probs if every else probs[rows], size, dim=1)
        drop_top = _drop_sorted(top.values, top_ps[rows])
        part = torch.ones((len(rows), vocab), dtype=torch.bool).scatter(1, top.indices, drop_top)
        if every:
            drop = part
        else:
            drop[rows] = part
        # A row is decided when its last candidate goes: every token outside is no more likely.
        rows = rows[~drop_top[:, -1]]
    if drop is None:
        return _sorted_drop(probs, top_ps)
    if len(rows):
        drop[rows] = _sorted_drop(probs[rows], top_ps[rows])
    return drop


def _sorted_drop(probs: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    values, order = torch.sort(probs, dim=1, descending=True)
    return torch.zeros_like(probs, dtype=torch.bool).scatter(1, order, _drop_sorted(values, top_ps))


def _drop_sorted(values: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Per column of descending `values`: whether the mass strictly above it reaches top_p."""
    before = values.cumsum(1) - values
    # Within a run of equal values, the mass before the run's first column.
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[:, 1:] = values[:, 1:] != values[:, :-1]
    column = torch.arange(values.shape[1], device=values.device).expand_as(values)
    first = torch.where(starts, column, 0).cummax(dim=1).values
    return before.gather(1, first) >= top_ps
