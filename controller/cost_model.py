"""Step cost learned online from live step metrics.

verify_ms(B, N_tok, N_kv) = f(N_tok) + per_request * B + per_kv_token * N_kv, where f
is a table over knots in N_tok (every count up to 17, then denser than powers of
two), linear in between: flat then linear on a GPU, steps on a CPU (where the
linear layers switch kernels and blockings), both fit by the same knots. Knots
between and beyond the observed token counts follow a straight line (a
curvature penalty), so an unseen N_tok is extrapolated from its neighbours
instead of guessed. f never falls: more tokens never cost less with the
engine's kernels, and a dip the noise of shared cores put in a fit is one the
planner would spend drafts on (measured: it did, and lost).

propose_ms(k) = rtt + draft_step * max(k) + draft_per_token * sum(k) when anything
is drafted: a draft model runs max(k) lockstep steps over a shrinking sub-batch.
The draft terms are fitted on the drafting time proposers report, the rtt on the
rest of what the verifier waited, timeouts included.

The fitter judges itself: before each step joins the fit, it predicts that
step's verify time, and reports the median absolute relative error.
"""

from __future__ import annotations

import bisect
import functools
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from controller.step import StepRecord
from controller.window import RowWindow

TOKEN_KNOTS = (
    *range(1, 18),
    20,
    24,
    28,
    32,
    40,
    48,
    56,
    64,
    80,
    96,
    112,
    128,
    160,
    192,
    224,
    256,
    320,
    384,
    448,
    512,
    768,
    1024,
    1536,
    2048,
    3072,
    4096,
    8192,
)
CURVATURE_PENALTY = 1.0  # weight of the straight-line prior between knots, relative to one step at an unseen knot
MIN_STEP_MS = 0.01  # the least a predicted step may cost
PRIOR_WEIGHT = 0.05  # pull of each knot toward the prior, decisive only where no step says otherwise
WINDOW_STEPS = 1024  # steps kept for fitting
HUBER_RELATIVE = 0.05  # steps off the fit by more than this fraction weigh less (Huber)
HUBER_ITERATIONS = 3  # reweightings after the least-squares fit, where the Huber fit is asked for
ERROR_WINDOW = 256  # steps the prediction error is reported over
_KNOTS = np.asarray(TOKEN_KNOTS, dtype=np.float64)


def _curvature_rows(x: np.ndarray) -> np.ndarray:
    """Slope changes between neighbouring knots (m - 2 rows over the m knots and the two extra
    columns), relative to the knot's size so that small and large knots weigh alike."""
    m = len(x)
    curv = np.zeros((m - 2, m + 2))
    for i in range(m - 2):
        left, right = x[i + 1] - x[i], x[i + 2] - x[i + 1]
        curv[i, i], curv[i, i + 1], curv[i, i + 2] = 1 / left, -(1 / left + 1 / right), 1 / right
        curv[i] *= x[i + 1]
    return curv


_CURVATURE = _curvature_rows(_KNOTS)  # fixed by the knots: built once


