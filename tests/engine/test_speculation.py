"""Speculative decoding in the engine is lossless: greedy equals the target's own
greedy output, and sampled output follows the target's distribution."""

from __future__ import annotations

import pytest
import torch
from distributions import chi_square_p, exact_marginals
from engine_steps import run_until_done, step
from greedy_reference import PROMPTS, assert_same_greedy, hf_greedy

from controller.policy import MAX_K, Mode, Policy
from drafting.local import LocalProposer
from drafting.ngram import NgramBackend
from engine.config import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.scheduler import SchedulerConfig
from runtime.draft import Draft, Proposal
from runtime.models import load_model
from runtime.sampler import SamplingParams

REPETITIVE = [  # prompt lookup finds matches in these
    "a b c d a b c d a b c d a b",
    "def f(x):\n    return x\n\ndef g(x):\n    return x\n\ndef h(x):\n",
]


def run(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[str, list[int]]:
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    return run_until_done(engine)[0]


def config(kv_cache_tokens: int, policy: Policy = Policy(), **scheduler) -> EngineConfig:
    return EngineConfig(CacheConfig(kv_cache_tokens=kv_cache_tokens), SchedulerConfig(**scheduler), policy)


class ScriptedProposer:
    """Returns the given drafts, one per call, whatever was asked: a proposer with a bug."""

    def __init__(self, drafts: list[Draft]):
        self.drafts = list(drafts)

    async def propose(self, requests) -> Proposal:
        return Proposal([self.drafts.pop(0)])

    def release(self, request_ids) -> None:
        pass


@pytest.fixture(scope="module")
def small_vocab(small_vocab_dir, smollm2_tokenizer):
    return load_model(small_vocab_dir), load_model(small_vocab_dir), smollm2_tokenizer


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, smollm2_tokenizer):
    return load_model(tiny_llama_dir), load_model(tiny_llama_dir), smollm2_tokenizer


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_with_ngram_drafts_equals_target_greedy(tiny, k):
    model, reference, tok = tiny
    engine = Engine(model, tok, config(4096, Policy.fixed(k)), LocalProposer(NgramBackend()))
    prompts = [tok(p).input_ids for p in PROMPTS + REPETITIVE]
    out = run(engine, prompts, SamplingParams(max_new_tokens=24))
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 24))
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert not len(engine.proposer)  # released as requests finished


def test_speculation_stats_and_per_request_override(small_vocab):
    """Over 12 tokens greedy output soon repeats, so prompt lookup drafts and gets accepted."""
    model, _, tok = small_vocab
    engine = Engine(model, tok, config(4096, Policy.fixed(3)), LocalProposer(NgramBackend()))
    ids = [3, 4, 5, 3, 4, 5, 3, 4]
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    on = engine.add_request("on", ids, params, trace=True)
    off = engine.add_request("off", ids, params, Policy(), trace=True)
    fixed = engine.add_request("fixed", ids, params, Policy(Mode.FIXED, 1))
    records = run_until_done(engine)[1]
    proposed_per_step = [p for r in records for _, p, _ in r.drafts]
    assert off.num_proposed == 0 and on.num_proposed > 0
    assert max(proposed_per_step) <= 3 and fixed.num_proposed <= fixed.num_spec_steps
    assert on.output_ids == off.output_ids == fixed.output_ids  # greedy: speculation changes nothing
    assert 0 < on.num_accepted <= on.num_proposed
    assert len(on.output_ids) == 20
    # The trace: one round per step that planned drafts, adding up to the request's totals.
    assert off.rounds == [] and fixed.rounds is None
    assert all(a <= p <= k <= 3 for k, p, a in on.rounds)
    assert sum(p for _, p, _ in on.rounds) == on.num_proposed and sum(a for *_, a in on.rounds) == on.num_accepted
    assert sum(1 for _, p, _ in on.rounds if p) == on.num_spec_steps
    mine = [(p, a) for r in records for rid, p, a in r.drafts if rid == "on"]
    assert mine == [(p, a) for _, p, a in on.rounds if p]


