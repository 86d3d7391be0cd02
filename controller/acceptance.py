"""Per-request acceptance estimates, shrunk toward a global prior.

A draft of k tokens that had j accepted tested j + 1 tokens when it was
rejected at position j + 1, and k when all were accepted: the drafts after a
rejection were never tested, so `accepted / proposed` would under-estimate the
per-token acceptance rate. Each tested token is one Bernoulli trial.

Each request counts every trial since its last change point, which is precise
at steady state. After each step, the last s steps (s = 8 .. 128) are compared
with the steps before them; when a split differs by more than noise explains,
the request's acceptance has changed and its history restarts at that split.
"""

from __future__ import annotations

import math

import numpy as np

CHANGE_Z = 4.5  # disagreement, in standard errors, that counts as a change
SPLITS = (8, 12, 16, 24, 32, 48, 64, 96, 128)  # candidate change points, in steps back
MIN_TRIALS = 8.0  # trials each side of a split needs before a change can be declared
IDLE_DECAY = 0.9  # per step without drafts: history fades toward the prior, so the request is tried again
_SPLITS_BACK = tuple((split, -1 - split) for split in SPLITS)  # each split with its index in the running totals


def num_tested(proposed: int, accepted: int) -> int:
    """Draft tokens whose acceptance was decided: the accepted ones plus the first rejected one."""
    return accepted + (1 if accepted < proposed else 0)


class _Trials:
    def __init__(self, accepted: float = 0.0, tested: float = 0.0):
        self.accepted = accepted
        self.tested = tested

    def rate(self) -> float:
        return self.accepted / self.tested if self.tested else 0.0


class _History:
    """Trials since the request's last change point; running totals per step for the split tests."""

    def __init__(self):
        self.accepted = 0.0
        self.tested = 0.0
        self.idle_steps = 0  # steps without drafts since the last add(); they fade the history
        self._cum: list[tuple[float, float]] = [(0.0, 0.0)]  # (accepted, tested) totals after each step

    def faded(self) -> tuple[float, float]:
        if not self.idle_steps:  # a factor of 1 changes nothing
            return self.accepted, self.tested
        f = IDLE_DECAY**self.idle_steps
        return self.accepted * f, self.tested * f

    def add(self, accepted: int, tested: int) -> None:
        if self.idle_steps:
            self.fade(IDLE_DECAY**self.idle_steps)
            self.idle_steps = 0
        self.accepted += accepted
        self.tested += tested
        cum = self._cum
        cum.append((self.accepted, self.tested))
        if len(cum) > 2 * SPLITS[-1]:
            del cum[: SPLITS[-1]]
        split = self._change_point() if len(cum) > SPLITS[0] and self.tested >= 2 * MIN_TRIALS else 0
        if split:
            base_a, base_t = self._cum[-1 - split]
            self.accepted -= base_a
            self.tested -= base_t
            self._cum = [(a - base_a, t - base_t) for a, t in self._cum[-1 - split :]]

    def fade(self, factor: float) -> None:
        self.accepted *= factor
        self.tested *= factor
        self._cum = [(a * factor, t * factor) for a, t in self._cum]

    def _change_point(self) -> int:
        """Steps back to the most significant change, or 0 when the history is one rate; for a
        history longer than the shortest split with 2 * MIN_TRIALS trials (`add` checks)."""
        cum = self._cum
        n = len(cum)
        best, best_z = 0, CHANGE_Z
        total_a, total_t = self.accepted, self.tested
        pooled = min(max(total_a / total_t, 0.02), 0.98)
        spread = pooled * (1 - pooled)
        sqrt = math.sqrt
        for split, back in _SPLITS_BACK:
            if split >= n:
                break
            base_a, base_t = cum[back]
            recent_t = total_t - base_t
            if recent_t < MIN_TRIALS or base_t < MIN_TRIALS:
                continue
            z = abs((total_a - base_a) / recent_t - base_a / base_t) / sqrt(spread * (1 / recent_t + 1 / base_t))
            if z > best_z:
                best, best_z = split, z
        return best


class AcceptanceEstimator:
    """Acceptance rate per request id, plus the global prior over all requests."""

    def __init__(self, prior: float = 0.5, prior_weight: float = 16.0, prior_window: float = 2000.0):
        """`prior_weight`: trials the prior counts for in a request's estimate. A light prior lets a
        few early rejections sink a request to k = 0 (at batch 1 that forfeited the whole gain of
        speculation); 16 trials is about 8 steps of drafting. `prior_window`: trials the global
        prior remembers (it forgets older ones exponentially)."""
        self.prior_weight = prior_weight
        self._prior_decay = 1.0 - 1.0 / prior_window
        self._global = _Trials(prior * prior_weight, prior_weight)
        self._requests: dict[str, _History] = {}

    @property
    def prior(self) -> float:
        return self._global.rate()

    @property
    def prior_trials(self) -> float:
        return self._global.tested

    def seed_prior(self, prior: float) -> None:
        """Restarts the global prior at `prior` (e.g. the controller's, on a fresh verifier)."""
        self._global = _Trials(prior * self.prior_weight, self.prior_weight)

    def observe(self, request_id: str | None, proposed: int, accepted: int) -> None:
        """One request's draft outcome in a step; request_id None feeds the global prior only."""
        self.observe_all(((request_id, proposed, accepted),))

    def observe_all(self, drafts) -> None:
        """`observe` for each (request id, proposed, accepted) in turn: a step's drafts at once."""
        g, decay, requests = self._global, self._prior_decay, self._requests
        for request_id, proposed, accepted in drafts:
            tested = accepted + 1 if accepted < proposed else accepted  # num_tested
            if tested == 0:
                continue
            d = decay**tested
            g.accepted = g.accepted * d + accepted
            g.tested = g.tested * d + tested
            if request_id is None:
                continue
            history = requests.get(request_id)
            if history is None:
                requests[request_id] = history = _History()
            history.add(accepted, tested)

    def idle(self, request_id: str) -> None:
        """A step in which the request drafted nothing."""
        history = self._requests.get(request_id)
        if history is not None:
            history.idle_steps += 1  # applied lazily: O(1) per step

    def rate(self, request_id: str) -> float:
        history = self._requests.get(request_id)
        accepted, tested = history.faded() if history else (0.0, 0.0)
        w = self.prior_weight
        return (accepted + w * self.prior) / (tested + w)

    def rates(self, request_ids: list[str]) -> np.ndarray:
        prior, w, requests = self.prior, self.prior_weight, self._requests
        weighted = w * prior
        out = []
        for request_id in request_ids:
            history = requests.get(request_id)
            if history is None:
                out.append(prior)
            else:
                accepted, tested = history.faded()
                out.append((accepted + weighted) / (tested + w))
        return np.array(out, dtype=np.float64)

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)