@dataclass(frozen=True)
class CostParams:
    """A fitted cost model: what the planner evaluates and the controller pushes."""

    verify_ms_at_knots: tuple[float, ...]  # f at TOKEN_KNOTS
    verify_ms_per_request: float = 0.0
    verify_ms_per_kv_token: float = 0.0
    draft_step_ms: float = 0.0
    draft_ms_per_token: float = 0.0
    proposer_rtt_ms: float = 1.0
    verify_relative_error: float = float("nan")
    num_steps: int = 0  # steps the fit saw

    def verify_ms(self, batch_size: int, tokens, kv_tokens) -> np.ndarray:
        """Predicted target step time; `tokens` and `kv_tokens` broadcast (arrays allowed)."""
        f = np.interp(tokens, _KNOTS, self._knot_ms)
        ms = f + self.verify_ms_per_request * batch_size + self.verify_ms_per_kv_token * np.asarray(kv_tokens)
        # A young fit from a few steps at one shape can reach zero elsewhere; no step is free,
        # and tokens per millisecond must stay finite.
        return np.maximum(ms, MIN_STEP_MS)

    @functools.cached_property
    def _knot_ms(self) -> np.ndarray:  # what np.interp would convert the knots to on every call
        return np.asarray(self.verify_ms_at_knots, dtype=np.float64)

    @functools.cached_property
    def _knot_table(self) -> tuple[list[float], list[float], list[float]]:
        """The knots, f there and the slope after each, as floats for `verify_ms_at`."""
        xs, ys = list(TOKEN_KNOTS), [float(v) for v in self.verify_ms_at_knots]
        return xs, ys, [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]

    def verify_ms_at(self, batch_size: int, tokens: int, kv_tokens: int) -> float:
        """`verify_ms` of one step shape, to the last bit (np.interp's arithmetic), without an array
        call's fixed cost: the engine and the simulator ask it every step."""
        xs, ys, slopes = self._knot_table
        if tokens <= xs[0]:
            f = ys[0]
        elif tokens >= xs[-1]:
            f = ys[-1]
        else:
            j = bisect.bisect_right(xs, tokens) - 1
            f = ys[j] if xs[j] == tokens else slopes[j] * (tokens - xs[j]) + ys[j]
            if f != f:  # NaN one way (an infinite knot): np.interp tries the other
                f = slopes[j] * (tokens - xs[j + 1]) + ys[j + 1]
                f = ys[j] if f != f and ys[j] == ys[j + 1] else f
        ms = f + self.verify_ms_per_request * batch_size + self.verify_ms_per_kv_token * kv_tokens
        return max(ms, MIN_STEP_MS)  # as np.maximum: a NaN stays NaN

    def propose_ms(self, max_k, sum_k) -> np.ndarray:
        """Proposal time for drafts of depth max_k and sum_k tokens in all (0 when nothing is drafted)."""
        max_k = np.asarray(max_k)
        cost = self.proposer_rtt_ms + self.draft_step_ms * max_k + self.draft_ms_per_token * np.asarray(sum_k)
        return np.where(max_k > 0, cost, 0.0)


def linear_prior(ms_per_token: float, fixed_ms: float = 0.0) -> CostParams:
    """An uncalibrated guess: fixed_ms plus ms_per_token per batched token, free drafting."""
    return CostParams(tuple(fixed_ms + ms_per_token * k for k in TOKEN_KNOTS))


