"""Engine greedy output equals Hugging Face `generate`, under batching, chunked prefill and preemption."""

from __future__ import annotations

import pytest

from greedy_reference import PROMPTS, assert_same_greedy, hf_greedy
from smartspec.models import load_model
from verifier_svc.engine import Engine, EngineConfig, FinishReason
from verifier_svc.sampler import SamplingParams



def run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, int]:
    """Runs requests to completion: (tokens per request id, preemptions seen)."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    preempted = 0
    while engine.has_work():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
        preempted += engine.last_stats.num_preempted
    return out, preempted


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, smollm2_tokenizer):
    return load_model(tiny_llama_dir), load_model(tiny_llama_dir), smollm2_tokenizer


@pytest.mark.parametrize("config", [
    EngineConfig(kv_cache_tokens=4096),
    EngineConfig(kv_cache_tokens=4096, max_batched_tokens=7),  # prompts prefill in chunks
    EngineConfig(kv_cache_tokens=160, block_size=4, max_batched_tokens=64),  # forces preemption
], ids=["batched", "chunked-prefill", "preemption"])
def test_tiny_llama_matches_hf_generate(tiny, config):
    model, reference, tok = tiny
    engine = Engine(model, tok, config)
    prompts = [tok(p).input_ids for p in PROMPTS]
    out, preempted = run_all(engine, prompts, SamplingParams(max_new_tokens=24))
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 24))
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert (preempted > 0) == (config.kv_cache_tokens == 160)


@pytest.mark.slow
def test_smollm2_matches_hf_generate(smollm2_pair, smollm2_tokenizer):
    model, reference = smollm2_pair
    engine = Engine(model, smollm2_tokenizer, EngineConfig(kv_cache_tokens=8192))
    prompts = [smollm2_tokenizer(p).input_ids for p in PROMPTS]
    out, _ = run_all(engine, prompts, SamplingParams(max_new_tokens=32))
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 32))
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_stop_string_and_max_new_tokens(tiny):
    model, _, tok = tiny
    engine = Engine(model, tok, EngineConfig(kv_cache_tokens=1024))
    ids = tok(PROMPTS[0]).input_ids
    free_run = run_all(engine, [ids], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]["0"]
    text = tok.decode(free_run, skip_special_tokens=True)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    engine.add_request("s", ids, SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))
    chunks = []
    while engine.has_work():
        chunks.extend(engine.step())
    assert chunks[-1].finish_reason == FinishReason.STOP and chunks[-1].matched_stop == stop
    streamed = "".join(c.text for c in chunks)
    assert streamed == text[: text.index(stop)]
    assert len(free_run) == 12


def test_calibration_times_every_shape_it_can_hold_and_frees_its_blocks(tiny):
    from verifier_svc.engine import CALIBRATION_SHAPES

    model, _, tok = tiny
    engine = Engine(model, tok, EngineConfig(kv_cache_tokens=4096))
    rows = engine.calibrate()
    assert [(r["B"], r["q"]) for r in rows] == list(CALIBRATION_SHAPES)
    assert all(r["ms"] > 0 and r["ctx"] == 128 for r in rows)
    assert engine.allocator.num_free == engine.allocator.num_blocks
    small = Engine(model, tok, EngineConfig(kv_cache_tokens=512))  # 4 x 136 tokens do not fit
    assert {r["B"] for r in small.calibrate()} == {1}
