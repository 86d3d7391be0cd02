"""What every benchmark records and compares against: the machine it ran on, Hugging Face's
own generation (plain and assisted) on the same prompts, and the median of a timed call."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime import model_thread  # noqa: E402
from runtime.cpu_linear_select import cpu_model  # noqa: E402


def machine_info() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([sys.executable] + sys.argv),
    }


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({torch.get_num_threads()} threads)"


def hf_generate(model, tok, prompts: list[str], n: int) -> dict:
    """Greedy generate of exactly n tokens on a left-padded static batch."""
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    out = model_thread.call(  # where the engine runs its forwards: one OpenMP team per process
        model.generate, **enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id
    )
    elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - enc.input_ids.shape[1]) * len(prompts)
    assert tokens == n * len(prompts), f"HF made {tokens} tokens, expected {n * len(prompts)}"
    return {"elapsed_s": elapsed, "tokens": tokens}


def synchronize(model) -> None:
    """Waits for the model's queued kernels (a no-op on CPU), so that wall-clock timers are honest."""
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_assisted(target, tok, draft, prompts: list[str], new_tokens: int, k: int, ngram: bool) -> float | None:
    """HF assisted generation's TPOT (ms, mean over prompts), run on the model thread."""
    return model_thread.call(_hf_assisted, target, tok, draft, prompts, new_tokens, k, ngram)


def _hf_assisted(target, tok, draft, prompts: list[str], new_tokens: int, k: int, ngram: bool) -> float | None:
    if target is None:
        return None
    tpots = []
    device = next(target.parameters()).device
    for p in prompts:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(device)
        kwargs = {"prompt_lookup_num_tokens": k} if ngram else {"assistant_model": draft}
        if not ngram:
            draft.generation_config.num_assistant_tokens = k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
        with torch.inference_mode():
            t0 = time.perf_counter()
            target.generate(**ids, max_new_tokens=1, do_sample=False)
            synchronize(target)
            ttft = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = target.generate(
                **ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, **kwargs
            )
            synchronize(target)
            total = time.perf_counter() - t0
        n = out.shape[1] - ids["input_ids"].shape[1]
        tpots.append((total - ttft) / (n - 1) * 1e3)
    return statistics.mean(tpots)


def median_ms(fn, reps: int) -> float:
    """The median of `reps` timed calls of `fn`, in ms."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
