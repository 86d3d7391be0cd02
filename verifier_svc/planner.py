"""The per-step planning seam: how many draft tokens each scheduled request gets.

Only requests that are decoding (a token is sampled this step, no prefill
chunk pending) may speculate; policies beyond `off` arrive with the proposer.
"""

from __future__ import annotations

POLICIES = ("off",)


def parse_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    return policy


def plan(policy: str, items) -> list[int]:
    """k_i per scheduled item (0 = no speculation)."""
    return [0] * len(items)
