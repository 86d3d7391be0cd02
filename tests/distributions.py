"""Exact target distributions and a chi-square test, for checking sampled output statistically."""

from __future__ import annotations

import torch


def exact_marginals(model, prompt: list[int], steps: int, vocab: int) -> list[torch.Tensor]:
    """P(token t) for t = 1..steps under the target alone, by enumerating every prefix."""
    marginals = []
    prefixes = {(): 1.0}
    for _ in range(steps):
        nxt: dict[tuple, float] = {}
        keys = list(prefixes)
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + list(p) for p in keys])).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1)
        marginal = torch.zeros(vocab, dtype=torch.float64)
        for key, row in zip(keys, probs):
            for y in range(vocab):
                nxt[key + (y,)] = prefixes[key] * float(row[y])
                marginal[y] += prefixes[key] * float(row[y])
        marginals.append(marginal)
        prefixes = nxt
    return marginals


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected >= 5
    stat = float((((counts - expected) ** 2 / expected)[keep]).sum())
    df = int(keep.sum()) - 1
    return 1.0 - float(torch.distributions.Chi2(torch.tensor(float(df))).cdf(torch.tensor(stat)))
