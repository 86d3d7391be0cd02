"""The measurements behind `gpu_check.py`: models of known shapes with random weights, the
device's copy bandwidth, `ModelRunner` step times per variant, and engine decoding at batch 1."""

from __future__ import annotations

import asyncio
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.policy import Policy  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from engine.scheduler import SchedulerConfig  # noqa: E402
from runtime import model_thread, paged_kernels  # noqa: E402
from runtime.attention import ForwardItem  # noqa: E402
from runtime.model_runner import ModelRunner, kv_shape  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402

FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
SHAPES = {
    name: dict(zip(FIELDS, sizes), vocab_size=vocab, **extra)
    for name, sizes, vocab, extra in [
        ("llama-7b", (4096, 11008, 32, 32, 32), 32000, {}),
        ("llama-68m", (768, 3072, 2, 12, 12), 32000, {}),
        ("smollm2-135m", (576, 1536, 30, 9, 3), 49152, {"tie_word_embeddings": True}),
        # --tiny: the same code on a CPU in seconds
        ("tiny-a", (64, 128, 2, 4, 2), 512, {}),
        ("tiny-b", (32, 64, 1, 2, 2), 256, {}),
    ]
}
BLOCK_SIZE = 16
STEPS = asyncio.Runner()


def random_model(name: str, dtype: torch.dtype, device: str):
    return model_thread.call(_random_model, name, dtype, device)  # all torch work on one thread


def _random_model(name: str, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(max_position_embeddings=4096, **SHAPES[name])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: a 7B model in float32 first would double the memory
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device: str, mib: int) -> float:
    """Device-to-device copy, bytes read + written per second (median of 5)."""
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(6):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / statistics.median(times[1:])


def paged_blocks(attentions: list[str], config, dtype, device: str) -> tuple[dict, dict]:
    """For each paged kernel asked for, the smallest block size of 16 and 256 it takes here
    (None: neither), and why each size was refused."""
    _, kv_heads, head_dim = kv_shape(config)
    geometry = (config.num_attention_heads, kv_heads, head_dim)
    blocks, refused = {}, {}
    for name in (a for a in attentions if a in paged_kernels.KERNELS):
        blocks[name] = None
        for bs in (BLOCK_SIZE, 256):
            why = model_thread.call(paged_kernels.unavailable, name, *geometry, bs, dtype, device)
            if why is None:
                blocks[name] = bs
                break
            refused[f"{name} {bs}"] = why
    return blocks, refused


PROFILED = {(1, 1), (1, 5), (32, 1)}  # the shapes of the step bars: where the time goes, when one is missed


def op_profile(fn, reps: int = 3, top: int = 12) -> list[dict]:
    """The ops with the most device time (CPU time on a CPU) over `reps` calls of fn, per call."""
    return model_thread.call(_op_profile, fn, reps, top)  # the thread the forwards run on


def _op_profile(fn, reps: int, top: int) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(reps):
            fn()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
    return [
        {
            "op": e.key,
            "calls": e.count / reps,
            "device_ms": e.self_device_time_total / reps / 1e3,
            "cpu_ms": e.self_cpu_time_total / reps / 1e3,
        }
        for e in events
    ]


def probe_shape(args) -> tuple[int, int]:
    """The step whose logits every variant is compared at: the smallest batch verifying 5
    tokens (one of the bars' shapes), or its widest step when 5 is not measured."""
    return min(args.batch), 5 if 5 in args.q else max(args.q)


