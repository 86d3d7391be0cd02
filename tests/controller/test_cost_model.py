import numpy as np
import pytest

from controller.cost_model import HUBER_ITERATIONS, TOKEN_KNOTS, CostModelFitter, CostParams, linear_prior
from controller.step import StepRecord


def step(batch, tokens, kv, ms, planned_k=(), propose_ms=0.0, draft_ms=0.0):
    return StepRecord(
        batch_size=batch,
        num_batched_tokens=tokens,
        num_kv_tokens=kv,
        verify_ms=ms,
        planned_k=tuple(int(k) for k in planned_k),
        propose_ms=propose_ms,
        draft_ms=draft_ms,
    )


def gpu_like(tokens, batch, kv):
    """Flat until 64 tokens, then linear: the knee a single line misses."""
    return 10.0 + 0.05 * np.maximum(tokens - 64, 0) + 0.02 * batch + 0.0005 * kv


def cpu_like(tokens, batch, kv):
    return 40.0 + 8.0 * tokens + 0.3 * batch + 0.001 * kv


def live_steps(rng, truth, n, noise=0.03):
    for _ in range(n):
        batch = int(rng.integers(1, 33))
        k = int(rng.integers(0, 6))
        tokens = batch * (k + 1) + int(rng.integers(0, 3)) * 16 * int(rng.random() < 0.2)
        kv = batch * int(rng.integers(32, 600))
        ms = truth(tokens, batch, kv) * (1 + noise * rng.standard_normal())
        yield step(batch, tokens, kv, ms)


@pytest.mark.parametrize("truth", [gpu_like, cpu_like])
def test_fits_both_shapes_with_low_prediction_error(truth):
    rng = np.random.default_rng(0)
    fitter = CostModelFitter()
    for s in live_steps(rng, truth, 1500):
        fitter.observe(s)
    assert fitter.relative_error() < 0.05  # noise is 3%
    p = fitter.refit()
    for tokens in (8, 32, 64, 128, 192):
        assert float(p.verify_ms(8, tokens, 8 * 300)) == pytest.approx(truth(tokens, 8, 8 * 300), rel=0.06)


def test_a_single_line_misses_the_knee():
    """What the piecewise fit is for: the best straight line is far off at the knee."""
    rng = np.random.default_rng(1)
    rows = list(live_steps(rng, gpu_like, 1500, noise=0.0))
    x = np.array([[1, r.num_batched_tokens, r.batch_size, r.num_kv_tokens] for r in rows], dtype=float)
    y = np.array([r.verify_ms for r in rows])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    line_error = np.median(np.abs(x @ coef - y) / y)
    fitter = CostModelFitter()
    for r in rows:
        fitter.observe(r)
    assert fitter.relative_error() < line_error / 3


def test_extrapolates_unseen_token_counts_along_the_line():
    fitter = CostModelFitter()
    for tokens in (1, 2, 4, 8, 16) * 20:
        fitter.observe(step(tokens, tokens, 0, cpu_like(tokens, tokens, 0)))
    p = fitter.refit()
    assert float(p.verify_ms(32, 32, 0)) == pytest.approx(cpu_like(32, 32, 0), rel=0.1)
    for unseen in (3, 6, 12):  # knots without data sit on the line through their neighbours
        assert float(p.verify_ms(unseen, unseen, 0)) == pytest.approx(cpu_like(unseen, unseen, 0), rel=0.05)


def test_knots_never_fall():
    """A dip in the data (here 16 tokens 202 ms, 32 tokens 158 ms) is noise of shared cores or a
    kernel the engine no longer uses; a planner that believed it would draft to get there."""

    def dip(tokens):
        return {16: 202.0, 24: 180.0, 32: 158.0}.get(tokens, 60.0 + 4.0 * tokens)

    fitter = CostModelFitter()
    for tokens in (8, 12, 16, 24, 32, 48, 64) * 30:
        fitter.observe(step(16 if tokens >= 16 else tokens, tokens, 0, dip(tokens)))
    p = fitter.refit()
    assert np.all(np.diff(p.verify_ms_at_knots) >= 0)
    assert float(p.verify_ms(16, 32, 0)) == pytest.approx(float(p.verify_ms(16, 16, 0)), rel=0.02)  # pooled


def test_rising_is_the_weighted_closest_non_decreasing_sequence():
    from controller.cost_model import _rising

    np.testing.assert_allclose(_rising(np.array([1.0, 3.0, 2.0, 4.0]), np.ones(4)), [1.0, 2.5, 2.5, 4.0])
    np.testing.assert_allclose(_rising(np.array([1.0, 3.0, 2.0]), np.array([1.0, 1.0, 3.0])), [1.0, 2.25, 2.25])
    np.testing.assert_allclose(
        _rising(np.array([5.0, 1.0, 1.0]), np.array([1e-3, 1.0, 1.0])), [1.002, 1.002, 1.002], rtol=1e-3
    )


