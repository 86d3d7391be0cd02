"""The per-step planning seam: how many draft tokens each scheduled request gets.

Policies: `off` (k = 0) and `fixed:K`; a request may override the server's
policy (off, or fixed with its own k). Only requests that are decoding (their
one pending token is fed and a token is sampled) may speculate.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_K = 8


class SpecMode:
    AUTO = "auto"  # follow the server's policy
    OFF = "off"
    FIXED = "fixed"


@dataclass(frozen=True)
class Policy:
    k: int = 0  # draft tokens per request per step for `fixed:K`; 0 is `off`

    @staticmethod
    def parse(text: str) -> "Policy":
        if text == "off":
            return Policy(0)
        if text.startswith("fixed:"):
            try:
                k = int(text.removeprefix("fixed:"))
            except ValueError:
                k = -1
            if 1 <= k <= MAX_K:
                return Policy(k)
        raise ValueError(f"policy must be 'off' or 'fixed:K' with 1 <= K <= {MAX_K}, got {text!r}")

    def __str__(self) -> str:
        return f"fixed:{self.k}" if self.k else "off"


def plan(policy: Policy, items) -> list[int]:
    """k_i per scheduled item (0 = no speculation)."""
    ks = []
    for item in items:
        seq = item.seq
        if not item.sample or item.num_new != 1 or seq.spec_mode == SpecMode.OFF:
            ks.append(0)
        elif seq.spec_mode == SpecMode.FIXED:
            ks.append(seq.spec_k)
        else:
            ks.append(policy.k)
    return ks
