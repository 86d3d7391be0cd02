import math

import pytest
import torch

from runtime.rejection import SampleRequest, verify
from runtime.sampler import SamplingParams, processed_probs


def sample(logits, params, seeds=None, positions=None) -> list[int]:
    """One token per row (plain decoding: no drafts); by default each row's own seed at
    output position = its row index, so repeated rows are independent draws."""
    seeds = seeds or [p.seed or 0 for p in params]
    positions = positions or list(range(len(params)))
    requests = [SampleRequest(p, None, s, pos) for p, s, pos in zip(params, seeds, positions)]
    return [v.token_ids[0] for v in verify(logits, requests)]


def softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_default_params_are_greedy():
    p = SamplingParams()
    assert p.greedy and p.top_p == 1.0 and p.top_k == 0 and p.seed is None
    assert not SamplingParams(temperature=0.5).greedy


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9], [5.0, 0.0, 0.0, 4.0], [-3.0, -2.0, -1.0, -1.5]])
    params = [SamplingParams()] * 3
    assert sample(logits, params) == [1, 0, 2]


def test_greedy_ignores_top_k_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample(logits, [SamplingParams(top_k=1, top_p=0.1)]) == [1]


def test_empty_batch():
    assert sample(torch.empty(0, 5), []) == []


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = torch.tensor([[0.0, 9.0, 0.0], [0.0, 0.0, 0.0], [7.0, 0.0, 0.0]])
    params = [SamplingParams(), SamplingParams(temperature=1.0, top_k=1), SamplingParams()]
    tokens = sample(logits, params)
    assert tokens[0] == 1 and tokens[2] == 0
    assert tokens[1] in (0, 1, 2)


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_k=2)])
    assert probs.dtype == torch.float32
    assert torch.count_nonzero(probs) == 2
    expected = softmax([3.0, 2.0])
    torch.testing.assert_close(probs[0, [1, 2]], torch.tensor(expected), rtol=1e-6, atol=1e-7)


def test_top_k_per_row():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [4.0, 3.0, 2.0, 1.0]])
    probs = processed_probs(
        logits, [SamplingParams(temperature=1.0, top_k=1), SamplingParams(temperature=1.0, top_k=3)]
    )
    assert probs[0].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert (probs[1] > 0).tolist() == [True, True, True, False]


@pytest.mark.parametrize(
    "top_p, kept",
    [
        # probabilities (sorted): 0.5, 0.25, 0.15, 0.1
        (0.4, [0]),  # 0.5 >= 0.4 already
        (0.7, [0, 1]),  # 0.75 >= 0.7
        (0.8, [0, 1, 2]),  # 0.75 < 0.8 <= 0.9
        (0.95, [0, 1, 2, 3]),
    ],
)
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    base = [0.5, 0.25, 0.15, 0.1]
    perm = [2, 0, 3, 1]  # vocabulary order is not probability order
    vocab_probs = [0.0] * 4
    for rank, tok in enumerate(perm):
        vocab_probs[tok] = base[rank]
    logits = torch.tensor([[math.log(p) for p in vocab_probs]])
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=top_p)])[0]
    kept_tokens = {perm[r] for r in kept}
    mass = sum(base[r] for r in kept)
    for tok in range(4):
        want = vocab_probs[tok] / mass if tok in kept_tokens else 0.0
        assert probs[tok].item() == pytest.approx(want, abs=1e-6)


def test_top_p_keeps_or_drops_tied_tokens_together():
    """Equal probabilities at the cut stay together, whatever order a sort leaves them in: the
    mass before a token is that of the tokens strictly more likely."""
    logits = torch.tensor([[math.log(p) for p in [0.1, 0.4, 0.2, 0.2, 0.1]]])
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=0.5)])[0]
    assert (probs > 0).tolist() == [False, True, True, True, False]  # 0.4 < 0.5: both 0.2s stay
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=0.4)])[0]
    assert (probs > 0).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("candidates", [(3,), (3, 16), (16,)])
def test_top_p_on_a_cpu_decides_from_the_candidates_what_a_full_sort_decides(monkeypatch, candidates):
    """On a CPU top-p looks among the most likely tokens first (then more of them) and sorts
    whole only the rows whose cut lies past them all: row by row the same tokens go as with a
    sort of every row (peaked, flat and tied rows, every top-p), and the same for any
    permutation of the vocabulary."""
    import runtime.sampler as sampler

    gen = torch.Generator().manual_seed(0)
    v = 40
    rows = [torch.randn(v, generator=gen) * scale for scale in (0.1, 1.0, 3.0, 8.0)]
    rows.append(torch.randint(0, 4, (v,), generator=gen).float())  # many ties
    rows.append(torch.zeros(v))  # all tied
    logits = torch.stack(rows * 3)
    top_ps = torch.tensor([0.05, 0.3, 0.6, 0.9, 0.97, 0.999] * 3).unsqueeze(1)
    probs = torch.softmax(logits, dim=1)
    monkeypatch.setattr(sampler, "TOP_P_CANDIDATES", candidates)
    want = sampler._sorted_drop(probs, top_ps)
    got = sampler._top_p_drop(probs, top_ps)
    assert torch.equal(got, want)
    assert not want.all(dim=1).any()  # the top token always stays
    kept = (~want).sum(dim=1)
    assert (kept < candidates[0]).any() and (kept > candidates[-1]).any()  # candidates and sort both decided
    perm = torch.randperm(v, generator=gen)
    assert torch.equal(sampler._top_p_drop(probs[:, perm], top_ps), want[:, perm])


