"""n-gram prompt lookup: propose what followed the longest earlier match of the context's suffix.

Kept incrementally per request: for each n in n_min..n_max, the latest position
that followed every n-gram seen so far. Appending a token and proposing both
cost O(n_max), whatever the context length. Deterministic: the same context
always gives the same proposal (its draft distribution is one-hot).
"""

from __future__ import annotations

from drafting.state import DraftCall
from runtime.draft import Draft


class NgramIndex:
    def __init__(self, n_min: int = 1, n_max: int = 4):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {n_min}, {n_max}")
        self.n_min, self.n_max = n_min, n_max
        self.tokens: list[int] = []
        # follows[n][ngram] = index of the token that followed the latest occurrence of ngram
        self._follows: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(n_min, n_max + 1)}

    def __len__(self) -> int:
        return len(self.tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            i = len(self.tokens)  # position of t: the n-grams ending just before it are now followed
            for n, table in self._follows.items():
                if i >= n:
                    table[tuple(self.tokens[i - n : i])] = i
            self.tokens.append(t)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the current suffix."""
        if k <= 0:
            return []
        for n in range(self.n_max, self.n_min - 1, -1):
            if len(self.tokens) < n:
                continue
            at = self._follows[n].get(tuple(self.tokens[-n:]))
            if at is not None:
                return self.tokens[at : at + k]
        return []


class NgramBackend:
    """Deterministic drafts (one-hot distributions: no probabilities travel)."""

    vocab_size = None  # any id can be looked up

    def __init__(self, n_min: int = 1, n_max: int = 4):
        self.n_min, self.n_max = n_min, n_max

    def new_state(self) -> NgramIndex:
        return NgramIndex(self.n_min, self.n_max)

    def release(self, state: NgramIndex) -> None:
        pass

    def propose(self, calls: list[DraftCall]) -> list[Draft]:
        return [Draft(c.state.propose(c.k)) for c in calls]
