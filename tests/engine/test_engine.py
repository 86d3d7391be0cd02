"""Engine greedy output equals Hugging Face `generate`, under batching, chunked prefill and preemption."""

from __future__ import annotations

import pytest
from engine_steps import run_until_done, step
from greedy_reference import PROMPTS, assert_same_greedy, hf_greedy

from engine.calibration import CALIBRATION_SHAPES, calibrate, calibration_shapes
from engine.config import CacheConfig, EngineConfig
from engine.engine import Engine
from engine.output import FinishReason
from engine.scheduler import SchedulerConfig
from runtime.models import load_model
from runtime.sampler import SamplingParams


def run_all(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> tuple[dict, int]:
    """Runs requests to completion: (tokens per request id, preemptions seen)."""
    for i, ids in enumerate(prompts):
        engine.add_request(str(i), ids, params)
    out, records = run_until_done(engine)
    return out, sum(r.num_preempted for r in records)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, smollm2_tokenizer):
    return load_model(tiny_llama_dir), load_model(tiny_llama_dir), smollm2_tokenizer


@pytest.mark.parametrize(
    "config",
    [
        EngineConfig(CacheConfig(kv_cache_tokens=4096)),
        EngineConfig(CacheConfig(kv_cache_tokens=4096), SchedulerConfig(max_batched_tokens=7)),  # prefill in chunks
        EngineConfig(
            CacheConfig(kv_cache_tokens=160, block_size=4), SchedulerConfig(max_batched_tokens=64)
        ),  # preempts
    ],
    ids=["batched", "chunked-prefill", "preemption"],
)
def test_tiny_llama_matches_hf_generate(tiny, config):
    model, reference, tok = tiny
    engine = Engine(model, tok, config)
    prompts = [tok(p).input_ids for p in PROMPTS]
    out, preempted = run_all(engine, prompts, SamplingParams(max_new_tokens=24))
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 24))
    assert engine.allocator.num_free == engine.allocator.num_blocks
    assert (preempted > 0) == (config.cache.kv_cache_tokens == 160)


@pytest.mark.slow
def test_smollm2_matches_hf_generate(smollm2_pair, smollm2_tokenizer):
    model, reference = smollm2_pair
    engine = Engine(model, smollm2_tokenizer, EngineConfig(CacheConfig(kv_cache_tokens=8192)))
    prompts = [smollm2_tokenizer(p).input_ids for p in PROMPTS]
    out, _ = run_all(engine, prompts, SamplingParams(max_new_tokens=32))
    for i, ids in enumerate(prompts):
        assert_same_greedy(reference, ids, out[str(i)], hf_greedy(reference, ids, 32))
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_stop_string_and_max_new_tokens(tiny):
    model, _, tok = tiny
    engine = Engine(model, tok, EngineConfig(CacheConfig(kv_cache_tokens=1024)))
    ids = tok(PROMPTS[0]).input_ids
    free_run = run_all(engine, [ids], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]["0"]
    text = tok.decode(free_run, skip_special_tokens=True)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    engine.add_request("s", ids, SamplingParams(max_new_tokens=12, ignore_eos=True, stop=(stop,)))
    chunks = []
    while engine.has_work():
        chunks.extend(step(engine))
    assert chunks[-1].finish_reason == FinishReason.STOP and chunks[-1].matched_stop == stop
    streamed = "".join(c.text for c in chunks)
    assert streamed == text[: text.index(stop)]
    assert len(free_run) == 12


def test_calibration_times_every_shape_it_can_hold_and_frees_its_blocks(tiny):
    model, _, tok = tiny
    engine = Engine(model, tok, EngineConfig(CacheConfig(kv_cache_tokens=4096)))
    rows = calibrate(engine)
    assert [(r["B"], r["q"]) for r in rows] == calibration_shapes(model)
    assert set(CALIBRATION_SHAPES) <= set(calibration_shapes(model))
    assert all(r["ms"] > 0 and r["ctx"] == 128 for r in rows)
    assert engine.allocator.num_free == engine.allocator.num_blocks
    small = Engine(model, tok, EngineConfig(CacheConfig(kv_cache_tokens=512)))  # 4 x 136 tokens do not fit
    assert {r["B"] for r in calibrate(small)} == {1}


def test_calibration_adds_the_row_counts_where_the_linear_products_change(tiny):
    from runtime.cpu_linear import MAX_ROWS, CpuLinear

    model = tiny[0]
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    saved = [m.plan for m in layers]
    try:
        for m in layers:
            m.plan = ("transposed",) * 7 + ("linear",) * (MAX_ROWS - 6)  # changes between 6 and 7 rows
        shapes = calibration_shapes(model)
        assert (1, 6) in shapes and (1, 7) in shapes and shapes == sorted(shapes)
        assert set(CALIBRATION_SHAPES) <= set(shapes)
    finally:
        for m, plan in zip(layers, saved):
            m.plan = plan


def test_the_step_record_counts_the_kv_the_forward_attended_over(tiny):
    model, _, tok = tiny
    engine = Engine(model, tok, EngineConfig(CacheConfig(kv_cache_tokens=1024)))
    ids = tok(PROMPTS[0]).input_ids
    engine.add_request("r", ids, SamplingParams(max_new_tokens=3, ignore_eos=True))
    step(engine)  # the prefill: the prompt's tokens, over nothing cached before
    first = engine.last_step
    assert (first.batch_size, first.num_batched_tokens, first.num_kv_tokens) == (1, len(ids), len(ids))
    step(engine)  # one decode token over the prompt
    assert (engine.last_step.num_batched_tokens, engine.last_step.num_kv_tokens) == (1, len(ids) + 1)
    assert engine.last_step.step_id == first.step_id + 1 and engine.last_step.emitted_tokens == 1
