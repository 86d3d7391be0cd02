"""Faults stay as small as they can be attributed: one request's bad logits or bad output end
that request alone; a failing forward ends its step's requests; the engine goes on; a run of
failed steps is counted for the server to give up on."""

from __future__ import annotations

import asyncio

import pytest
import torch
from engine_steps import run_until_done, step
from greedy_reference import assert_same_greedy, hf_greedy

from engine.config import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.output import FinishReason
from runtime.models import load_model
from runtime.rejection import NOT_FINITE
from runtime.sampler import SamplingParams
from verifier_svc.loop import EngineFailed, ServingLoop

PARAMS = SamplingParams(max_new_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def model(tiny_llama_dir):
    return load_model(tiny_llama_dir)


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    """A second instance for Hugging Face's own greedy decoding (the engine's runs paged attention)."""
    return load_model(tiny_llama_dir)


def same(reference, prompt: list[int], ours: list[int], n: int) -> None:
    assert len(ours) == n
    assert_same_greedy(reference, prompt, ours, hf_greedy(reference, prompt, n, ignore_eos=True))


def engine(model, tok) -> Engine:
    return Engine(model, tok, EngineConfig(CacheConfig(kv_cache_tokens=2048)))


def test_a_request_with_nan_logits_fails_alone_and_the_batch_goes_on(model, reference, smollm2_tokenizer):
    e = engine(model, smollm2_tokenizer)
    prompts = {"a": [5, 6, 7, 8], "bad": [9, 10, 11], "c": [12, 13, 14, 15, 16]}
    for request_id, ids in prompts.items():
        e.add_request(request_id, ids, PARAMS)
    sample = e.executor.sample

    def poisoned(sched, logits):
        logits = logits.clone()  # the forward's output is an inference tensor
        row = 0
        for it in sched.items:
            if it.sample:
                if it.seq.request_id == "bad" and len(it.seq.output_ids) == 2:
                    logits[row, 7] = float("nan")
                row += 1
        return sample(sched, logits)

    e.executor.sample = poisoned
    failed, out = [], {}
    while e.has_work():
        for o in step(e):
            if o.finish_reason == FinishReason.ERROR:
                failed.append((o.request_id, o.error))
            else:
                out.setdefault(o.request_id, []).extend(o.token_ids)
    assert failed == [("bad", NOT_FINITE)]
    same(reference, prompts["bad"], out["bad"], 2)  # what it had before
    for request_id in ("a", "c"):
        same(reference, prompts[request_id], out[request_id], 6)
    assert e.allocator.num_free == e.allocator.num_blocks and e.consecutive_failures == 0


def test_a_failing_forward_ends_its_steps_requests_and_the_next_ones_are_served(model, reference, smollm2_tokenizer):
    e = engine(model, smollm2_tokenizer)
    e.add_request("x", [5, 6, 7], PARAMS)
    forward = e.runner.forward
    e.runner.forward = lambda items: (_ for _ in ()).throw(RuntimeError("device lost"))
    [out] = step(e)
    assert out.finish_reason == FinishReason.ERROR and "device lost" in out.error
    assert e.consecutive_failures == 1 and not e.has_work()
    e.runner.forward = forward
    e.add_request("y", [5, 6, 7], PARAMS)
    same(reference, [5, 6, 7], run_until_done(e)[0]["y"], 6)
    assert e.consecutive_failures == 0  # one good step resets the count


def test_a_request_whose_own_output_fails_ends_alone(model, reference, smollm2_tokenizer):
    e = engine(model, smollm2_tokenizer)
    e.add_request("a", [5, 6, 7], PARAMS)
    e.add_request("b", [8, 9, 10], PARAMS)
    emit = e._emit

    def broken(seq, tokens):
        if seq.request_id == "b" and len(seq.output_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a broken detokenizer")
        return emit(seq, tokens)

    e._emit = broken
    errors = []
    out = {}
    while e.has_work():
        for o in step(e):
            if o.finish_reason == FinishReason.ERROR:
                errors.append(o.request_id)
            out.setdefault(o.request_id, []).extend(o.token_ids)
    assert errors == ["b"]
    same(reference, [5, 6, 7], out["a"], 6)
    assert e.allocator.num_free == e.allocator.num_blocks


def test_a_failing_schedule_skips_the_step_and_is_counted(model, reference, smollm2_tokenizer):
    e = engine(model, smollm2_tokenizer)
    e.add_request("a", [5, 6, 7], PARAMS)
    schedule = e.scheduler.schedule
    e.scheduler.schedule = lambda: (_ for _ in ()).throw(KeyError("corrupt state"))
    assert step(e) == [] and step(e) == [] and e.consecutive_failures == 2
    e.scheduler.schedule = schedule
    same(reference, [5, 6, 7], run_until_done(e)[0]["a"], 6)


def test_a_tiny_temperature_decodes_greedily_instead_of_overflowing(model, reference, smollm2_tokenizer):
    e = engine(model, smollm2_tokenizer)
    e.add_request("t", [5, 6, 7], SamplingParams(temperature=1e-40, max_new_tokens=6, ignore_eos=True, seed=1))
    same(reference, [5, 6, 7], run_until_done(e)[0]["t"], 6)


def test_the_serving_loop_gives_up_after_a_run_of_failed_steps(model, smollm2_tokenizer):
    async def scenario():
        e = engine(model, smollm2_tokenizer)
        e.runner.forward = lambda items: (_ for _ in ()).throw(RuntimeError("device lost"))
        loop = ServingLoop(e, max_failed_steps=3)
        loop.start()
        for i in range(3):  # each request's step fails; the third failure in a row ends the loop
            queue = loop.submit(f"r{i}", [5, 6, 7], PARAMS)
            out = await asyncio.wait_for(queue.get(), 10)
            assert out.finish_reason == FinishReason.ERROR
        await asyncio.wait_for(loop.failed.wait(), 10)
        with pytest.raises(EngineFailed):
            await loop._task

    asyncio.run(scenario())


def test_verify_zeroes_only_the_bad_rows():
    from runtime.rejection import SampleRequest, verify

    logits = torch.zeros(3, 5)
    logits[0, 2] = 1.0
    logits[1, 3] = float("inf")
    logits[2, 4] = 1.0
    logits[2, 0] = float("-inf")  # a masked token is fine
    greedy = SamplingParams()
    results = verify(logits, [SampleRequest(greedy), SampleRequest(greedy), SampleRequest(greedy)])
    assert [(r.token_ids, r.error) for r in results] == [([2], ""), ([], NOT_FINITE), ([4], "")]


def test_kv_a_request_left_not_finite_is_cleared_before_its_blocks_serve_another(model, reference, smollm2_tokenizer):
    """A request whose KV went NaN (as a model overflowing in half precision leaves it) fails
    alone, and the next request to get its blocks is not poisoned by the stale slots it has
    not written yet: attention gives them weight 0, but 0 x NaN is NaN."""
    from runtime import model_thread

    e = engine(model, smollm2_tokenizer)
    e.add_request("bad", [5, 6, 7, 8, 9], PARAMS)
    step(e)  # prefill: the request now holds its blocks

    def poison(blocks):
        for layer in range(len(e.runner.kv.k)):
            e.runner.kv.k[layer][blocks] = float("nan")
            e.runner.kv.v[layer][blocks] = float("nan")

    blocks = list(e._seqs["bad"].block_table)
    model_thread.call(poison, blocks)
    failed = [o.request_id for o in step(e) if o.finish_reason == FinishReason.ERROR]
    assert failed == ["bad"] and e.allocator.num_free == e.allocator.num_blocks
    prompt = [12, 13, 14]
    e.add_request("next", prompt, PARAMS)
    out, _ = run_until_done(e)
    assert set(out) == {"next"} and e._seqs == {}
    same(reference, prompt, out["next"], 6)
