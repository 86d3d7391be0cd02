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
    limited = [i for i, p in enumerate(params) if 0 < p.top_k < vocab]
    if limited:
        # The k largest of the rows that ask, not a sort of the whole vocabulary for every row:
        # an order of magnitude less work for the small k sampling uses.
        k_col = torch.tensor([params[i].top_k for i in limited], device=dev).unsqueeze(1)
        every = len(limited) == len(params)
        index = None if every else torch.tensor(limited, device=dev)
        top = torch.topk(logits if every else logits[index], max(params[i].top_k for i in limited), dim=1)
        kth = top.values.gather(1, k_col - 1)
        if not every:  # rows without top-k keep every token
            kth = torch.full((len(params), 1), -math.inf, device=dev).index_copy(0, index, kth)
        logits = logits.masked_fill(logits < kth, -math.inf)
    if any(p.top_p < 1.0 for p in params):
        top_ps = torch.tensor([p.top_p for p in params], device=dev).unsqueeze(1)
        sorted_probs, order = torch.sort(torch.softmax(logits, dim=1), dim=1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (sorted_probs.cumsum(1) - sorted_probs) >= top_ps
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        logits = logits.masked_fill(drop, -math.inf)
    return logits