def test_sampled_output_with_speculation_follows_the_target(small_vocab):
    model, reference, tok = small_vocab
    engine = Engine(
        model, tok, config(8192, Policy.fixed(3), max_num_seqs=256), LocalProposer(NgramBackend(n_min=1, n_max=2))
    )
    prompt = [3, 4, 5, 3, 4, 5, 3, 4]  # lookup keeps proposing 5, 3, 4, ...
    steps, n = 4, 2400
    counts = [torch.zeros(12, dtype=torch.float64) for _ in range(steps)]
    proposed = accepted = 0
    for batch in range(n // 240):
        seqs = [
            engine.add_request(
                f"{batch}-{i}",
                prompt,
                SamplingParams(temperature=1.0, seed=batch * 1000 + i, max_new_tokens=steps, ignore_eos=True),
            )
            for i in range(240)
        ]
        run_until_done(engine)
        for s in seqs:
            for t, y in enumerate(s.output_ids):
                counts[t][y] += 1
            proposed += s.num_proposed
            accepted += s.num_accepted
    assert proposed > 500 and 0 < accepted < proposed  # drafts were tested, some rejected
    for t, marginal in enumerate(exact_marginals(reference, prompt, steps, 12)):
        assert chi_square_p(counts[t], marginal) > 0.01, (t, counts[t].tolist(), marginal.tolist())


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 5])
def test_smollm2_greedy_with_ngram_drafts(smollm2_pair, smollm2_tokenizer, k):
    model, reference = smollm2_pair
    tok = smollm2_tokenizer
    engine = Engine(model, tok, config(8192, Policy.fixed(k)), LocalProposer(NgramBackend()))
    prompts = [tok(p).input_ids for p in PROMPTS[:6] + REPETITIVE]
    out = run(engine, prompts, SamplingParams(max_new_tokens=24))
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 24))


def test_malformed_drafts_are_dropped_not_fed_to_the_target(small_vocab):
    model, _, tok = small_vocab
    bad = [
        Draft([5, 99]),  # outside the vocabulary
        Draft([5], [([5, 3], [1.0])]),  # ids and probabilities of different lengths
        Draft([5, 3], [([5], [1.0])]),  # one distribution for two tokens
        # A rogue proposer's probabilities: NaN, negative, more than 1 in all, a token it gave
        # no probability, a support outside the vocabulary.
        Draft([5], [([5, 3], [float("nan"), 0.1])]),
        Draft([5], [([5, 3], [1.2, -0.2])]),
        Draft([5], [([5, 3], [0.9, 0.9])]),
        Draft([5], [([3, 4], [0.5, 0.5])]),
        Draft([5], [([5, 3], [0.0, 1.0])]),
        Draft([5], [([5, 99], [0.5, 0.5])]),
    ]
    engine = Engine(model, tok, config(1024, Policy.fixed(2)), ScriptedProposer(bad))
    engine.add_request("x", [3, 4, 5, 3, 4], SamplingParams(max_new_tokens=16, ignore_eos=True))
    step(engine)  # prefill
    for _ in bad:
        [out] = step(engine)  # the step still runs, without drafts
        assert engine.last_step.planned_k == (2,) and engine.last_step.drafts == ()
        assert len(out.token_ids) == 1 and engine.last_step.num_batched_tokens == 1
    assert engine.get("x") is not None and len(engine.get("x").output_ids) == 1 + len(bad)


def test_a_short_ngram_draft_caps_the_next_ask_and_a_confidence_stop_does_not(small_vocab):
    model, _, tok = small_vocab
    drafts = [Draft([5]), Draft([5], stopped_early=True), Draft([5, 3, 4, 5])]
    engine = Engine(model, tok, config(1024, Policy.fixed(4)), ScriptedProposer(drafts))
    engine.add_request("x", [3, 4, 5, 3, 4], SamplingParams(max_new_tokens=8, ignore_eos=True))
    step(engine)  # prefill
    seq = engine.get("x")
    for cap in (2, MAX_K, MAX_K):
        step(engine)
        assert seq.draft_cap == cap  # what the smartspec planner may ask for next step


