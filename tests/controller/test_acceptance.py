import numpy as np
import pytest

from controller.acceptance import AcceptanceEstimator, num_tested


def geometric_draft(rng, rate: float, k: int) -> int:
    """Accepted drafts out of k when each is accepted with probability `rate` until the first rejection."""
    accepted = 0
    while accepted < k and rng.random() < rate:
        accepted += 1
    return accepted


def run(estimator, rng, rate, steps, k=4, request="r"):
    for _ in range(steps):
        estimator.observe(request, k, geometric_draft(rng, rate, k))


def test_tested_tokens_count_the_first_rejection_only():
    assert num_tested(4, 4) == 4
    assert num_tested(4, 1) == 2
    assert num_tested(4, 0) == 1
    assert num_tested(0, 0) == 0


@pytest.mark.parametrize("rate", [0.2, 0.5, 0.8, 0.95])
def test_within_0_02_of_a_geometric_rate_after_500_steps(rate):
    errors = []
    for seed in range(20):
        est = AcceptanceEstimator(prior=0.5)
        run(est, np.random.default_rng(seed), rate, 500)
        errors.append(abs(est.rate("r") - rate))
    assert np.median(errors) <= 0.02, errors


def test_accepted_over_proposed_would_be_biased():
    """The counting matters: accepted/proposed at rate 0.8, k = 8 is about 0.5."""
    rng = np.random.default_rng(0)
    est = AcceptanceEstimator()
    proposed = accepted = 0
    for _ in range(500):
        a = geometric_draft(rng, 0.8, 8)
        est.observe("r", 8, a)
        proposed, accepted = proposed + 8, accepted + a
    assert abs(est.rate("r") - 0.8) < 0.03
    assert accepted / proposed < 0.6


@pytest.mark.parametrize("before,after", [(0.8, 0.3), (0.3, 0.8), (0.9, 0.5)])
def test_tracks_a_change_of_rate_within_100_steps(before, after):
    errors = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        est = AcceptanceEstimator()
        run(est, rng, before, 500)
        run(est, rng, after, 100)
        errors.append(abs(est.rate("r") - after))
    assert np.median(errors) <= 0.05, errors


def test_new_request_starts_at_the_prior_and_is_shrunk_toward_it():
    est = AcceptanceEstimator(prior=0.6, prior_weight=4)
    assert est.rate("new") == pytest.approx(0.6)
    est.observe("r", 4, 0)  # one tested token, rejected
    assert est.rate("r") == pytest.approx((0 + 4 * est.prior) / (1 + 4))
    assert 0 < est.rate("r") < est.prior


def test_prior_follows_all_requests():
    rng = np.random.default_rng(1)
    est = AcceptanceEstimator(prior=0.5)
    for i in range(200):
        run(est, rng, 0.9, 5, request=f"r{i}")
    assert abs(est.prior - 0.9) < 0.03
    assert est.rate("unseen") == pytest.approx(est.prior)


def test_idle_requests_drift_back_to_the_prior():
    est = AcceptanceEstimator(prior=0.7)
    for _ in range(50):
        est.observe("bad", 4, 0)
    for i in range(300):
        est.observe(f"good{i}", 4, 4)
    low = est.rate("bad")
    for _ in range(30):  # acceptance can change while nothing is drafted: look again within ~30 steps
        est.idle("bad")
    assert est.rate("bad") > low + 0.3


def test_release_forgets_the_request():
    est = AcceptanceEstimator(prior=0.5)
    est.observe("r", 4, 4)
    est.release("r")
    assert len(est) == 0
    assert est.rate("r") == pytest.approx(est.prior)


def test_a_steps_drafts_at_once_are_each_observed_in_turn():
    """`observe_all` (what the planner calls with a step's drafts) learns exactly what one
    `observe` per draft learns, change points, idle fading and the global prior included."""
    rng = np.random.default_rng(9)
    one, batch = AcceptanceEstimator(), AcceptanceEstimator()
    ids = [f"r{i}" for i in range(6)]
    rates = dict(zip(ids, rng.uniform(0.1, 0.95, len(ids))))
    for step in range(400):
        if step == 200:
            rates["r0"], rates["r1"] = 0.05, 0.99  # changes the split tests must find
        drafts = []
        for request in ids:
            if rng.random() < 0.1:
                one.idle(request)
                batch.idle(request)
            else:
                k = int(rng.integers(1, 9))
                drafts.append((request, k, geometric_draft(rng, rates[request], k)))
        drafts.append((None, 3, 1))
        for d in drafts:
            one.observe(*d)
        batch.observe_all(drafts)
        assert one.rates(ids).tolist() == batch.rates(ids).tolist()
        assert one.prior == batch.prior
    assert one.rate("r0") < 0.3 and one.rate("r1") > 0.8  # the changes were found, so both paths ran them
