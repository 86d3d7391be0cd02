"""Per-request proposer state, keyed by request id, bounded, with the length check.

The verifier sends the tokens appended since its last call and the total
length; when the kept state disagrees (or is gone: evicted, restarted), the
answer says so and the verifier resends the full context.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
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
        self, new_state: Callable[[], Any], max_requests: int = 4096, on_evict: Callable[[Any], None] | None = None
    ):
        self.new_state = new_state
        self.max_requests = max_requests
        self.on_evict = on_evict
        self._states: OrderedDict[str, Any] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._states

    def length(self, request_id: str) -> int | None:
        """Tokens the request's state holds; None when there is none."""
        state = self._states.get(request_id)
        return None if state is None else len(state)

    def update(self, request_id: str, new_tokens: list[int], total_length: int, full_context: bool):
        """Applies a call's tokens; raises UnknownRequest or LengthMismatch (dropping the state)."""
        if full_context:
            self.release(request_id)
            if len(new_tokens) != total_length:
                raise LengthMismatch(0)
            state = self.new_state()
        else:
            state = self._states.pop(request_id, None)
            if state is None:
                raise UnknownRequest(request_id)
            if len(state) + len(new_tokens) != total_length:
                self._drop(state)
                raise LengthMismatch(len(state))
        state.extend(new_tokens)
        self._states[request_id] = state  # most recently used last
        while len(self._states) > self.max_requests:
            _, evicted = self._states.popitem(last=False)
            self._drop(evicted)
        return state

    def release(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            self._drop(state)

    def _drop(self, state) -> None:
        if self.on_evict is not None:
            self.on_evict(state)


@dataclass
class DraftCall:
    """One request's share of a proposal: its state, how many tokens, how to pick them."""

    state: Any  # the backend's per-request state
    k: int
    params: SamplingParams
