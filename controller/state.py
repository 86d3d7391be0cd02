"""The controller's state: the policy in force and what it learns from every verifier.

Pure Python: the gRPC servicer converts messages and hands them here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, replace

from controller.acceptance import AcceptanceEstimator
from controller.cost_model import CostModelFitter, CostParams
from controller.policy import MAX_K, Mode, Policy
from controller.step import StepRecord


@dataclass(frozen=True)
class Snapshot:
    policy: Policy
    cost: CostParams
    acceptance_prior: float
    acceptance_prior_weight: float
    version: int


class ControllerState:
    def __init__(self, policy: Policy, goodput_window_steps: int = 256):
        self.policy = policy
        self.version = 1
        self.fitter = CostModelFitter()
        self.acceptance = AcceptanceEstimator()
        self._window = goodput_window_steps
        self._recent: dict[str, deque[tuple[int, float]]] = {}  # verifier -> (emitted, step_ms)
        self._last_report: dict[str, float] = {}  # verifier -> when it last reported
        self._fitted_steps = 0

    def set_policy(self, mode: str | None = None, k: int = 0, k_max: int = 0) -> Policy:
        """Changes what is given; raises ValueError naming the bad field."""
        mode = mode or self.policy.mode
        if mode not in (Mode.OFF, Mode.FIXED, Mode.SMARTSPEC, Mode.UNIFORM):
            raise ValueError(f"mode: unknown policy mode {mode!r}")
        if not 0 <= k <= MAX_K:
            raise ValueError(f"k: must be in [0, {MAX_K}], got {k}")
        if not 0 <= k_max <= MAX_K:
            raise ValueError(f"k_max: must be in [0, {MAX_K}], got {k_max}")
        k = k or self.policy.k
        if mode == Mode.FIXED and not k:
            raise ValueError("k: POLICY_MODE_FIXED needs k >= 1")
        self.policy = replace(
            self.policy, mode=mode, k=k if mode == Mode.FIXED else 0, k_max=k_max or self.policy.k_max
        )
        self.version += 1
        return self.policy

    def ingest(self, verifier_id: str, steps: list[StepRecord], now: float = 0.0) -> None:
        """`now`: the report's arrival (any monotonic clock; `idle` compares against it)."""
        self._last_report[verifier_id] = now
        recent = self._recent.setdefault(verifier_id, deque(maxlen=self._window))
        for r in steps:
            self.fitter.observe(r)
            for _, proposed, accepted in r.drafts:
                self.acceptance.observe(None, proposed, accepted)
            if r.step_ms > 0:
                recent.append((r.emitted_tokens, r.step_ms))

    def refresh(self) -> bool:
        """Refits on the steps seen so far; True (and a new version) when anything new came in."""
        seen = self.fitter.num_seen
        if seen == self._fitted_steps:
            return False
        self.fitter.refit()
        self._fitted_steps = seen
        self.version += 1
        return True

    def forget(self, verifier_id: str) -> bool:
        """Drops a verifier's goodput window (what it taught the fits stays); False if unknown."""
        self._last_report.pop(verifier_id, None)
        return self._recent.pop(verifier_id, None) is not None

    def idle(self, now: float, idle_s: float) -> list[str]:
        """Verifiers that have not reported for longer than `idle_s`."""
        return [v for v, at in self._last_report.items() if now - at > idle_s]

    @property
    def verifiers(self) -> int:
        return len(self._recent)

    def goodput(self, verifier_id: str) -> float:
        """Tokens emitted per second of step time over the verifier's recent steps."""
        recent = self._recent.get(verifier_id)
        ms = sum(t for _, t in recent) if recent else 0.0
        return 1e3 * sum(e for e, _ in recent) / ms if ms else 0.0

    def snapshot(self) -> Snapshot:
        cost = replace(self.fitter.params, verify_relative_error=self.fitter.relative_error())
        return Snapshot(self.policy, cost, self.acceptance.prior, self.acceptance.prior_weight, self.version)
