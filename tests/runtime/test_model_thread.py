"""A process's model work runs on one thread, whichever thread asks for it (runtime.model_thread)."""

from __future__ import annotations

import asyncio
import threading

import torch

from runtime import model_thread
from runtime.attention import ForwardItem
from runtime.model_runner import ModelRunner
from runtime.models import load_model


def test_call_runs_there_and_nested_calls_run_inline():
    assert not model_thread.on_model_thread()
    name = model_thread.call(lambda: threading.current_thread().name)
    assert name.startswith("smartspec-model")
    # Already on the model thread: inline, not queued behind itself (which would deadlock).
    assert model_thread.call(model_thread.call, model_thread.on_model_thread) is True


def test_forwards_from_any_thread_run_on_the_model_thread(tiny_llama_dir):
    model = load_model(tiny_llama_dir)
    seen = set()
    model.register_forward_pre_hook(lambda *_: seen.add(threading.current_thread().name))
    runner = ModelRunner(model, num_blocks=8, block_size=16)
    item = [ForwardItem([1, 2, 3], 0, [0], 1)]
    runner.forward(item)  # from the main thread
    other = threading.Thread(target=runner.forward, args=(item,))  # from another thread
    other.start()
    other.join()
    asyncio.run(asyncio.to_thread(runner.forward, item))  # from an event loop's worker
    asyncio.run(model_thread.run(runner.forward, item))
    assert len(seen) == 1 and next(iter(seen)).startswith("smartspec-model")


def test_the_model_threads_own_thread_count_is_what_placement_sets(tiny_llama_dir):
    from runtime.models import Placement

    before = model_thread.call(torch.get_num_threads)
    try:
        Placement(threads=1).load(tiny_llama_dir)
        assert model_thread.call(torch.get_num_threads) == 1
    finally:
        model_thread.call(torch.set_num_threads, before)
