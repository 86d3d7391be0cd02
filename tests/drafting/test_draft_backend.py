"""The draft-model backend: lockstep drafting with its own KV, exact sparse distributions, and
lossless speculation through the real services with a draft that is the target plus noise."""

from __future__ import annotations

import collections

import pytest
import torch
from distributions import chi_square_p, exact_marginals
from greedy_reference import assert_same_greedy, hf_greedy
from service_threads import ProposerThread, VerifierThread

from drafting.draft_model import DraftModelBackend
from drafting.state import DraftCall
from protocol.v1 import generation_pb2 as pb
from runtime.models import load_model
from runtime.sampler import SamplingParams


def noisy_copy(src_dir: str, dst, scale: float, seed: int) -> str:
    """The target with Gaussian noise on every weight: a draft with tunable acceptance."""
    model = load_model(src_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std())
    model.save_pretrained(dst)
    return str(dst)


def test_drafts_follow_the_draft_models_greedy_chain(small_vocab_dir):
    reference = load_model(small_vocab_dir)
    backend = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512)
    states = [backend.new_state() for _ in range(3)]
    prompts = [[3, 4, 5, 6], [7, 7, 2], [9, 3, 3, 3, 10, 11]]
    for s, p in zip(states, prompts):
        s.extend(p)
    ks = [3, 1, 5]  # requests drop out of the lockstep as their k is reached
    drafts = backend.propose([DraftCall(s, k, SamplingParams()) for s, k in zip(states, ks)])
    for d, p, k in zip(drafts, prompts, ks):
        assert d.probs is None and d.token_ids == hf_greedy(reference, p, k, ignore_eos=True)
        assert not d.stopped_early
    # The verifier accepts 2 of request 0's drafts and adds its own token: KV of those 2 is reused.
    accepted = drafts[0].token_ids[:2] + [11]
    states[0].extend(accepted)
    assert states[0].num_computed == len(prompts[0]) + 2
    [d] = backend.propose([DraftCall(states[0], 4, SamplingParams())])
    assert d.token_ids == hf_greedy(reference, prompts[0] + accepted, 4, ignore_eos=True)
    for s in states:
        backend.release(s)
    assert backend.allocator.num_free == backend.allocator.num_blocks


def test_sampled_drafts_return_their_exact_truncated_distribution(small_vocab_dir):
    backend = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, top_k_cap=5)
    state = backend.new_state()
    state.extend([3, 4, 5])
    [d] = backend.propose([DraftCall(state, 3, SamplingParams(temperature=0.8, top_p=0.9, seed=1))])
    assert len(d.token_ids) == len(d.probs) == 3
    for token, (support, probs) in zip(d.token_ids, d.probs):
        assert token in support and len(support) <= 5
        assert abs(sum(probs) - 1) < 1e-5 and min(probs) > 0


def test_a_draft_stops_after_a_token_below_the_confidence_floor(small_vocab_dir):
    reference = load_model(small_vocab_dir)
    prompt, k = [3, 4, 5, 6], 6
    chain = hf_greedy(reference, prompt, k, ignore_eos=True)
    with torch.no_grad():  # the draft model's probability of each token of its greedy chain
        logits = reference(torch.tensor([prompt + chain])).logits[0, len(prompt) - 1 : -1]
    confidence = torch.softmax(logits.float(), -1).max(-1).values.tolist()
    low, high = sorted(confidence)[k // 2 - 1 : k // 2 + 1]
    assert high - low > 1e-3  # a floor between them is not a near-tie
    floor = (low + high) / 2
    stop = next(j for j, c in enumerate(confidence) if c < floor)
    backend = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, min_confidence=floor)
    state = backend.new_state()
    state.extend(prompt)
    [d] = backend.propose([DraftCall(state, k, SamplingParams())])
    assert d.token_ids == chain[: stop + 1]  # the low-confidence token is drafted, then the draft stops
    assert d.stopped_early == (stop + 1 < k)
    assert stop + 1 < k  # the floor is the median: some token after the stop was above it

    never = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, min_confidence=1.0)
    state = never.new_state()
    state.extend(prompt)
    [d] = never.propose([DraftCall(state, k, SamplingParams(temperature=1.5, seed=2))])
    assert len(d.token_ids) == len(d.probs) == 1 and max(d.probs[0][1]) < 1.0  # sampled drafts stop the same way
    assert d.stopped_early
    [d] = never.propose([DraftCall(state, 1, SamplingParams(temperature=1.5, seed=2))])
    assert len(d.token_ids) == 1 and not d.stopped_early  # k reached: not a stop
    with pytest.raises(ValueError, match="min_confidence"):
        DraftModelBackend(reference, kv_cache_tokens=512, min_confidence=1.5)