def step_times(model, args, variant: str, block_size: int, shapes=None) -> dict:
    """`rows`: {B, q, ctx, ms} per shape of `shapes` (default: every batch x q; every request's
    context prefilled once, then each (B, q) step timed); `logits` of the `probe_shape` step
    when measured; with `args.profile`, `profiles` of the PROFILED shapes' ops."""
    mode, attention = variant.split("/")
    shapes = shapes or [(b, q) for b in args.batch for q in args.q]
    b_max, q_max = max(b for b, _ in shapes), max(q for _, q in shapes)
    per_request = -(-(args.ctx + q_max) // block_size) + 1  # + 1: a padded grid reads up to 16 more
    # Tables as a server of the model's context packs them (one width for a paged kernel).
    max_len = model.config.max_position_embeddings
    runner = ModelRunner(model, b_max * per_request, block_size, graphs=mode, attention=attention, max_len=max_len)
    tables = [list(range(i * per_request, (i + 1) * per_request)) for i in range(b_max)]
    with torch.inference_mode():
        for start in range(0, b_max, 8):  # prefill, eagerly, 8 contexts at a time
            runner._eager([ForwardItem([1] * args.ctx, 0, t, 0) for t in tables[start : start + 8]])
    rows, probe, profiles = [], None, {}
    for b, q in shapes:
        items = [ForwardItem([7 + i % 5] * q, args.ctx, tables[i], q) for i in range(b)]
        times = []
        for _ in range(args.reps + 2):  # the first calls capture (and compile) the bucket's graph
            start = time.perf_counter()
            logits = runner.forward(items)  # synchronises a CUDA device before it returns
            times.append((time.perf_counter() - start) * 1e3)
        if (b, q) == probe_shape(args):
            probe = logits.cpu()
        rows.append({"B": b, "q": q, "ctx": args.ctx, "ms": statistics.median(times[2:])})
        print(f"  {variant:10s} B={b:3d} q={q}: {rows[-1]['ms']:8.2f} ms", flush=True)
        if args.profile and (b, q) in PROFILED:
            profiles[f"B={b} q={q}"] = op_profile(functools.partial(runner.forward, items))
    return {"rows": rows, "logits": probe, "profiles": profiles}


def decode(model, tok, variant: str, block_size: int, new_tokens: int, prompt: str, proposer=None, k=0) -> dict:
    """Batch-1 greedy decoding through the engine, first token excluded: ms per output token
    (`tpot_ms`), per step (`round_ms`: one verification round when speculating) and tokens
    per step; `start_s`: the engine's construction, its graphs' warm-up included (one request
    at a time: the batch-1 buckets). The same request runs twice and the second is timed."""
    mode, attention = variant.split("/")
    cache = CacheConfig(block_size=block_size, kv_cache_tokens=4096)
    cfg = EngineConfig(cache, SchedulerConfig(max_num_seqs=1), Policy.fixed(k), graphs=mode, attention=attention)
    start = time.perf_counter()
    engine = Engine(model, tok, cfg, proposer)
    start_s = time.perf_counter() - start
    ids = [t % model.config.vocab_size for t in tok(prompt).input_ids]  # a --tiny model's vocabulary is smaller
    STEPS.run(_generate(engine, "warm-up", ids, new_tokens))
    elapsed, tokens, rounds = STEPS.run(_generate(engine, "timed", ids, new_tokens))
    return {
        "start_s": start_s,
        "tpot_ms": elapsed / tokens,
        "round_ms": elapsed / max(rounds, 1),
        "tokens_per_round": tokens / max(rounds, 1),
    }


async def _generate(engine: Engine, request_id: str, ids: list[int], new_tokens: int) -> tuple[float, int, int]:
    """(ms, tokens, steps) after the first token, stepping on one running event loop as the
    serving loop does."""
    engine.add_request(request_id, ids, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    first, made, rounds = None, 0, 0
    while engine.has_work():
        outs = await engine.step()
        made += sum(len(o.token_ids) for o in outs)
        rounds += first is not None
        if first is None and made:
            first, first_made = time.perf_counter(), made
    return (time.perf_counter() - first) * 1e3, max(made - first_made, 1), rounds


def variants(modes: list[str], attentions: list[str], blocks: dict) -> dict[str, int]:
    """{"mode/attention": block size} of the variants that can run here."""
    return {
        f"{mode}/{att}": blocks.get(att) or BLOCK_SIZE
        for mode in modes
        for att in attentions
        if att == "sdpa" or blocks.get(att) is not None
    }


def serving_variant(names) -> str:
    """What a server here would run (--attention auto): graphs, with the first paged kernel that runs."""
    order = ("cuda/flash", "cuda/triton", "cuda/sdpa", "compile/sdpa")  # --compile is not a default
    return next((v for v in order if v in names), list(names)[0])
