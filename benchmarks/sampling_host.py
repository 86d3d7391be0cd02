"""Host time of sampling: a lockstep draft step's picks, and the target's top-k and top-p cuts.

    python benchmarks/sampling_host.py [--batch-sizes 1,16,64] [--reps 30]
                                       [--output-dir benchmarks/results/sampling_host]

A draft model's lockstep step ends with a token per request (`DraftModelBackend._pick`):
the argmax for greedy requests, a draw from the processed distribution for sampled ones,
with that distribution returned sparse. `per_row` is the same work a row at a time, each
row read back on its own, a sampled row's top-k found by sorting its whole vocabulary and
drawn with `torch.multinomial` over it: what the backend did before it processed the rows
together. Both run on the built-in draft's logits shape (its head vocabulary) with random
logits. The cuts (`runtime.sampler.processed_probs`) run on the built-in target's own
logits over a fixed text (B rows drawn from its positions), against the same cuts through a
sort of every row: top-k 50 (temperature 0.8), where `topk` finds the k-th value, and top-p
0.9 (temperatures 0.7 and 1.0), where a CPU looks among the 256, then 4,096 most likely first.
Then whole engine steps: `--engine-batch` requests (SmolLM2-135M, the built-in chat prompts,
T 1.0, top-p 0.9) decoding through `Engine.step`, timed over `--engine-steps` steps with the
verifier's cut through a sort of every row (swapped into the rejection sampler) and as it is.
Medians of --reps, the methods interleaved three times. Writes results.json and
sampling_host.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info, median_ms  # noqa: E402

from drafting.config import DraftConfig  # noqa: E402
from drafting.state import DraftCall  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from runtime import rejection, sampler  # noqa: E402
from runtime.models import DEFAULT_MODEL, load_model, load_tokenizer  # noqa: E402
from runtime.sampler import SamplingParams, processed_probs  # noqa: E402
from smartspec.prompts import BUILTIN_PROMPTS  # noqa: E402

TEXT = (
    "The history of the Roman Empire spans many centuries, beginning with the founding of the city "
    "and ending with the fall of Constantinople. Write a Python function that sorts a list of numbers "
    "and returns the median. Once upon a time, in a small village by the sea, there lived an old "
    "fisherman who"
)
CUTS = {  # name: the request's sampling parameters
    "top-k 50": SamplingParams(temperature=0.8, top_k=50),
    "top-p 0.9, T 0.7": SamplingParams(temperature=0.7, top_p=0.9),
    "top-p 0.9, T 1.0": SamplingParams(temperature=1.0, top_p=0.9),
}


def sorted_cut(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """processed_probs through a sort of every row (each row's top-k, or else its top-p)."""
    logits = logits.float() / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    if params[0].top_k:
        k = torch.tensor([p.top_k for p in params]).unsqueeze(1)
        kth = torch.sort(logits, dim=1, descending=True).values.gather(1, k - 1)
        return torch.softmax(logits.masked_fill(logits < kth, -math.inf), dim=1)
    top_ps = torch.tensor([p.top_p for p in params]).unsqueeze(1)
    drop = sampler._sorted_drop(torch.softmax(logits, dim=1), top_ps)
    return torch.softmax(logits.masked_fill(drop, -math.inf), dim=1)


def target_logits() -> torch.Tensor:
    """The built-in target's logits at every position of a fixed text of prose, code and story."""
    model, tok = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits[0].float()


def per_row(backend, calls: list[DraftCall], logits: torch.Tensor) -> list:
    out = []
    for row, call in zip(logits, calls):
        if call.params.greedy:
            out.append(int(row.argmax()))
            continue
        p = call.params
        cap = min(p.top_k, backend.top_k_cap) if p.top_k > 0 else backend.top_k_cap
        dist = sorted_cut(row.unsqueeze(0), [SamplingParams(temperature=p.temperature, top_k=cap)])[0]
        column = int(torch.multinomial(dist, 1, generator=call.state.generator))
        support = dist.nonzero().squeeze(1)
        out.append((column, support.tolist(), dist[support].tolist(), float(dist.max())))
    return out


def engine_step_ms(engine: Engine, runner: asyncio.Runner, cut, prompts: list[list[int]], steps: int) -> float:
    """ms per decode step of sampled requests for these prompts, with `cut` as the rejection sampler's."""
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature=1.0, top_p=0.9, seed=i, max_new_tokens=100_000, ignore_eos=True)
        engine.add_request(f"r{i}-{time.monotonic_ns()}", prompt, params)
    while any(s.num_computed < len(s.prompt_ids) for s in engine._seqs.values()):  # prefill, untimed
        runner.run(engine.step())

    async def timed() -> float:
        start = time.perf_counter()
        for _ in range(steps):
            assert len(await engine.step()) == len(prompts), "a request did not decode"
        return (time.perf_counter() - start) * 1e3 / steps

    rejection.processed_probs = cut
    try:
        return runner.run(timed())
    finally:
        rejection.processed_probs = processed_probs
        for request_id in list(engine._seqs):
            engine.abort(request_id)