def test_the_confidence_and_batch_flags_are_checked_before_any_model_loads():
    from drafting.config import DraftConfig

    for flag in ("max_batch", "top_k_cap", "max_model_len"):
        with pytest.raises(ValueError, match=f"{flag} must be at least 1"):
            DraftConfig(draft="/no/such/model", **{flag: 0}).make_backend()
    with pytest.raises(ValueError, match=r"min_confidence must be in \[0, 1\]"):
        DraftConfig(draft="/no/such/model", min_confidence=1.5).make_backend()
    with pytest.raises(ValueError, match="n-gram drafts have no confidence"):
        DraftConfig(min_confidence=0.4).make_backend()


def generate_greedy(verifier, prompt: list[int], max_new_tokens: int):
    """Greedy tokens from the verifier service and the final chunk's speculation stats."""
    chunks = list(
        verifier.stub.Generate(
            pb.GenerateRequest(
                prompt_token_ids=pb.TokenIds(ids=prompt), max_new_tokens=max_new_tokens, ignore_eos=True
            ),
            timeout=60,
        )
    )
    return [t for c in chunks for t in c.token_ids], chunks[-1].speculation


def test_identical_draft_is_always_accepted_through_the_services(small_vocab_dir, smollm2_tokenizer):
    target, reference = load_model(small_vocab_dir), load_model(small_vocab_dir)
    proposer = ProposerThread(backend=DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=2048))
    verifier = VerifierThread(target, smollm2_tokenizer, [proposer.address], policy="fixed:3")
    try:
        prompt = [3, 4, 5, 6, 7]
        tokens, stats = generate_greedy(verifier, prompt, 33)
        assert_same_greedy(reference, prompt, tokens, hf_greedy(reference, prompt, 33, ignore_eos=True))
        assert stats.accepted_tokens == stats.proposed_tokens > 0
        assert stats.mean_accepted_length == pytest.approx(4.0)  # k + 1 every speculative step
    finally:
        verifier.close()
        proposer.kill()


def test_an_in_process_draft_model_serves_through_the_verifier(small_vocab_dir, smollm2_tokenizer):
    """`--proposer draft:MODEL`: the draft runs off the event loop, next to the target."""
    target, reference = load_model(small_vocab_dir), load_model(small_vocab_dir)
    verifier = VerifierThread(target, smollm2_tokenizer, [f"draft:{small_vocab_dir}"], policy="fixed:3")
    try:
        prompt = [3, 4, 5, 6, 7]
        tokens, stats = generate_greedy(verifier, prompt, 25)
        assert_same_greedy(reference, prompt, tokens, hf_greedy(reference, prompt, 25, ignore_eos=True))
        assert stats.accepted_tokens == stats.proposed_tokens > 0
    finally:
        verifier.close()


@pytest.mark.parametrize("min_confidence, head", [(0.0, None), (0.2, None), (0.0, [0, 1, 3, 4, 6, 8, 9, 10])])
def test_sampling_with_a_noisy_draft_follows_the_target(
    small_vocab_dir, smollm2_tokenizer, tmp_path, min_confidence, head
):
    """Lossless sampling, also when drafts stop early at the draft's own low-confidence tokens, and
    when the draft's head vocabulary leaves out tokens the target writes (its q is 0 there)."""
    draft_dir = noisy_copy(small_vocab_dir, tmp_path / "noisy", scale=0.5, seed=3)
    target, reference = load_model(small_vocab_dir), load_model(small_vocab_dir)
    backend = DraftModelBackend(
        load_model(draft_dir), kv_cache_tokens=8192, min_confidence=min_confidence, head_vocab=head
    )
    lengths = collections.Counter()  # drafted tokens per request per call
    stops = collections.Counter()  # the same, for drafts the confidence stop ended
    drafted = set()
    propose = backend.propose

    def recording(calls):
        drafts = propose(calls)
        lengths.update(len(d.token_ids) for d in drafts)
        stops.update(len(d.token_ids) for d in drafts if d.stopped_early)
        drafted.update(t for d in drafts for t in d.token_ids)
        return drafts

    backend.propose = recording
    proposer = ProposerThread(backend=backend)
    verifier = VerifierThread(
        target, smollm2_tokenizer, [proposer.address], policy="fixed:2", max_num_seqs=128, kv_cache_tokens=8192
    )
    prompt, steps, n = [3, 4, 5, 6], 4, 2000
    counts = [torch.zeros(12, dtype=torch.float64) for _ in range(steps)]
    proposed = accepted = 0
    try:
        for start in range(0, n, 100):
            streams = [
                verifier.stub.Generate(
                    pb.GenerateRequest(
                        prompt_token_ids=pb.TokenIds(ids=prompt),
                        max_new_tokens=steps,
                        ignore_eos=True,
                        sampling=pb.SamplingParams(temperature=1.0, seed=start + i),
                    ),
                    timeout=60,
                )
                for i in range(100)
            ]
            for s in streams:
                chunks = list(s)
                for t, y in enumerate(t for c in chunks for t in c.token_ids):
                    counts[t][y] += 1
                proposed += chunks[-1].speculation.proposed_tokens
                accepted += chunks[-1].speculation.accepted_tokens
    finally:
        verifier.close()
        proposer.kill()
    assert proposed > 500 and 0.05 < accepted / proposed < 0.95  # the noise gives partial acceptance
    # Each request gets one call at k = 2 (the others are capped by the tokens left): the
    # confidence stop must have cut some of them short and let others run to k.
    assert lengths[2] == n if not min_confidence else 100 < lengths[2] < n - 100
    assert stops == ({1: n - lengths[2]} if min_confidence else {})  # each k = 2 call short of 2 was a stop
    marginals = exact_marginals(reference, prompt, steps, 12)
    if head is not None:
        left_out = [t for t in range(12) if t not in head]
        assert drafted <= set(head)
        assert all(float(m[left_out].sum()) > 0.05 for m in marginals)  # the target does write them
    for t, marginal in enumerate(marginals):
        assert chi_square_p(counts[t], marginal) > 0.01, (t, counts[t].tolist(), marginal.tolist())