def test_a_row_is_cut_the_same_whatever_shares_its_batch():
    """Each row's distribution is its own: a top_p = 1 row keeps its whole tail beside rows that
    cut (a cumulative sum rounding up to 1 must not cut it), and a top-p or top-k row is cut the
    same alone and in a mixed batch."""
    gen = torch.Generator().manual_seed(1)
    rows = torch.randn(4, 32000, generator=gen) * 4
    params = [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.7, top_k=40),
        SamplingParams(temperature=1.2, top_k=100, top_p=0.95),
    ]
    together = processed_probs(rows, params)
    for i, p in enumerate(params):
        assert torch.equal(together[i], processed_probs(rows[i : i + 1], [p])[0]), p
    assert (together[0] > 0).all()


def test_top_p_tiny_keeps_the_top_token():
    logits = torch.tensor([[0.0, 0.1, 0.2]])
    probs = processed_probs(logits, [SamplingParams(temperature=1.0, top_p=1e-6)])
    assert probs[0].tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=1.0, top_p=1.0, top_k=0),
        SamplingParams(temperature=1.0, top_k=5),  # k == vocab
        SamplingParams(temperature=1.0, top_k=50),  # k > vocab
    ],
)
def test_no_truncation_is_plain_softmax(params):
    logits = torch.tensor([[0.3, -1.2, 2.5, 0.0, 1.1]])
    probs = processed_probs(logits, [params])
    torch.testing.assert_close(probs, torch.softmax(logits, 1), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.25, 0.5, 1.0, 2.0])
def test_temperature_scaling(temperature):
    raw = [1.0, 2.0, 3.0, -0.5]
    probs = processed_probs(torch.tensor([raw]), [SamplingParams(temperature=temperature)])[0]
    want = softmax([x / temperature for x in raw])
    for got, w in zip(probs.tolist(), want):
        assert got == pytest.approx(w, rel=1e-5)


def test_temperature_then_top_k_then_top_p():
    raw = [2.0, 1.0, 0.5, 0.0, -1.0]
    params = SamplingParams(temperature=0.5, top_k=3, top_p=0.9)
    probs = processed_probs(torch.tensor([raw]), [params])[0].tolist()
    after_k = softmax([x / 0.5 for x in raw[:3]])  # [0.844, 0.114, 0.042]
    assert after_k[0] < 0.9 <= after_k[0] + after_k[1]
    mass = after_k[0] + after_k[1]
    want = [after_k[0] / mass, after_k[1] / mass, 0.0, 0.0, 0.0]
    assert probs == pytest.approx(want, abs=1e-6)


def test_bf16_logits_give_float32_probs():
    logits = torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.bfloat16)
    probs = processed_probs(logits, [SamplingParams(temperature=1.0)])
    assert probs.dtype == torch.float32
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)


def _draws(seed: int, n: int = 64) -> list[int]:
    params = SamplingParams(temperature=1.0, seed=seed)
    logits = torch.zeros(n, 50)  # uniform over 50 tokens
    return sample(logits, [params] * n)  # output positions 0..n-1


def test_same_seed_same_tokens_different_seed_differs():
    assert _draws(1234) == _draws(1234)
    assert _draws(1234) != _draws(4321)


def test_seeded_stream_does_not_depend_on_the_batch():
    """A request's tokens depend on its seed and output position, whoever else is in the batch."""
    params = SamplingParams(temperature=1.0, seed=7)
    other = SamplingParams(temperature=1.0, seed=99)
    logits = torch.zeros(2, 50)
    alone = [sample(logits[:1], [params], positions=[pos])[0] for pos in range(20)]
    batched = [sample(logits, [other, params], positions=[3, pos])[1] for pos in range(20)]
    assert alone == batched
    assert len(set(alone)) > 5


def test_truncated_tokens_are_never_sampled():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]])
    params = SamplingParams(temperature=1.5, top_k=3, seed=0)
    n = 2000
    tokens = sample(logits.repeat(n, 1), [params] * n)
    assert set(tokens) == {0, 1, 2}


def _chi2_critical_wilson_hilferty(df: int, alpha: float) -> float:
    z = {0.01: 2.326347874}[alpha]  # upper-tail standard normal quantile
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def test_sample_follows_processed_probs_chi_square():
    logits = torch.tensor([[1.2, 0.4, -0.3, 0.9, 2.0, -1.5, 0.1, 0.6]])
    params = SamplingParams(temperature=0.7, top_k=4, top_p=0.9, seed=20240601)
    probs = processed_probs(logits, [params])[0].double()
    support = (probs > 0).nonzero().flatten().tolist()
    assert 2 <= len(support) <= 4  # the truncations actually bite

    n = 6000
    tokens = sample(logits.repeat(n, 1), [params] * n)
    counts = torch.bincount(torch.tensor(tokens), minlength=8).double()
    assert counts[[t for t in range(8) if t not in support]].sum() == 0

    expected = probs[support] * n
    assert (expected >= 5).all()
    observed = counts[support]
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(support) - 1
    p_value = 1.0 - float(torch.distributions.Chi2(torch.tensor(float(df))).cdf(torch.tensor(stat)))
    assert p_value > 0.01, (stat, observed.tolist(), expected.tolist())
    assert stat < _chi2_critical_wilson_hilferty(df, 0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU; none on the CI machine")
def test_sampling_accepts_gpu_logits_and_matches_the_cpu_draws_needs_a_gpu():
    """Needs a GPU: the same seeds give the same tokens on CUDA as on the CPU."""
    logits = torch.randn(3, 10, device="cuda")
    params = [
        SamplingParams(temperature=0.8, top_k=5, top_p=0.9, seed=1),
        SamplingParams(),
        SamplingParams(temperature=1.0, seed=2),
    ]
    tokens = sample(logits, params)
    assert len(tokens) == 3 and all(0 <= t < 10 for t in tokens)
    assert tokens[1] == int(logits[1].argmax())
    assert tokens == sample(logits.cpu(), params)
