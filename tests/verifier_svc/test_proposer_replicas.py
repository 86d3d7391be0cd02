"""Speculation through real proposer services: spread over replicas, lossless, and never failing a
request when a replica dies or restarts."""

from __future__ import annotations

import random
import time

import pytest
from greedy_reference import assert_same_greedy, hf_greedy
from service_threads import ProposerThread as Proposer
from service_threads import VerifierThread

from protocol.v1 import generation_pb2 as pb
from runtime.models import load_model
from verifier_svc.proposer_client import rendezvous

NEW_TOKENS = 40


@pytest.fixture(scope="module")
def models(small_vocab_dir, smollm2_tokenizer):
    return load_model(small_vocab_dir), load_model(small_vocab_dir), smollm2_tokenizer


def _prompt(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 12) for _ in range(4 + seed % 5)]


PROMPTS = [_prompt(i) for i in range(8)]


def start_streams(stub, ids=None):
    ids = ids or [f"r{i}" for i in range(len(PROMPTS))]
    return [
        stub.Generate(
            pb.GenerateRequest(
                request_id=rid, prompt_token_ids=pb.TokenIds(ids=p), max_new_tokens=NEW_TOKENS, ignore_eos=True
            ),
            timeout=60,
        )
        for rid, p in zip(ids, PROMPTS)
    ]


def ids_spread_over(addresses: list[str]) -> list[str]:
    """Request ids that hash to every replica: the ports, and so the hashes, differ per run, and
    one run in 128 would send all of "r0".."r7" to one of two replicas."""
    for salt in range(100):
        ids = [f"r{i}-{salt}" for i in range(len(PROMPTS))]
        if len({rendezvous(rid, addresses) for rid in ids}) == len(addresses):
            return ids
    raise AssertionError("no request ids spread over the replicas")


def finish(streams, first_chunks=None) -> list[pb.GenerateResponse]:
    """Reads every stream to its end; returns (tokens per stream, final chunks)."""
    tokens, finals = [], []
    for i, s in enumerate(streams):
        chunks = (first_chunks[i] if first_chunks else []) + list(s)
        tokens.append([t for c in chunks for t in c.token_ids])
        finals.append(chunks[-1])
    return tokens, finals


def assert_lossless(reference, tokens):
    for prompt, ours in zip(PROMPTS, tokens):
        assert len(ours) == NEW_TOKENS
        assert_same_greedy(reference, prompt, ours, hf_greedy(reference, prompt, NEW_TOKENS, ignore_eos=True))


def test_requests_spread_over_replicas_and_stay_lossless(models):
    model, reference, tok = models
    a, b = Proposer(), Proposer()
    verifier = VerifierThread(model, tok, [a.address, b.address], policy="fixed:3")
    try:
        tokens, finals = finish(start_streams(verifier.stub, ids_spread_over([a.address, b.address])))
        assert_lossless(reference, tokens)
        assert a.server.servicer.num_items > 0 and b.server.servicer.num_items > 0
        assert sum(f.speculation.proposed_tokens for f in finals) > 0
        assert sum(f.speculation.accepted_tokens for f in finals) > 0
        # Steps whose requests went to both replicas: the fleet was busy for both drafting
        # times, the step waited for the slower one.
        steps = [s for s in verifier.verifier.loop.steps if s.draft_ms > 0]
        assert all(s.draft_busy_ms >= s.draft_ms for s in steps)
        assert any(s.draft_busy_ms > s.draft_ms for s in steps)
        client = verifier.verifier.engine.proposer
        deadline = time.monotonic() + 10  # an idle engine sends its releases without waiting for work
        while any(len(p.server.servicer.store) for p in (a, b)) and time.monotonic() < deadline:
            time.sleep(0.01)
        for p in (a, b):
            assert len(p.server.servicer.store) == 0
            assert not client.replicas[p.address].known and not client.replicas[p.address].released
    finally:
        verifier.close()
        a.kill()
        b.kill()


def test_a_replica_killed_mid_stream_costs_no_request(models):
    model, reference, tok = models
    replicas = {p.address: p for p in (Proposer(), Proposer())}
    verifier = VerifierThread(model, tok, list(replicas), policy="fixed:3")
    # The replica most requests hash to goes (the ports, and so the hashes, differ per run).
    pinned = {address: sum(rendezvous(f"r{i}", list(replicas)) == address for i in range(len(PROMPTS)))
              for address in replicas}  # fmt: skip
    gone = replicas.pop(max(pinned, key=pinned.get))
    [kept] = replicas.values()
    try:
        streams = start_streams(verifier.stub)
        first = [[next(s)] for s in streams]
        resyncs_before = kept.server.servicer.num_resyncs
        gone.kill()
        tokens, finals = finish(streams, first)
        assert all(f.finish_reason == pb.FINISH_REASON_LENGTH for f in finals)
        assert_lossless(reference, tokens)
        assert verifier.verifier.metrics.proposer_failures._value.get() >= 1  # a step went without its drafts
        assert kept.server.servicer.num_resyncs >= resyncs_before + 1  # its requests moved, with full context
    finally:
        verifier.close()
        kept.kill()


def test_a_restarted_proposer_is_resynced_without_client_errors(models, unused_tcp_port):
    model, reference, tok = models
    a = Proposer(unused_tcp_port)
    verifier = VerifierThread(model, tok, [a.address], policy="fixed:3")
    client = verifier.verifier.engine.proposer
    client.backoff_s = 0.05
    try:
        streams = start_streams(verifier.stub)
        first = [[next(s)] for s in streams]
        a.kill()
        a = Proposer(unused_tcp_port)  # same address, no state
        deadline = time.monotonic() + 10
        while a.server.servicer.num_resyncs == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        tokens, finals = finish(streams, first)
        assert all(f.finish_reason == pb.FINISH_REASON_LENGTH for f in finals)
        assert_lossless(reference, tokens)
        assert a.server.servicer.num_resyncs > 0 and a.server.servicer.num_items > a.server.servicer.num_resyncs
    finally:
        verifier.close()
        a.kill()