def test_a_draft_proposer_runs_on_the_threads_it_is_given(small_vocab_dir):
    """The thread count is set where the model work runs: the process's model thread."""
    from drafting.config import DraftConfig
    from runtime import model_thread
    from runtime.models import Placement

    before = model_thread.call(torch.get_num_threads)
    model_thread.call(torch.set_num_threads, 2)
    try:
        backend = DraftConfig(draft=small_vocab_dir).make_backend(Placement(threads=1))
        assert isinstance(backend, DraftModelBackend)
        assert model_thread.call(torch.get_num_threads) == 1
    finally:
        model_thread.call(torch.set_num_threads, before)


def test_a_paged_kernel_the_drafts_blocks_do_not_suit_falls_back_to_the_automatic_choice(small_vocab_dir, caplog):
    """A kernel named for the target (say at --block-size 256) may refuse the draft's own 16-token
    blocks (here: no CUDA at all); the draft then chooses as with auto instead of failing to start.
    A name that is no attention at all still fails."""
    backend = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, attention="triton")
    assert backend.runner.paged is None and "draft attention" in caplog.text
    with pytest.raises(ValueError, match="attention must be one of"):
        DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, attention="paged")


def test_a_draft_warmed_up_to_its_batch_bound_drafts_through_graphs_with_no_compile(small_vocab_dir, compiles):
    """`max_batch`: the draft's graphs (compiled here, what a GPU captures) for sub-batches up to
    it are made when the backend starts, so drafting compiles nothing, and drafts as eagerly."""
    reference = load_model(small_vocab_dir)
    backend = DraftModelBackend(
        load_model(small_vocab_dir), kv_cache_tokens=512, block_size=128, graphs="compile", max_batch=3
    )
    warmed = len(compiles)
    assert warmed >= 2, "the backend started without compiling its buckets"
    states = [backend.new_state() for _ in range(3)]
    prompts = [[3, 4, 5, 6], [7, 7, 2], [9, 3, 3, 3, 10, 11]]
    for s, p in zip(states, prompts):
        s.extend(p)
    ks = [3, 1, 5]
    drafts = backend.propose([DraftCall(s, k, SamplingParams()) for s, k in zip(states, ks)])
    states[2].extend(drafts[2].token_ids[:3] + [4])
    [again] = backend.propose([DraftCall(states[2], 4, SamplingParams())])
    assert backend.runner.graphs.steps >= 6  # the feeds and the lockstep steps
    assert len(compiles) == warmed, "drafting compiled"
    for d, p, k in zip(drafts, prompts, ks):
        assert d.token_ids == hf_greedy(reference, p, k, ignore_eos=True)
    assert again.token_ids == hf_greedy(reference, prompts[2] + drafts[2].token_ids[:3] + [4], 4, ignore_eos=True)


