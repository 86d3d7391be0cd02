"""Token selection: greedy, temperature, top-k, top-p, per-request seeded streams."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no truncation
    seed: int | None = None
    max_new_tokens: int = 128
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    if params.greedy:
        return None
    g = torch.Generator()
    if params.seed is None:
        g.seed()
    else:
        g.manual_seed(params.seed)
    return g


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[n, V] logits -> [n, V] float32 probabilities after temperature, top-k, top-p.

    Rows of greedy requests are left as plain softmax (callers take the argmax).
    """
    logits = logits.float()
    temps = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params]).unsqueeze(1)
    logits = logits / temps
    vocab = logits.shape[1]
    top_ks = [p.top_k for p in params]
    if any(0 < k < vocab for k in top_ks):
        k_col = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks]).unsqueeze(1)
        kth = torch.sort(logits, dim=1, descending=True).values.gather(1, k_col - 1)
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = torch.softmax(logits, dim=1)
    top_ps = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    if bool((top_ps < 1.0).any()):
        sorted_probs, order = torch.sort(probs, dim=1, descending=True)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        drop_sorted = (sorted_probs.cumsum(1) - sorted_probs) >= top_ps
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(1, keepdim=True)
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """[n, V] logits -> one token per row; sampled rows draw from their request's generator."""
    if logits.shape[0] == 0:
        return []
    # Per-request generators live on the CPU, which also keeps seeded streams device-independent.
    logits = logits.float().cpu()
    tokens = logits.argmax(dim=1).tolist()
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        probs = processed_probs(logits[sampled], [params[i] for i in sampled])
        for row, i in enumerate(sampled):
            tokens[i] = int(torch.multinomial(probs[row], 1, generator=generators[i]))
    return tokens
