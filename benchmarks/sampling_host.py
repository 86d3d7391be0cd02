"""Host time to pick a lockstep draft step's tokens from its logits, and to cut the target's top-k.

    python benchmarks/draft_pick.py [--batch-sizes 1,16,64] [--reps 30]
                                    [--output-dir benchmarks/results/draft_pick]

A draft model's lockstep step ends with a token per request (`DraftModelBackend._pick`):
the argmax for greedy requests, a draw from the processed distribution for sampled ones,
with that distribution returned sparse. `per_row` is the same work a row at a time, each
row read back on its own, a sampled row's top-k found by sorting its whole vocabulary and
drawn with `torch.multinomial` over it: what the backend did before it processed the rows
together. Both run on the built-in draft's logits shape (its head vocabulary) with random
logits. `topk` times the target's sampling cut (`runtime.sampler.processed_probs`, top-k
50, SmolLM2's 49,152 tokens) against the sort it replaced. Medians of --reps, the methods
interleaved three times. Writes results.json and draft_pick.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402

from drafting.config import DraftConfig  # noqa: E402
from drafting.state import DraftCall  # noqa: E402
from runtime.sampler import SamplingParams, processed_probs  # noqa: E402

TARGET_VOCAB = 49152


def sorted_cut(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """processed_probs' top-k through a sort of every row (temperature and top-k only)."""
    logits = logits.float() / torch.tensor([p.temperature for p in params]).unsqueeze(1)
    k = torch.tensor([p.top_k for p in params]).unsqueeze(1)
    kth = torch.sort(logits, dim=1, descending=True).values.gather(1, k - 1)
    return torch.softmax(logits.masked_fill(logits < kth, -math.inf), dim=1)


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


def median_ms(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


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
    right.bar([i - 0.2 for i in x], [r["sort_ms"] for r in cut], 0.4, label="sort")
    right.bar([i + 0.2 for i in x], [r["topk_ms"] for r in cut], 0.4, label="topk")
    right.set_xticks(list(x), [f"B={r['B']}" for r in cut])
    right.set_yscale("log")
    right.set_title(f"Top-50 cut, {TARGET_VOCAB} tokens")
    right.legend()
    fig.savefig(out / "draft_pick.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,16,64")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--output-dir", default="benchmarks/results/draft_pick")
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = DraftConfig(draft="smollm2-draft").make_backend()
    columns = backend.runner.model.get_output_embeddings().out_features
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
        target = torch.randn(b, TARGET_VOCAB, generator=gen) * 3
        params = [SamplingParams(temperature=0.8, top_k=50)] * b
        assert torch.allclose(sorted_cut(target, params), processed_probs(target, params)), "the two cuts differ"
        sort_ms, topk_ms = interleaved(
            [partial(sorted_cut, target, params), partial(processed_probs, target, params)], args.reps
        )
        cut.append({"B": b, "vocab": TARGET_VOCAB, "top_k": 50, "sort_ms": sort_ms, "topk_ms": topk_ms})
        print(f"B={b:3d} top-50 of {TARGET_VOCAB}: sort {sort_ms:8.3f} ms, topk {topk_ms:7.3f} ms", flush=True)
    (out / "results.json").write_text(json.dumps({"machine": machine_info(), "picks": rows, "cut": cut}, indent=1))
    plot(rows, cut, out)
    print(f"wrote {out / 'results.json'}, {out / 'draft_pick.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
