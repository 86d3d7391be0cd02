"""CPU linear layers: `F.linear` against the engine's CpuLinear on SmolLM2-135M's own weights.

    python benchmarks/cpu_linear.py [--output-dir benchmarks/results/cpu_linear]

Three variants: `F.linear` (what nn.Linear does), "padded" ((W @ x^T)^T over
rows padded to a power of two for every count up to 32: what CpuLinear did
for all counts before it took oneDNN's packed product above 4 rows), and
CpuLinear as it is.

1. All of the model's linear layers (30 blocks x 7 plus the 49152-row output
   layer) for n input rows, n = 1..32 and a few prefill sizes (padded: up to 32).
2. `ModelRunner.forward` for B requests x q new tokens over a 256-token context.

The variants alternate within each repetition; medians of the repetitions, and
the median of the paired padded / CpuLinear ratios.
Writes results.json and cpu_linear.png into the output directory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smartspec.models import load_model  # noqa: E402
from verifier_svc import cpu_linear  # noqa: E402
from verifier_svc.cpu_linear import CpuLinear  # noqa: E402
from verifier_svc.model_runner import ForwardItem, ModelRunner  # noqa: E402

ROWS = [*range(1, 33), 48, 64, 128, 256]
SHAPES = [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 6), (1, 8), (1, 9), (4, 1), (4, 2), (4, 4), (8, 1), (8, 2),
          (16, 1), (16, 2), (16, 5), (64, 1)]
PADDED_MAX = 32  # the padded variant's largest row count
SMALL_ROWS = cpu_linear.SMALL_ROWS  # CpuLinear's own switch-over, restored after each padded run
CTX = 256
REPS = 7


def median_ms(fns: dict, reps: int) -> dict:
    """{name: median ms}, plus "padded_ratio": the median of each repetition's padded / cpu_linear."""
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    ms = {name: statistics.median(t) for name, t in times.items()}
    if "padded" in times:
        ms["padded_ratio"] = statistics.median(p / c for p, c in zip(times["padded"], times["cpu_linear"]))
    return ms


def padded(fn):
    """Runs fn with CpuLinear's padded product for every count up to PADDED_MAX rows."""
    def run():
        cpu_linear.SMALL_ROWS = PADDED_MAX
        try:
            fn()
        finally:
            cpu_linear.SMALL_ROWS = SMALL_ROWS
    return run


def record(row: dict, ms: dict) -> str:
    row.update({"linear_ms": ms["linear"], "padded_ms": ms.get("padded"), "cpu_linear_ms": ms["cpu_linear"],
                "padded_over_cpu_linear": ms.get("padded_ratio")})
    pad = f", padded {ms['padded']:7.1f} ms ({ms['padded_ratio']:.2f}x)" if "padded" in ms else ""
    return f"F.linear {ms['linear']:7.1f} ms{pad}, CpuLinear {ms['cpu_linear']:7.1f} ms"


@torch.inference_mode()
def bench_layers(linears: list[nn.Linear]) -> list[dict]:
    for m in linears:
        m.__class__ = CpuLinear
        m.packed_weight()  # packed once, as on a runner's first step
    rows = []
    for n in ROWS:
        inputs = {w: torch.randn(n, w) for w in {m.in_features for m in linears}}

        def plain():
            for m in linears:
                F.linear(inputs[m.in_features], m.weight, m.bias)

        def switched():
            for m in linears:
                m(inputs[m.in_features])

        fns = {"linear": plain, "cpu_linear": switched}
        if n <= PADDED_MAX:
            fns["padded"] = padded(switched)
        row = {"rows": n}
        print(f"  {n:4d} rows: {record(row, median_ms(fns, REPS))}", flush=True)
        rows.append(row)
    return rows


def bench_forward(model, linears: list[nn.Linear]) -> list[dict]:
    runner = ModelRunner(model, num_blocks=max(b for b, _ in SHAPES) * 20 + 64, block_size=16)

    def items(b: int, q: int) -> list[ForwardItem]:
        return [ForwardItem([5] * q, CTX, list(range(i * 20, i * 20 + 20)), q) for i in range(b)]

    def switch(cls):
        for m in linears:
            m.__class__ = cls

    rows = []
    for b, q in SHAPES:
        def run(cls, b=b, q=q):
            switch(cls)
            runner.forward(items(b, q))

        run(nn.Linear)
        ms = median_ms({"linear": lambda: run(nn.Linear), "cpu_linear": lambda: run(CpuLinear),
                        "padded": padded(lambda: run(CpuLinear))}, REPS)
        row = {"B": b, "q": q}
        print(f"  B={b:2d} q={q}: {record(row, ms)}", flush=True)
        rows.append(row)
    switch(CpuLinear)
    return rows


def plot(layers: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = [r for r in layers if r["rows"] <= 32]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["rows"] for r in small], [r["linear_ms"] for r in small], "o-", label="F.linear (x @ W^T)")
    ax.plot([r["rows"] for r in small], [r["padded_ms"] for r in small], "^--",
            label="(W @ x^T)^T, rows padded to 2^k")
    ax.plot([r["rows"] for r in small], [r["cpu_linear_ms"] for r in small], "s-",
            label="CpuLinear (padded up to 4 rows, oneDNN packed above)")
    ax.set_xlabel("input rows (batched tokens)")
    ax.set_ylabel("all linear layers of SmolLM2-135M (ms)")
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "cpu_linear.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output-dir", default="benchmarks/results/cpu_linear")
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    transformers.logging.set_verbosity_error()
    model = load_model("smollm2")
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    print(f"1. {len(linears)} linear layers, {sum(m.weight.numel() for m in linears) / 1e6:.1f} M weights")
    layers = bench_layers(linears)
    print("2. ModelRunner.forward")
    forward = bench_forward(model, linears)
    results = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
               "torch": torch.__version__, "threads": torch.get_num_threads(), "layers": layers, "forward": forward}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(layers, out)
    print(f"wrote {out / 'results.json'}, {out / 'cpu_linear.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