def test_a_mixed_sub_batch_drafts_what_each_request_drafts_alone(small_vocab_dir):
    """Greedy and sampled requests are picked together (their rows processed at once, copied to
    the host once per kind): each still drafts exactly what it drafts in a call of its own, its
    confidence stop included."""
    prompts = [[3, 4, 5, 6], [7, 7, 2], [9, 3, 3, 3, 10, 11], [5, 5], [8, 1, 2]]
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.9, seed=3),
        SamplingParams(),
        SamplingParams(temperature=1.2, top_k=4, top_p=0.9, seed=8),
        SamplingParams(),
    ]
    ks = [3, 4, 2, 5, 5]

    def drafts(backend, which: list[int]):
        states = [backend.new_state() for _ in which]
        for s, i in zip(states, which):
            s.extend(prompts[i])
        return backend.propose([DraftCall(s, ks[i], params[i]) for s, i in zip(states, which)])

    together = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, min_confidence=0.3)
    alone = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512, min_confidence=0.3)
    batched = drafts(together, list(range(len(prompts))))
    for i, got in enumerate(batched):
        [want] = drafts(alone, [i])
        assert got.token_ids == want.token_ids and got.stopped_early == want.stopped_early, i
        if want.probs is None:
            assert got.probs is None
        else:
            assert [t for t, _ in got.probs] == [t for t, _ in want.probs]
            assert [p for _, p in got.probs] == [pytest.approx(p) for _, p in want.probs]
    greedy_stops = [d.stopped_early for d, p in zip(batched, params) if p.greedy]
    assert any(greedy_stops) and not all(greedy_stops)  # the confidence stop decided something


def test_a_sampled_draft_token_follows_the_distribution_it_returns(small_vocab_dir):
    """Each request draws from its own generator, by inverse CDF over the columns it keeps: over
    many seeds the first drafted token's frequencies match the distribution returned with it
    (the proposal the verifier's rejection sampling divides by)."""
    backend = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=4096, top_k_cap=6)
    counts, q = torch.zeros(12), None
    for batch in range(20):  # 64 requests a call, their rows sampled together
        states = [backend.new_state() for _ in range(64)]
        for s in states:
            s.extend([3, 4, 5])
        calls = [DraftCall(s, 1, SamplingParams(temperature=1.3, seed=batch * 64 + i)) for i, s in enumerate(states)]
        for d in backend.propose(calls):
            support, probs = d.probs[0]
            got = torch.zeros(12).index_put_((torch.tensor(support),), torch.tensor(probs, dtype=torch.float32))
            assert q is None or torch.allclose(got, q, atol=1e-6)
            q = got
            counts[d.token_ids[0]] += 1
        for s in states:
            backend.release(s)
    assert (q > 0).sum() == 6 and abs(float(q.sum()) - 1) < 1e-5
    assert chi_square_p(counts[q > 0], q[q > 0]) > 0.01, (counts.tolist(), q.tolist())
    assert counts[q == 0].sum() == 0


def test_a_request_whose_draft_logits_are_not_finite_drafts_nothing_and_recovers(small_vocab_dir):
    """A request whose draft KV went NaN (a draft model overflowing in half precision) drafts
    nothing that step while the others in the call draft as usual; its blocks are zeroed and its
    context recomputed, so its next call drafts normally again."""
    reference = load_model(small_vocab_dir)
    backend = DraftModelBackend(load_model(small_vocab_dir), kv_cache_tokens=512)
    prompts = [[3, 4, 5, 6], [7, 7, 2], [9, 3, 3, 3, 10, 11]]
    params = [SamplingParams(), SamplingParams(temperature=0.9, seed=1), SamplingParams(temperature=0.9, seed=2)]
    states = [backend.new_state() for _ in prompts]
    for s, p in zip(states, prompts):
        s.extend(p)
    backend.propose([DraftCall(s, 1, p) for s, p in zip(states, params)])  # contexts cached
    for s in states:
        s.extend([8])  # the verifier's token
    bad = states[1]
    for layer in range(len(backend.runner.kv.k)):
        backend.runner.kv.k[layer][bad.block_table] = float("nan")
    drafts = backend.propose([DraftCall(s, 3, p) for s, p in zip(states, params)])
    assert drafts[1].token_ids == [] and drafts[1].probs == []
    assert drafts[0].token_ids == hf_greedy(reference, prompts[0] + [8], 3, ignore_eos=True)
    assert len(drafts[2].token_ids) == 3 and all(abs(sum(q) - 1) < 1e-5 for _, q in drafts[2].probs)
    assert bad.num_computed == 0 and not backend.runner.kv.k[0][bad.block_table].any()
    [again] = backend.propose([DraftCall(bad, 3, SamplingParams())])
    assert again.token_ids == hf_greedy(reference, prompts[1] + [8], 3, ignore_eos=True)