def test_learns_the_cliff_of_power_of_two_row_counts():
    # A kernel that pads rows to a power of two up to 32 (as the CPU linear layers once did):
    # 9..16 tokens cost as 16, 17 as 32.
    def padded(tokens, batch, kv):
        rows = np.where(tokens <= 32, 2 ** np.ceil(np.log2(np.maximum(tokens, 2))), tokens)
        return 30.0 + 2.0 * rows

    fitter = CostModelFitter()
    rng = np.random.default_rng(5)
    for _ in range(600):
        tokens = int(rng.integers(1, 41))
        fitter.observe(step(1, tokens, 300, float(padded(tokens, 1, 300)) * rng.normal(1.0, 0.02)))
    p = fitter.refit()
    for tokens in (3, 4, 9, 16, 17, 20, 32):
        assert float(p.verify_ms(1, tokens, 300)) == pytest.approx(float(padded(tokens, 1, 300)), rel=0.05)


def test_slow_outliers_do_not_lift_the_typical_step():
    # Shared cores slow some steps (here one in five, by 30-60%) and never speed one up.
    def typical(tokens, batch):
        return 30.0 + 2.0 * tokens + 1.5 * batch

    huber, least_squares = CostModelFitter(huber_iterations=HUBER_ITERATIONS), CostModelFitter()
    rng = np.random.default_rng(11)
    for _ in range(800):
        batch = int(rng.integers(1, 9))
        tokens = batch * int(rng.integers(1, 5))
        slowed = rng.uniform(1.3, 1.6) if rng.random() < 0.2 else 1.0
        record = step(batch, tokens, batch * 200, typical(tokens, batch) * slowed * rng.normal(1.0, 0.02))
        huber.observe(record)
        least_squares.observe(record)
    shapes = [(b, b * q) for b in range(1, 9) for q in range(1, 5)]

    def error(p: CostParams) -> float:
        return float(np.median([abs(p.verify_ms(b, t, b * 200) / typical(t, b) - 1) for b, t in shapes]))

    # Least squares lands about 9% above the typical step; the Huber-weighted fit within 3%.
    assert error(least_squares.refit()) > 0.06
    assert error(huber.refit()) < 0.03


def test_draft_cost_and_rtt_from_proposal_times():
    rng = np.random.default_rng(2)
    fitter = CostModelFitter()
    for _ in range(300):
        ks = rng.integers(1, 6, size=int(rng.integers(1, 9)))
        draft = 4.0 * ks.max() + 0.5 * ks.sum()
        fitter.observe(step(len(ks), int(ks.sum() + len(ks)), 100, 50.0, ks, propose_ms=draft + 0.8, draft_ms=draft))
    p = fitter.refit()
    assert p.draft_step_ms == pytest.approx(4.0, rel=0.01)
    assert p.draft_ms_per_token == pytest.approx(0.5, rel=0.02)
    assert p.proposer_rtt_ms == pytest.approx(0.8, rel=0.01)
    assert float(p.propose_ms(3, 6)) == pytest.approx(0.8 + 12 + 3)
    assert float(p.propose_ms(0, 0)) == 0.0


def test_draft_step_is_told_from_the_hop_under_a_fixed_depth():
    # One policy, one depth: from the waited time alone a 10 ms draft step and a 1 ms hop
    # are indistinguishable; the reported drafting time separates them.
    fitter = CostModelFitter()
    for _ in range(100):
        fitter.observe(step(4, 16, 400, 50.0, (3, 3, 3, 3), propose_ms=31.0 + 1.0, draft_ms=31.0))
    p = fitter.refit()
    assert float(p.propose_ms(3, 12)) == pytest.approx(32.0)
    assert float(p.propose_ms(1, 4)) < 14.0  # a shallower draft is cheaper, not the same 32 ms
    assert p.proposer_rtt_ms == pytest.approx(1.0, abs=0.01)


def test_timeouts_count_in_the_waited_time():
    fitter = CostModelFitter()
    for i in range(100):
        timed_out = i % 10 == 0
        fitter.observe(
            step(
                4,
                16,
                400,
                50.0,
                (2, 2, 2, 2),
                propose_ms=50.0 if timed_out else 9.0,
                draft_ms=0.0 if timed_out else 8.0,
            )
        )
    p = fitter.refit()
    # 10% of steps wait the 50 ms deadline: the expected wait is 0.9 * 9 + 0.1 * 50 = 13.1 ms.
    assert float(p.propose_ms(2, 8)) == pytest.approx(13.1, rel=0.01)


