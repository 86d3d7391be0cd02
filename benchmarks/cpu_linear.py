"""CPU linear layers: `F.linear` against the engine's CpuLinear on SmolLM2-135M's own weights.

    python benchmarks/cpu_linear.py [--output-dir benchmarks/results/cpu_linear]

1. All of the model's linear layers (30 blocks x 7 plus the 49152-row output
   layer) for n input rows, n = 1..32 and a few prefill sizes: `F.linear` vs
   `CpuLinear.forward` (W @ x^T over a power-of-two row count).
2. `ModelRunner.forward` for B requests x q new tokens over a 256-token context,
   with the model's linear layers plain and switched.

Both variants alternate within each repetition; medians of the repetitions.
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
from verifier_svc.cpu_linear import CpuLinear  # noqa: E402
from verifier_svc.model_runner import ForwardItem, ModelRunner  # noqa: E402

ROWS = [*range(1, 33), 48, 64, 128, 256]
SHAPES = [(1, 1), (1, 2), (1, 3), (1, 4), (1, 5), (1, 9), (4, 1), (4, 4), (16, 1), (16, 2), (16, 5), (64, 1)]
CTX = 256
REPS = 5


def median_ms(fns: dict, reps: int) -> dict:
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def bench_layers(linears: list[nn.Linear]) -> list[dict]:
    rows = []
    for n in ROWS:
        inputs = {w: torch.randn(n, w) for w in {m.in_features for m in linears}}

        def plain():
            for m in linears:
                F.linear(inputs[m.in_features], m.weight, m.bias)

        def switched():
            for m in linears:
                CpuLinear.forward(m, inputs[m.in_features])

        ms = median_ms({"linear": plain, "cpu_linear": switched}, REPS)
        rows.append({"rows": n, "linear_ms": ms["linear"], "cpu_linear_ms": ms["cpu_linear"]})
        print(f"  {n:4d} rows: F.linear {ms['linear']:7.1f} ms, CpuLinear {ms['cpu_linear']:7.1f} ms", flush=True)
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
        ms = median_ms({"linear": lambda: run(nn.Linear), "cpu_linear": lambda: run(CpuLinear)}, REPS)
        rows.append({"B": b, "q": q, "linear_ms": ms["linear"], "cpu_linear_ms": ms["cpu_linear"]})
        print(f"  B={b:2d} q={q}: F.linear {ms['linear']:6.1f} ms, CpuLinear {ms['cpu_linear']:6.1f} ms", flush=True)
    switch(CpuLinear)
    return rows


def plot(layers: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    small = [r for r in layers if r["rows"] <= 32]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["rows"] for r in small], [r["linear_ms"] for r in small], "o-", label="F.linear (x @ W^T)")
    ax.plot([r["rows"] for r in small], [r["cpu_linear_ms"] for r in small], "s-",
            label="CpuLinear ((W @ x^T)^T, rows padded to 2^k)")
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