@dataclass
class CostModelFitter:
    prior: CostParams = field(default_factory=lambda: linear_prior(1.0, 5.0))
    refit_every: int = 16
    # Huber reweightings of the steps; 0 (plain least squares) by default: it fits identical
    # repeats better in some runs, and the one live sweep with it did not gain (BENCHMARKS.md).
    huber_iterations: int = 0

    def __post_init__(self):
        # The window's numbers, not its records: a refit reads them as arrays.
        self._verify = RowWindow(WINDOW_STEPS, 4)  # (batched tokens, verify ms, batch size, KV tokens)
        self._propose = RowWindow(WINDOW_STEPS, 4)  # (propose ms, draft steps, draft tokens, draft ms)
        self._errors: deque[float] = deque(maxlen=ERROR_WINDOW)
        self._a, self._b, self._system_prior = np.empty((0, 0)), np.empty(0), None  # see `_system`
        self._since_fit = 0
        self._seen = 0
        self.params = self.prior

    def observe(self, step: StepRecord) -> None:
        if step.verify_ms > 0 and self.params.num_steps:
            predicted = self.params.verify_ms_at(step.batch_size, step.num_batched_tokens, step.num_kv_tokens)
            self._errors.append(abs(predicted - step.verify_ms) / step.verify_ms)
        self._keep(step)
        self._seen += 1
        self._since_fit += 1
        # Refit at once while the model is young, then every refit_every steps.
        if self._since_fit >= self.refit_every or len(self._verify) < 2 * self.refit_every:
            self.refit()

    @property
    def num_seen(self) -> int:
        return self._seen

    def seed(self, steps: list[StepRecord]) -> CostParams:
        """Steps measured before serving (a profile or a calibration): fitted, not scored."""
        for step in steps:
            self._keep(step)
        return self.refit()

    def _keep(self, step: StepRecord) -> None:
        if step.verify_ms > 0:
            self._verify.append((step.num_batched_tokens, step.verify_ms, step.batch_size, step.num_kv_tokens))
        if step.draft_steps > 0 and step.propose_ms > 0:
            self._propose.append((step.propose_ms, step.draft_steps, step.draft_tokens, step.draft_ms))

    def relative_error(self) -> float:
        """Median absolute relative error of verify-time predictions over recent steps."""
        return float(np.median(self._errors)) if self._errors else float("nan")

    def refit(self) -> CostParams:
        self._since_fit = 0
        verify = self._fit_verify() if self._verify else None
        draft = self._fit_propose() if self._propose else None
        p = self.params
        knots, per_request, per_kv = verify or (p.verify_ms_at_knots, p.verify_ms_per_request, p.verify_ms_per_kv_token)
        step, per_token, rtt = draft or (p.draft_step_ms, p.draft_ms_per_token, p.proposer_rtt_ms)
        self.params = CostParams(
            tuple(knots), per_request, per_kv, step, per_token, rtt, self.relative_error(), self._seen
        )
        return self.params

    def _fit_verify(self) -> tuple[np.ndarray, float, float]:
        table = self._verify.rows()
        tokens, y, batch, kv = table.T
        n, m, x = len(table), len(_KNOTS), _KNOTS
        # The system's rows: the steps, then the curvature and prior rows (`_system`).
        a, b = self._system(n)
        # Hat basis: each step's f(N_tok) interpolates its two neighbouring knots.
        hat = a[:n, :m]
        hat[:] = 0.0
        j = np.clip(np.searchsorted(x, tokens, side="right") - 1, 0, m - 2)
        w = np.clip((tokens - x[j]) / (x[j + 1] - x[j]), 0.0, 1.0)
        hat[np.arange(n), j] = 1 - w
        hat[np.arange(n), j + 1] = w
        extra = np.stack([batch, kv], axis=1)
        scale = np.maximum(extra.max(axis=0), 1.0)
        a[:n, m:] = extra / scale
        b[:n] = y
        # Curvature rows: slope changes between knots cost CURVATURE_PENALTY (in ms per token).
        # The straight-line prior yields where steps were seen: a cliff in the kernels
        # (a change of kernel or blocking at some row count) must stay a cliff, not be smoothed over.
        counts = hat.sum(axis=0)  # steps seen at each knot, split by interpolation weight
        a[n : n + m - 2] = CURVATURE_PENALTY * (_CURVATURE / (1.0 + counts[1:-1, None]))
        # Noise on shared cores is one-sided (a step is slowed, never sped up), and least
        # squares follows the slow outliers above the typical step. Huber reweightings (when
        # asked for), from the residuals of the fit before, cap their pull. Steps within
        # HUBER_RELATIVE of the fit keep full weight, so the balance with the penalty rows
        # (and a cliff between knots) stays as it was.
        design = a[:n].copy() if self.huber_iterations else a[:n]
        coef = _solve_knots(a, b, m)
        for _ in range(self.huber_iterations):
            relative = np.abs(design @ coef - y) / y
            s = np.sqrt(np.minimum(1.0, HUBER_RELATIVE / np.maximum(relative, 1e-12)))
            a[:n], b[:n] = design * s[:, None], y * s
            coef = _solve_knots(a, b, m)
        knots = _rising(np.maximum(coef[:m], 0.0), counts + 1e-3)
        per_request, per_kv = coef[m:] / scale
        return knots, float(per_request), float(per_kv)

    def _system(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """The fit's least-squares system for n steps, kept between refits: n step rows, m - 2
        curvature rows, m rows pulling each knot toward the prior (relative, so that big knots
        weigh alike). What does not depend on the steps is written when the buffers are made."""
        m = len(TOKEN_KNOTS)
        if len(self._b) != n + 2 * m - 2 or self._system_prior is not self.prior:
            prior = np.maximum(np.asarray(self.prior.verify_ms_at_knots), 1e-3)
            pull = np.hstack([np.diag(PRIOR_WEIGHT / prior), np.zeros((m, 2))])
            self._a = np.vstack([np.empty((n + m - 2, m + 2)), pull])
            self._b = np.concatenate([np.empty(n), np.zeros(m - 2), np.full(m, PRIOR_WEIGHT)])
            self._system_prior = self.prior
        return self._a, self._b

    def _fit_propose(self) -> tuple[float, float, float]:
        """propose_ms = rtt + draft_step * max k + per_token * sum k.

        The step and per-token costs come from the drafting time the proposers
        report, with no intercept: under one policy max k barely varies, and a
        fit on the waited time alone then cannot tell a draft step from the hop
        (drafts looked free). The rtt is the mean of what the verifier waited
        beyond that, timeouts included: a proposer that times out under load
        costs its deadline, and the fit must see that.
        """
        table = self._propose.rows()
        waited, a, drafted = table[:, 0], table[:, 1:3], table[:, 3]
        reported = drafted > 0
        if reported.any():
            step, per_token = _nonnegative_lstsq(a[reported], drafted[reported])
            rtt = max(float(np.mean(waited - a @ (step, per_token))), 0.0)
            return step, per_token, rtt
        rtt, step, per_token = _nonnegative_lstsq(np.hstack([np.ones((len(table), 1)), a]), waited)
        return step, per_token, rtt


def _solve_knots(a: np.ndarray, b: np.ndarray, m: int) -> np.ndarray:
    """Least squares for m knots plus the batch-size and KV columns. B and N_kv can only add
    time, and no knot is below zero: when the batch size or KV column (often nearly collinear
    with N_tok) pulls the fit there, it is dropped."""
    # Through the normal equations: (m + 2) x (m + 2), whatever the number of steps.
    gram, rhs = a.T @ a, a.T @ b
    keep = np.ones(m + 2, dtype=bool)
    while True:
        coef = np.zeros(m + 2)
        coef[keep], *_ = np.linalg.lstsq(gram[np.ix_(keep, keep)], rhs[keep], rcond=None)
        negative = [c for c in (m, m + 1) if keep[c] and coef[c] < 0]
        if not negative and (coef[:m].min() >= 0 or not keep[m:].any()):
            return coef
        keep[min(negative, key=lambda c: coef[c]) if negative else (m if keep[m] else m + 1)] = False


def _rising(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The closest non-decreasing sequence in weighted least squares (pool adjacent violators)."""
    alone = values * weights / weights  # each knot's own block, as the pooling below computes it
    if not (alone[:-1] > alone[1:]).any():  # nothing to pool (the usual case)
        return alone
    blocks: list[list[float]] = []  # [weighted sum, weight, count]
    for v, w in zip(values.tolist(), weights.tolist()):
        blocks.append([v * w, w, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, w2, n = blocks.pop()
            blocks[-1] = [blocks[-1][0] + s, blocks[-1][1] + w2, blocks[-1][2] + n]
    return np.concatenate([np.full(n, s / w) for s, w, n in blocks])


def _nonnegative_lstsq(a: np.ndarray, y: np.ndarray) -> list[float]:
    """Least squares, dropping the most negative column until none is negative."""
    keep = np.ones(a.shape[1], dtype=bool)
    while True:
        coef = np.zeros(a.shape[1])
        coef[keep], *_ = np.linalg.lstsq(a[:, keep], y, rcond=None)
        if (coef[keep] >= 0).all():
            return [float(c) for c in coef]
        keep[int(np.argmin(np.where(keep, coef, np.inf)))] = False