def test_without_reported_drafting_time_the_waited_time_is_fitted():
    rng = np.random.default_rng(4)
    fitter = CostModelFitter()
    for _ in range(200):
        ks = rng.integers(1, 6, size=int(rng.integers(1, 9)))
        fitter.observe(step(len(ks), int(ks.sum() + len(ks)), 100, 50.0, ks, propose_ms=2.0 + 3.0 * ks.max()))
    p = fitter.refit()
    assert p.draft_step_ms == pytest.approx(3.0, rel=0.01)
    assert p.proposer_rtt_ms == pytest.approx(2.0, rel=0.02)


def test_prediction_error_is_reported_and_reaches_the_params():
    fitter = CostModelFitter()
    assert np.isnan(fitter.relative_error())
    rng = np.random.default_rng(3)
    for s in live_steps(rng, cpu_like, 200, noise=0.0):
        fitter.observe(s)
    p = fitter.refit()
    assert p.verify_relative_error == fitter.relative_error() < 0.02
    assert p.num_steps == 200


def test_linear_prior():
    p = linear_prior(2.0, 5.0)
    assert isinstance(p, CostParams)
    assert float(p.verify_ms(1, TOKEN_KNOTS[3], 0)) == pytest.approx(5 + 2 * TOKEN_KNOTS[3])


def test_profiles_seed_the_fit(tmp_path):
    import json

    from controller.profile import load_profile

    rows = [
        {"B": b, "q": q, "ctx": 128, "ms": cpu_like(b * q, b, b * (128 + q))} for b in (1, 4, 16) for q in (1, 2, 4)
    ]
    (tmp_path / "p.json").write_text(json.dumps({"rows": rows}))
    fitter = CostModelFitter()
    for s in load_profile(str(tmp_path / "p.json")):
        fitter.observe(s)
    p = fitter.refit()
    assert float(p.verify_ms(8, 16, 8 * 130)) == pytest.approx(cpu_like(16, 8, 8 * 130), rel=0.05)


def test_shared_gpu_profile_loads_per_model():
    from pathlib import Path

    from controller.profile import load_profile

    path = Path(__file__).resolve().parents[2] / "profiles" / "h200_transformers_eager.json"
    samples = load_profile(f"{path}#llama-7b")
    assert samples and all(s.verify_ms > 0 for s in samples)
    with pytest.raises(ValueError, match="no model"):
        load_profile(f"{path}#nope")


def test_verify_ms_at_is_verify_ms_to_the_bit():
    """The one-shape path the engine and the simulator call every step gives what the array
    path gives, bit for bit: on knots, between them, outside the table, for fitted and prior models."""
    rng = np.random.default_rng(5)
    fitter = CostModelFitter()
    for s in live_steps(rng, gpu_like, 300):
        fitter.observe(s)
    models = [fitter.refit(), linear_prior(20.0, 40.0), CostParams(tuple(rng.uniform(0, 50, len(TOKEN_KNOTS))), 0.3)]
    shapes = [(b, t, kv) for b in (1, 7, 64) for t in (0, 1, 2, 17, 18, 19, 100, 8191, 8192, 9000) for kv in (0, 5000)]
    shapes += [(int(b), int(t), int(kv)) for b, t, kv in rng.integers(1, [64, 10_000, 200_000], size=(500, 3))]
    for p in models:
        for b, t, kv in shapes:
            assert p.verify_ms_at(b, t, kv) == float(p.verify_ms(b, t, kv)), (p, b, t, kv)


def test_the_fit_is_the_window_it_keeps():
    """Steps beyond the window leave no trace: a fitter that saw 2.5 windows of steps fits what
    a fresh one seeded with the last window alone fits, to the bit (the window's buffer wraps twice)."""
    from controller.cost_model import WINDOW_STEPS

    rng = np.random.default_rng(6)
    rows = []
    for s in live_steps(rng, gpu_like, WINDOW_STEPS * 5 // 2):
        ks = rng.integers(1, 6, s.batch_size)  # every step drafts, so both windows hold the same steps
        draft = 2.0 * ks.max() + 0.1 * ks.sum()
        rows.append(step(s.batch_size, s.num_batched_tokens, s.num_kv_tokens, s.verify_ms, ks, draft + 1.0, draft))
    seen = CostModelFitter()
    for r in rows:
        seen.observe(r)
    a, b = seen.refit(), CostModelFitter().seed(rows[-WINDOW_STEPS:])
    assert a.verify_ms_at_knots == b.verify_ms_at_knots
    assert (a.verify_ms_per_request, a.verify_ms_per_kv_token) == (b.verify_ms_per_request, b.verify_ms_per_kv_token)
    assert (a.draft_step_ms, a.draft_ms_per_token, a.proposer_rtt_ms) == (
        b.draft_step_ms,
        b.draft_ms_per_token,
        b.proposer_rtt_ms,
    )
