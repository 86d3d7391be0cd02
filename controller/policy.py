"""Speculation policies: how k is chosen per request per step.

One vocabulary from the wire to the scheduler: the server's policy is a `Policy`,
and so is a request's own override (off, or fixed with its k); a request without
one follows the server's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

MAX_K = 8  # the most draft tokens any request is asked for in one step


class Mode(enum.StrEnum):
    OFF = "off"
    FIXED = "fixed"
    SMARTSPEC = "smartspec"
    UNIFORM = "smartspec-uniform"


@dataclass(frozen=True)
class Policy:
    mode: str = Mode.OFF
    k: int = 0  # draft tokens per request per step for `fixed`
    k_max: int = MAX_K  # the most the goodput modes may choose

    @staticmethod
    def fixed(k: int) -> Policy:
        return Policy(Mode.FIXED, k) if k else Policy()

    @property
    def speculates(self) -> bool:
        return self.mode != Mode.OFF

    @staticmethod
    def parse(text: str) -> Policy:
        name, _, arg = text.partition(":")
        try:
            n = int(arg) if arg else None
        except ValueError:
            n = -1
        if name == Mode.OFF and n is None:
            return Policy()
        if name == Mode.FIXED and n is not None and 1 <= n <= MAX_K:
            return Policy(Mode.FIXED, n)
        if name in (Mode.SMARTSPEC, Mode.UNIFORM) and (n is None or 1 <= n <= MAX_K):
            return Policy(name, 0, n or MAX_K)
        raise ValueError(
            f"policy must be off, fixed:K, smartspec[:KMAX] or smartspec-uniform[:KMAX] "
            f"with 1 <= K <= {MAX_K}, got {text!r}"
        )

    def __str__(self) -> str:
        if self.mode == Mode.FIXED:
            return f"fixed:{self.k}"
        if self.mode in (Mode.SMARTSPEC, Mode.UNIFORM):
            return f"{self.mode}:{self.k_max}"
        return self.mode
