"""CPU linear layers: each product against the one `auto` chose, on SmolLM2-135M's own weights.

    python benchmarks/cpu_linear.py [--output-dir benchmarks/results/cpu_linear] [--reps 7]

Variants: `linear` (F.linear, what nn.Linear does), `transposed` ((W @ x^T)^T),
`packed` (oneDNN over a packed weight; float32 with oneDNN only) and `auto`
(per weight shape and row count the product `runtime.cpu_linear_select` timed
fastest on this machine; its decision is measured, or read from this machine's
cache, before anything is timed here).

1. All of the model's linear layers (30 blocks x 7 plus the 49152-row output
   layer) for n input rows, n = 1..32 and a few prefill sizes.
2. `ModelRunner.forward` for B requests x q new tokens over a 256-token context.

The variants run in turn within each repetition (rotating which goes first);
each variant's median over repetitions is reported, and for `auto` the median
of each repetition's auto / fastest candidate. The CPU model goes with the
results: a product fastest on one CPU may be slow on another.
Writes results.json and cpu_linear.png into the output directory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402

from runtime import model_thread  # noqa: E402
from runtime.cpu_linear import MAX_ROWS, CpuLinear, describe, kernels_for  # noqa: E402
from runtime.cpu_linear_select import use_cpu_linear  # noqa: E402
from runtime.model_runner import ForwardItem, ModelRunner  # noqa: E402
from runtime.models import load_model  # noqa: E402

ROWS = [*range(1, 33), 48, 64, 128]
SHAPES = [(1, q) for q in (1, 2, 3, 4, 5, 6, 8, 9)] + [(4, 1), (4, 2), (4, 4), (8, 1), (8, 2), (16, 1), (16, 2)]
CTX = 256


def paired_ms(fns: dict, reps: int) -> dict:
    """{variant: median ms}; "auto_over_best": median over repetitions of auto / the fastest candidate."""
    names = list(fns)
    times = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    candidates = [n for n in names if n != "auto"]
    ms["auto_over_best"] = statistics.median(
        times["auto"][i] / min(times[c][i] for c in candidates) for i in range(reps)
    )
    ms["auto_over_best_median"] = ms["auto"] / min(ms[c] for c in candidates)
    return ms


def variants(linears: list[nn.Linear], auto_plans: list[tuple], fn) -> dict:
    """fn run with every layer on one product, or on the plans `auto` chose."""

    def on(plans):
        def run():
            for m, plan in zip(linears, plans):
                m.plan = plan
            fn()

        return run

    out = {k: on([(k,) * (MAX_ROWS + 1)] * len(linears)) for k in kernels_for(linears[0].weight.dtype)}
    out["auto"] = on(auto_plans)
    return out


def line(ms: dict) -> str:
    cells = ", ".join(f"{k} {v:7.2f}" for k, v in ms.items() if not k.startswith("auto_over"))
    return f"{cells} ms; auto / fastest {ms['auto_over_best']:.3f}"


@torch.inference_mode()
def bench_layers(linears: list[nn.Linear], plans: list[tuple], reps: int) -> list[dict]:
    for m in linears:
        if "packed" in kernels_for(m.weight.dtype):
            m.packed_weight()  # packed once, as on a runner's first step
    rows = []
    for n in ROWS:
        inputs = {w: torch.randn(n, w) for w in {m.in_features for m in linears}}

        def all_layers(inputs=inputs):
            for m in linears:
                m(inputs[m.in_features])

        ms = paired_ms(variants(linears, plans, all_layers), reps)
        print(f"  {n:4d} rows: {line(ms)}", flush=True)
        rows.append({"rows": n, **ms})
    return rows


def bench_forward(model, linears: list[nn.Linear], plans: list[tuple], reps: int) -> list[dict]:
    runner = ModelRunner(model, num_blocks=max(b for b, _ in SHAPES) * 20 + 64, block_size=16)
    rows = []
    for b, q in SHAPES:
        items = [ForwardItem([5] * q, CTX, list(range(i * 20, i * 20 + 20)), q) for i in range(b)]
        runner.forward(items)
        ms = paired_ms(variants(linears, plans, lambda items=items: runner.forward(items)), reps)
        print(f"  B={b:2d} q={q}: {line(ms)}", flush=True)
        rows.append({"B": b, "q": q, **ms})
    return rows


def plot(layers: list[dict], out: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    small = [r for r in layers if r["rows"] <= 32]
    for name, style in (("linear", "o-"), ("transposed", "^--"), ("packed", "v--"), ("auto", "s-")):
        if name in small[0]:
            ax.plot([r["rows"] for r in small], [r[name] for r in small], style, label=name)
    ax.set_xlabel("input rows (batched tokens)")
    ax.set_ylabel("all linear layers of SmolLM2-135M (ms)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(out / "cpu_linear.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="benchmarks/results/cpu_linear")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    model = load_model("smollm2")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    start = time.perf_counter()
    use_cpu_linear(model, "auto")
    decided_s = time.perf_counter() - start
    plans = [m.plan for m in linears]
    chosen = [{"shape": s, "rows": r, "kernel": k} for s, r, k in describe(model)]
    assert all(type(m) is CpuLinear for m in linears)
    print(
        f"machine: {machine_info()['cpu_model']}, {torch.get_num_threads()} threads; auto decided in {decided_s:.1f} s"
    )
    for shape, rows, kernel in describe(model):
        print(f"  auto: {shape} rows {rows}: {kernel}")
    print(f"1. {len(linears)} linear layers, {sum(m.weight.numel() for m in linears) / 1e6:.1f} M weights")
    layers = bench_layers(linears, plans, args.reps)
    print("2. ModelRunner.forward")
    forward = bench_forward(model, linears, plans, args.reps)
    worst = max(r["auto_over_best"] for r in layers)
    print(f"auto / fastest candidate, all layers: worst {worst:.3f} over {len(layers)} row counts")
    results = {
        "machine": machine_info(),
        "auto_decision_s": decided_s,
        "auto": chosen,
        "layers": layers,
        "forward": forward,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(layers, out)
    print(f"wrote {out / 'results.json'}, {out / 'cpu_linear.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(model_thread.call(main))  # every layer and forward timed on the one thread that runs them
