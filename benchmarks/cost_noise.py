"""How well can any cost model predict a step on these cores? Repeated identical forwards against the fit.

    python benchmarks/cost_noise.py [--repeats 12] [--output-dir benchmarks/results/cost_noise]

The live cost-model error of the goodput sweep mixes two things: steps whose time the
model's shape does not explain, and the spread of identical steps on shared cores.
This times SmolLM2's forward on the verifier's own runner for decode and verify
shapes like the sweep's (B requests, q new tokens each, ctx cached tokens each), each
shape `--repeats` times in a shuffled order, and reports three medians of
|predicted - measured| / measured:
- noise floor: the prediction is the median of the same shape's forwards, the best
  any predictor of shape alone can do;
- online: `CostModelFitter` fed the forwards in order, predicting each before
  learning from it, over the last 256 as the controller reports live;
- in sample: the model fitted on all forwards, scored on them;
each of the last two for the fit as it runs (plain least squares) and with Huber
weights (`CostModelFitter(huber_iterations=3)`).
Forwards only: live steps also add the sampling time, which this leaves out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import random
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.cost_model import ERROR_WINDOW, HUBER_ITERATIONS, CostModelFitter  # noqa: E402
from controller.profile import steps_from_rows  # noqa: E402
from controller.step import StepRecord  # noqa: E402
from engine.calibration import time_forward  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from runtime.models import load_model, load_tokenizer  # noqa: E402

BATCHES, QS, CTXS = (1, 2, 4, 8), (1, 2, 3, 5), (96, 320)


def relative_errors(predicted, measured) -> np.ndarray:
    predicted, measured = np.asarray(predicted), np.asarray(measured)
    return np.abs(predicted - measured) / measured


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="benchmarks/results/cost_noise")
    args = ap.parse_args()

    engine = Engine(load_model("smollm2"), load_tokenizer("smollm2"), EngineConfig(CacheConfig(kv_cache_tokens=8192)))
    shapes = [(b, q, ctx) for b in BATCHES for q in QS for ctx in CTXS]
    for shape in shapes:  # warm-up: each shape once
        time_forward(engine, *shape)
    order = shapes * args.repeats
    random.Random(args.seed).shuffle(order)
    rows = [{"B": b, "q": q, "ctx": ctx, "ms": time_forward(engine, b, q, ctx)} for b, q, ctx in order]

    samples = steps_from_rows(rows)
    measured = [s.verify_ms for s in samples]
    by_shape: dict[tuple, list[float]] = {}
    for r in rows:
        by_shape.setdefault((r["B"], r["q"], r["ctx"]), []).append(r["ms"])
    shape_median = {k: statistics.median(v) for k, v in by_shape.items()}
    noise = relative_errors([shape_median[(r["B"], r["q"], r["ctx"])] for r in rows], measured)

    online, in_sample = fit(samples, CostModelFitter())
    huber_online, huber_in_sample = fit(samples, CostModelFitter(huber_iterations=HUBER_ITERATIONS))
    last = slice(-ERROR_WINDOW, None)
    summary = {
        "noise_floor": float(np.median(noise)),
        "online_last_window": float(np.nanmedian(relative_errors(online[last], measured[last]))),
        "in_sample": float(np.median(relative_errors(in_sample, measured))),
        "huber_online_last_window": float(np.nanmedian(relative_errors(huber_online[last], measured[last]))),
        "huber_in_sample": float(np.median(relative_errors(huber_in_sample, measured))),
        "forwards": len(rows),
        "shapes": len(shapes),
        "shape_spread_iqr_over_median": float(
            np.median([(np.percentile(v, 75) - np.percentile(v, 25)) / statistics.median(v) for v in by_shape.values()])
        ),
    }
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
                "summary": summary,
                "rows": rows,
                "in_sample_ms": in_sample,
            },
            indent=1,
        )
    )
    plot(
        out / "predicted_vs_measured.png", measured, in_sample, [shape_median[(r["B"], r["q"], r["ctx"])] for r in rows]
    )
    print(
        f"{len(rows)} forwards over {len(shapes)} shapes; median relative error: noise floor "
        f"{summary['noise_floor']:.3f}, online (last {ERROR_WINDOW}) {summary['online_last_window']:.3f}, "
        f"in sample {summary['in_sample']:.3f}; with Huber weights: online "
        f"{summary['huber_online_last_window']:.3f}, in sample {summary['huber_in_sample']:.3f}; "
        f"per-shape IQR / median {summary['shape_spread_iqr_over_median']:.3f}"
    )


def fit(samples: list[StepRecord], fitter: CostModelFitter) -> tuple[list[float], list[float]]:
    """Predictions of each step before the fitter learns from it (NaN before its first fit), and
    of every step by the final fit."""
    online = []
    for s in samples:
        fitted = fitter.params.num_steps > 0
        online.append(
            float(fitter.params.verify_ms(s.batch_size, s.num_batched_tokens, s.num_kv_tokens))
            if fitted
            else float("nan")
        )
        fitter.observe(s)
    fitter.refit()
    return online, [
        float(fitter.params.verify_ms(s.batch_size, s.num_batched_tokens, s.num_kv_tokens)) for s in samples
    ]


def plot(path: Path, measured, in_sample, shape_median) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.scatter(measured, shape_median, s=8, alpha=0.5, label="median of the same shape (noise floor)")
    ax.scatter(measured, in_sample, s=8, alpha=0.5, label="cost model, fitted on all")
    top = max(measured) * 1.05
    ax.plot([0, top], [0, top], color="grey", linewidth=1)
    ax.set_xlabel("measured forward (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.set_title("SmolLM2 forward: prediction against identical repeats")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
