"""Serving-core benchmark: SmartSpec's engine vs Hugging Face `generate` on SmolLM2-135M (CPU, float32).

    python benchmarks/serving_core.py [--quick] [--hf-cpu-linear] [--output-dir benchmarks/results/serving_core]

1. Throughput: 16 concurrent requests through `Engine.step()` vs one static left-padded HF batch.
2. Batch-1 time per output token (first token excluded), engine vs HF.
3. Step time of `ModelRunner.forward` for B requests x q new tokens over a 512-token cached context.

`--hf-cpu-linear` gives the HF model the engine's CPU linear layers
(runtime/cpu_linear.py), which separates the kernel from the engine.
Repetitions alternate engine/HF to spread noise; only ratios from one run are meaningful.
Writes results.json, throughput_tpot.png and step_time.png into the output directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import hf_generate, machine_info  # noqa: E402

from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from runtime.cpu_linear_select import use_cpu_linear  # noqa: E402
from runtime.model_runner import ForwardItem, kv_shape  # noqa: E402
from runtime.models import load_model, load_tokenizer  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402
from smartspec.prompts import BUILTIN_PROMPTS  # noqa: E402

MODEL = "smollm2"
NUM_CONCURRENT = 16
CTX = 512
BLOCK_SIZE = 16
STEP_RUNS = 5


def config(quick: bool) -> dict:
    if quick:
        return {"reps": 1, "new_tokens": 32, "batch_sizes": [1, 4], "qs": [1, 2]}
    return {"reps": 5, "new_tokens": 128, "batch_sizes": [1, 2, 4, 8, 16, 32], "qs": [1, 2, 4, 8]}


# -- engine side ------------------------------------------------------------

_ids = iter(range(10**9))
STEPS = asyncio.Runner()  # one event loop drives every Engine.step()


def engine_run(engine: Engine, prompts: list[list[int]], n: int) -> dict:
    """Submits all prompts at once and steps until done: elapsed, first-token time, tokens made."""
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    start = time.perf_counter()
    seqs = [engine.add_request(f"r{next(_ids)}", p, params) for p in prompts]
    first = None
    while engine.has_work():
        if STEPS.run(engine.step()) and first is None:
            first = time.perf_counter() - start
    elapsed = time.perf_counter() - start
    tokens = sum(len(s.output_ids) for s in seqs)
    assert tokens == n * len(prompts), f"engine made {tokens} tokens, expected {n * len(prompts)}"
    return {"elapsed_s": elapsed, "ttft_s": first, "tokens": tokens}


# -- the three parts ----------------------------------------------------------


def bench_throughput(engine, hf_model, tok, prompts: list[str], n: int, reps: int) -> dict:
    ids = [tok(p).input_ids for p in prompts]
    raw = []
    for r in range(reps):
        order = ("engine", "hf") if r % 2 == 0 else ("hf", "engine")
        rep = {}
        for side in order:
            res = engine_run(engine, ids, n) if side == "engine" else hf_generate(hf_model, tok, prompts, n)
            rep[side] = res["tokens"] / res["elapsed_s"]
        rep["ratio"] = rep["engine"] / rep["hf"]
        raw.append(rep)
        print(f"  throughput rep {r}: engine {rep['engine']:.1f} tok/s, HF {rep['hf']:.1f} tok/s")
    return {"raw": raw, "median": {k: statistics.median(x[k] for x in raw) for k in ("engine", "hf", "ratio")}}


def tpot(total_s: float, ttft_s: float, n: int) -> float:
    return (total_s - ttft_s) / (n - 1)


def bench_tpot(engine, hf_model, tok, prompt: str, n: int, reps: int) -> dict:
    ids = tok(prompt).input_ids
    raw = []
    for r in range(reps):
        order = ("engine", "hf") if r % 2 == 0 else ("hf", "engine")
        rep = {}
        for side in order:
            if side == "engine":
                res = engine_run(engine, [ids], n)
                rep["engine_ttft_ms"] = 1e3 * res["ttft_s"]
                rep["engine_ms"] = 1e3 * tpot(res["elapsed_s"], res["ttft_s"], n)
            else:
                ttft = hf_generate(hf_model, tok, [prompt], 1)["elapsed_s"]
                total = hf_generate(hf_model, tok, [prompt], n)["elapsed_s"]
                rep["hf_ttft_ms"] = 1e3 * ttft
                rep["hf_ms"] = 1e3 * tpot(total, ttft, n)
        rep["ratio"] = rep["engine_ms"] / rep["hf_ms"]
        raw.append(rep)
        print(f"  TPOT rep {r}: engine {rep['engine_ms']:.2f} ms, HF {rep['hf_ms']:.2f} ms")
    keys = ("engine_ms", "hf_ms", "ratio", "engine_ttft_ms", "hf_ttft_ms")
    return {"raw": raw, "median": {k: statistics.median(x[k] for x in raw) for k in keys}}


def context_ids(tok, length: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < length:
        ids += tok("\n\n".join(BUILTIN_PROMPTS)).input_ids
    return ids[:length]


def time_forward(runner, items: list[ForwardItem]) -> list[float]:
    runner.forward(items)  # warm-up
    times = []
    for _ in range(STEP_RUNS):
        start = time.perf_counter()
        runner.forward(items)
        times.append(time.perf_counter() - start)
    return times


def bench_step_table(engine, tok, batch_sizes: list[int], qs: list[int]) -> list[dict]:
    """Prefills max(B) requests with CTX tokens once; each B times its first B of them (same KV, same slots)."""
    ctx = context_ids(tok, CTX)
    tables = []
    for _ in range(max(batch_sizes)):
        table: list[int] = []
        engine.allocator.grow(table, CTX + max(qs))
        tables.append(table)
    for i in range(0, len(tables), 4):  # prefill four requests per forward
        engine.runner.forward([ForwardItem(ctx, 0, t, 0) for t in tables[i : i + 4]])
    rows = []
    for b in batch_sizes:
        for q in qs:
            items = [ForwardItem(ctx[:q], CTX, t, q) for t in tables[:b]]
            ms = 1e3 * statistics.median(time_forward(engine.runner, items))
            rows.append({"B": b, "q": q, "ms": ms, "ms_per_token": ms / (b * q)})
            print(f"  step B={b:2d} q={q}: {ms:8.2f} ms  ({ms / (b * q):.3f} ms/token)")
    for t in tables:
        engine.allocator.free(t)
    return rows


# -- output -----------------------------------------------------------------


def markdown(results: dict) -> str:
    tp, tt, n = results["throughput"]["median"], results["tpot"]["median"], results["config"]["new_tokens"]
    lines = [
        f"**Throughput** ({NUM_CONCURRENT} concurrent requests x {n} new tokens, median of "
        f"{results['config']['reps']})",
        "",
        "| | SmartSpec engine | HF generate (static batch) | ratio |",
        "|---|---|---|---|",
        f"| tokens/s | {tp['engine']:.1f} | {tp['hf']:.1f} | {tp['ratio']:.2f}x |",
        "",
        f"**Batch-1 latency** ({n} new tokens, first token excluded from TPOT)",
        "",
        "| | SmartSpec engine | HF generate | ratio ours/HF |",
        "|---|---|---|---|",
        f"| TPOT (ms) | {tt['engine_ms']:.2f} | {tt['hf_ms']:.2f} | {tt['ratio']:.2f} |",
        f"| TTFT (ms) | {tt['engine_ttft_ms']:.1f} | {tt['hf_ttft_ms']:.1f} | "
        f"{tt['engine_ttft_ms'] / tt['hf_ttft_ms']:.2f} |",
        "",
        f"**Step time** (`ModelRunner.forward`, {CTX}-token context per request, median of {STEP_RUNS}; "
        "ms, ms/token in parentheses)",
        "",
    ]
    rows = results["step_table"]
    qs = sorted({r["q"] for r in rows})
    lines += ["| B | " + " | ".join(f"q={q}" for q in qs) + " |", "|---" * (len(qs) + 1) + "|"]
    for b in sorted({r["B"] for r in rows}):
        cells = [f"{r['ms']:.1f} ({r['ms_per_token']:.2f})" for q in qs for r in rows if r["B"] == b and r["q"] == q]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tp, tt = results["throughput"]["median"], results["tpot"]["median"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = ["tab:blue", "tab:gray"]
    a1.bar(["SmartSpec", "HF generate"], [tp["engine"], tp["hf"]], color=colors)
    a1.set_title(f"Throughput, {NUM_CONCURRENT} requests ({tp['ratio']:.2f}x)")
    a1.set_ylabel("output tokens/s")
    a2.bar(["SmartSpec", "HF generate"], [tt["engine_ms"], tt["hf_ms"]], color=colors)
    a2.set_title(f"Batch-1 TPOT (ours/HF {tt['ratio']:.2f})")
    a2.set_ylabel("ms per output token")
    fig.tight_layout()
    fig.savefig(out / "throughput_tpot.png", dpi=120)
    plt.close(fig)

    rows = results["step_table"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for q in sorted({r["q"] for r in rows}):
        pts = sorted((r["B"], r["ms"]) for r in rows if r["q"] == q)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"q={q}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted({r["B"] for r in rows}), [str(b) for b in sorted({r["B"] for r in rows})])
    ax.set_xlabel("batch size B (requests)")
    ax.set_ylabel("forward ms")
    ax.set_title(f"Step time, {CTX}-token context per request")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "step_time.png", dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: R=1, 32 new tokens, B in {1,4}, q in {1,2}")
    ap.add_argument("--hf-cpu-linear", action="store_true", help="HF generate with the engine's CPU linear layers")
    ap.add_argument("--output-dir", default="benchmarks/results/serving_core")
    args = ap.parse_args()
    cfg = config(args.quick)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()

    tok = load_tokenizer(MODEL)
    hf_model = load_model(MODEL, "float32", "cpu")  # stays on HF's attention
    if args.hf_cpu_linear:
        use_cpu_linear(hf_model)
    engine_model = load_model(MODEL, "float32", "cpu")  # Engine switches this one to paged attention
    blocks_per_req = -(-(CTX + max(cfg["qs"])) // BLOCK_SIZE)
    kv_tokens = max(max(cfg["batch_sizes"]) * blocks_per_req * BLOCK_SIZE, 4096)
    engine = Engine(engine_model, tok, EngineConfig(CacheConfig(block_size=BLOCK_SIZE, kv_cache_tokens=kv_tokens)))
    prompts = BUILTIN_PROMPTS[:NUM_CONCURRENT]
    n, reps = cfg["new_tokens"], cfg["reps"]

    print("warming up")
    engine_run(engine, [tok(p).input_ids for p in prompts], 4)
    hf_generate(hf_model, tok, prompts, 4)
    print("1. throughput")
    throughput = bench_throughput(engine, hf_model, tok, prompts, n, reps)
    print("2. batch-1 TPOT")
    tpot_res = bench_tpot(engine, hf_model, tok, prompts[0], n, reps)
    print("3. step-time table")
    steps = bench_step_table(engine, tok, cfg["batch_sizes"], cfg["qs"])

    results = {
        "machine": machine_info(),
        "model": MODEL,
        "dtype": "float32",
        "hf_cpu_linear": args.hf_cpu_linear,
        "config": {
            **cfg,
            "concurrent": NUM_CONCURRENT,
            "ctx": CTX,
            "block_size": BLOCK_SIZE,
            "step_runs": STEP_RUNS,
            "kv_cache_tokens": kv_tokens,
            "kv_bytes_per_token": 2 * 4 * torch.Size(kv_shape(engine_model.config)).numel(),
        },
        "throughput": throughput,
        "tpot": tpot_res,
        "step_table": steps,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out)
    print("\n" + markdown(results) + "\n")
    print(f"wrote {out / 'results.json'}, {out / 'throughput_tpot.png'}, {out / 'step_time.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