@pytest.mark.parametrize("policy", ["smartspec", "smartspec-uniform"])
def test_goodput_policies_are_lossless_and_learn_from_steps(tiny, policy):
    from controller.cost_model import TOKEN_KNOTS, CostParams
    from engine.planner import SpecPlanner

    model, reference, tok = tiny
    planner = SpecPlanner(Policy.parse(policy))
    # A flat verify cost makes speculation pay, so the planner drafts.
    planner.apply(planner.policy, CostParams(tuple(20.0 for _ in TOKEN_KNOTS), proposer_rtt_ms=0.1, num_steps=1000))
    engine = Engine(model, tok, config(4096), LocalProposer(NgramBackend()), planner)
    prompts = [tok(p).input_ids for p in PROMPTS + REPETITIVE]
    out = run(engine, prompts, SamplingParams(max_new_tokens=24))
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 24))
    assert planner.fitter.params.num_steps > 0  # the local fit saw every step
    assert planner.acceptance.prior_trials > planner.acceptance.prior_weight  # drafts were verified and counted
    assert len(planner.acceptance) == 0  # released as requests finished


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_an_in_process_draft_model_equals_target_greedy(tiny, tiny_llama_dir, k):
    from drafting.draft_model import DraftModelBackend

    model, reference, tok = tiny
    # The target as its own draft: every draft is accepted, so drafted KV is reused across steps.
    proposer = LocalProposer(DraftModelBackend(load_model(tiny_llama_dir), kv_cache_tokens=4096))
    engine = Engine(model, tok, config(4096, Policy.fixed(k)), proposer)
    prompts = [tok(p).input_ids for p in PROMPTS[:4]]
    seqs = [engine.add_request(str(i), ids, SamplingParams(max_new_tokens=16)) for i, ids in enumerate(prompts)]
    records = run_until_done(engine)[1]
    for seq, ids in zip(seqs, prompts):
        assert_same_greedy(reference, ids, seq.output_ids, hf_greedy(reference, ids, 16))
        assert seq.num_proposed > 0 and seq.num_accepted >= 0.9 * seq.num_proposed
    assert any(r.draft_ms > 0 for r in records)
    assert not len(proposer)  # released as requests finished, with the draft's KV blocks
    assert proposer.backend.allocator.num_free == proposer.backend.allocator.num_blocks


def test_the_verifier_flag_picks_the_in_process_proposer(tiny_llama_dir):
    from drafting.draft_model import DraftModelBackend
    from protocol.serving import from_options
    from verifier_svc.server import VerifierConfig

    def make_proposer(**options):
        config = from_options(VerifierConfig, kv_cache_tokens=1024, **options)
        speculation = config.speculation
        return speculation.make_proposer(config.placement, config.cache.kv_cache_tokens, limits=config.scheduler)

    draft = make_proposer(proposer=f"draft:{tiny_llama_dir}", draft_min_confidence=0.4, max_model_len=100)
    assert isinstance(draft, LocalProposer) and isinstance(draft.backend, DraftModelBackend)
    assert draft.backend.min_confidence == 0.4
    assert draft.backend.max_len == 100  # the verifier's longest request bounds the draft's (and its graphs)
    with pytest.raises(ValueError, match="draft_min_confidence needs --proposer draft:MODEL"):
        make_proposer(proposer="127.0.0.1:50061", draft_min_confidence=0.4)
    assert isinstance(make_proposer(proposer="ngram").backend, NgramBackend)
    with pytest.raises(ValueError, match="proposer: 'draft:' needs a model"):
        make_proposer(proposer="draft:")


def test_greedy_through_compiled_graphs_with_drafts_equals_target_greedy(small_vocab, smollm2_tokenizer, compiles):
    """The bucketed, compiled forward (`graphs="compile"`, what CUDA graphs capture) in the engine:
    every bucket compiled when the engine starts, then decode and verification steps padded to
    buckets with no compile, prefill eager, output unchanged."""
    model, reference, tok = small_vocab
    prompts = [[2, 3, 4, 5, 2, 3, 4, 5, 2, 3], [6, 7, 8, 6, 7, 8, 6]]
    # Tables of one block, 1-4 requests, 1-16 tokens: a compile for each 1 among them, and one symbolic.
    cache = CacheConfig(block_size=128, kv_cache_tokens=1024)
    cfg = EngineConfig(cache, SchedulerConfig(max_num_seqs=4), policy=Policy.fixed(3), graphs="compile")
    engine = Engine(model, tok, cfg, LocalProposer(NgramBackend()))
    warmed = len(compiles)
    assert warmed >= 2, "the engine started without compiling its buckets"
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    out = run(engine, prompts, params)
    assert engine.runner.graphs.steps >= 10  # decode and verification went through the compiled graphs
    assert len(compiles) == warmed, "a step compiled while serving"
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 16, ignore_eos=True))