def interleaved(fns, reps: int) -> list[float]:
    runs = [[median_ms(f, reps) for f in fns] for _ in range(3)]
    return [statistics.median(r[i] for r in runs) for i in range(len(fns))]


def plot(rows: list[dict], cut: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    labels = [f"B={r['B']}\n{r['kind']}" for r in rows]
    x = range(len(rows))
    left.bar([i - 0.2 for i in x], [r["per_row_ms"] for r in rows], 0.4, label="a row at a time")
    left.bar([i + 0.2 for i in x], [r["batched_ms"] for r in rows], 0.4, label="rows together (_pick)")
    left.set_xticks(list(x), labels, fontsize=7)
    left.set_yscale("log")
    left.set_ylabel("ms per lockstep step (median)")
    left.set_title(f"Draft picks, {rows[0]['columns']} logit columns")
    left.legend()
    x = range(len(cut))
    right.bar([i - 0.2 for i in x], [r["sort_ms"] for r in cut], 0.4, label="a sort of every row")
    right.bar([i + 0.2 for i in x], [r["ms"] for r in cut], 0.4, label="processed_probs")
    right.set_xticks(list(x), [f"B={r['B']}\n" + r["cut"].replace(", ", "\n") for r in cut], fontsize=6)
    right.set_yscale("log")
    right.set_title(f"Cuts of the target's logits, {cut[0]['vocab']} tokens")
    right.legend()
    fig.savefig(out / "sampling_host.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--engine-batch", type=int, default=64)
    ap.add_argument("--engine-steps", type=int, default=10)
    ap.add_argument("--output-dir", default="benchmarks/results/sampling_host")
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = DraftConfig(draft="smollm2-draft").make_backend()
    columns = backend.runner.model.get_output_embeddings().out_features
    real = target_logits()
    gen = torch.Generator().manual_seed(0)
    rows, cut = [], []
    for b in map(int, args.batch_sizes.split(",")):
        logits = torch.randn(b, columns, generator=gen) * 3
        for kind, params in (("greedy", SamplingParams()), ("sampled", SamplingParams(temperature=0.8, seed=1))):
            calls = []
            for _ in range(b):
                state = backend.new_state()
                state.generator = torch.Generator().manual_seed(1)
                calls.append(DraftCall(state, 4, params))
            old, new = interleaved(
                [partial(per_row, backend, calls, logits), partial(backend._pick, calls, logits)], args.reps
            )
            rows.append({"B": b, "kind": kind, "columns": columns, "per_row_ms": old, "batched_ms": new})
            print(f"B={b:3d} {kind:7s}: a row at a time {old:8.3f} ms, rows together {new:7.3f} ms", flush=True)
        rows_at = torch.randint(len(real), (b,), generator=gen)
        for name, p in CUTS.items():
            target, params = real[rows_at], [p] * b
            assert torch.allclose(sorted_cut(target, params), processed_probs(target, params)), "the two cuts differ"
            sort_ms, ms = interleaved(
                [partial(sorted_cut, target, params), partial(processed_probs, target, params)], args.reps
            )
            cut.append({"B": b, "cut": name, "vocab": real.shape[1], "sort_ms": sort_ms, "ms": ms})
            print(f"B={b:3d} {name}: a sort of every row {sort_ms:8.3f} ms, processed_probs {ms:7.3f} ms", flush=True)
    tok = load_tokenizer(DEFAULT_MODEL)
    engine = Engine(load_model(DEFAULT_MODEL), tok, EngineConfig(CacheConfig(kv_cache_tokens=32768)))
    runner, b = asyncio.Runner(), args.engine_batch
    chat = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in BUILTIN_PROMPTS
    ]
    prompts = [chat[i % len(chat)] for i in range(b)]
    cuts = (sorted_cut, processed_probs)
    runs = [[engine_step_ms(engine, runner, f, prompts, args.engine_steps) for f in cuts] for _ in range(3)]
    steps = {"B": b, "sort_ms": statistics.median(r[0] for r in runs), "ms": statistics.median(r[1] for r in runs)}
    print(f"engine steps, B={b} sampled: a sort of every row {steps['sort_ms']:.1f} ms, as it is {steps['ms']:.1f} ms")
    results = {"machine": machine_info(), "picks": rows, "cut": cut, "engine_steps": steps | {"runs": runs}}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, cut, out)
    print(f"wrote {out / 'results.json'}, {out / 'sampling_host.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
