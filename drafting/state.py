"""Per-request proposer state, keyed by request id, bounded, with the length check.

The verifier sends the tokens appended since its last call and the total
length; when the kept state disagrees (or is gone: evicted, restarted), the
answer says so and the verifier resends the full context.

Bounded three ways: a count (least recently used first), an idle time (a request
its verifier forgot to release), and by owner (a key may be `(owner, request id)`;
`release_owner` drops everything a verifier's stream held when it ends).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from runtime.sampler import SamplingParams


class UnknownRequest(KeyError):
    pass


class LengthMismatch(ValueError):
    def __init__(self, known: int):
        super().__init__(f"kept {known} tokens")
        self.known = known


class StateStore:
    """States are objects with `__len__` (tokens held) and `extend(tokens)`."""

    def __init__(
        self,
        new_state: Callable[[], Any],
        max_requests: int = 4096,
        on_evict: Callable[[Any], None] | None = None,
        idle_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.new_state = new_state
        self.max_requests = max_requests
        self.on_evict = on_evict
        self.idle_s = idle_s
        self.clock = clock
        self.evicted: Counter[str] = Counter()  # states dropped by reason: capacity, idle, owner
        self._states: OrderedDict[Hashable, Any] = OrderedDict()  # least recently used first
        self._used: dict[Hashable, float] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._states

    def length(self, request_id: Hashable) -> int | None:
        """Tokens the request's state holds; None when there is none."""
        state = self._states.get(request_id)
        return None if state is None else len(state)

    def update(self, request_id: Hashable, new_tokens: list[int], total_length: int, full_context: bool):
        """Applies a call's tokens; raises UnknownRequest or LengthMismatch (dropping the state)."""
        if full_context:
            self.release(request_id)
            if len(new_tokens) != total_length:
                raise LengthMismatch(0)
            state = self.new_state()
        else:
            state = self._states.pop(request_id, None)
            self._used.pop(request_id, None)
            if state is None:
                raise UnknownRequest(request_id)
            if len(state) + len(new_tokens) != total_length:
                self._drop(state)
                raise LengthMismatch(len(state))
        state.extend(new_tokens)
        self._states[request_id] = state  # most recently used last
        self._used[request_id] = self.clock()
        while len(self._states) > self.max_requests:
            self._evict(next(iter(self._states)), "capacity")
        self.expire()
        return state

    def release(self, request_id: Hashable) -> None:
        state = self._states.pop(request_id, None)
        self._used.pop(request_id, None)
        if state is not None:
            self._drop(state)

    def expire(self) -> int:
        """Drops states idle longer than `idle_s`; how many."""
        if self.idle_s is None:
            return 0
        horizon, dropped = self.clock() - self.idle_s, 0
        while self._states:
            oldest = next(iter(self._states))
            if self._used[oldest] > horizon:
                break
            self._evict(oldest, "idle")
            dropped += 1
        return dropped

    def release_owner(self, owner: Hashable) -> int:
        """Drops every `(owner, id)` state; how many."""
        keys = [key for key in self._states if isinstance(key, tuple) and key[0] == owner]
        for key in keys:
            self._evict(key, "owner")
        return len(keys)

    def _evict(self, key: Hashable, reason: str) -> None:
        self.evicted[reason] += 1
        self.release(key)

    def _drop(self, state) -> None:
        if self.on_evict is not None:
            self.on_evict(state)


@dataclass
class DraftCall:
    """One request's share of a proposal: its state, how many tokens, how to pick them."""

    state: Any  # the backend's per-request state
    k: int
    params: SamplingParams
