"""Per-step planning time of the goodput planner (the part that runs inside the verifier every step).

    python benchmarks/planner_time.py [--batch 64] [--k-max 8] [--steps 5000]

Times `controller.goodput.plan` (per-request and uniform) and the verifier's whole
`SpecPlanner.plan` (acceptance lookups, caps, the plan) on random acceptance rates
and a cost model fitted to a CPU-like step profile. Prints medians and p99 in
microseconds and writes benchmarks/results/planner_time.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controller.cost_model import CostModelFitter  # noqa: E402
from controller.goodput import Batch, plan  # noqa: E402
from controller.policy import Policy  # noqa: E402
from controller.step import StepRecord  # noqa: E402
from engine.planner import SpecPlanner  # noqa: E402
from engine.scheduler import ScheduledItem, Sequence  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402


def timed(fn, steps: int) -> dict:
    for _ in range(200):
        fn()
    samples = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    samples.sort()
    return {"median_us": statistics.median(samples), "p99_us": samples[int(0.99 * len(samples))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k-max", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5000)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    fitter = CostModelFitter()
    for _ in range(500):
        b = int(rng.integers(1, 65))
        tokens = b * int(rng.integers(1, 6))
        fitter.observe(
            StepRecord(
                batch_size=b,
                num_batched_tokens=tokens,
                num_kv_tokens=b * 300,
                verify_ms=40 + 8 * tokens + 0.002 * b * 300,
                planned_k=(2,) * b,
                propose_ms=3.0,
                draft_ms=2.5,
            )
        )
    cost = fitter.refit()
    b = args.batch
    rates, caps = rng.uniform(0, 1, b), np.full(b, args.k_max)
    batch = Batch(b, b, b * 300)
    planner = SpecPlanner(Policy.parse(f"smartspec:{args.k_max}"))
    planner.apply(planner.policy, cost)
    items = []
    for i in range(b):
        seq = Sequence(f"r{i}", list(range(300)), SamplingParams(max_new_tokens=256))
        seq.num_computed = 299
        items.append(ScheduledItem(seq, 1, sample=True))
        for _ in range(20):
            planner.acceptance.observe(seq.request_id, 4, int(rng.integers(0, 5)))
    results = {
        "batch": b,
        "k_max": args.k_max,
        "plan_per_request": timed(lambda: plan(rates, caps, cost, batch, args.k_max), args.steps),
        "plan_uniform": timed(lambda: plan(rates, caps, cost, batch, args.k_max, uniform=True), args.steps),
        "verifier_step_planning": timed(lambda: planner.plan(items), args.steps),
    }
    for name in ("plan_per_request", "plan_uniform", "verifier_step_planning"):
        r = results[name]
        print(f"{name:<24} median {r['median_us']:7.1f} us   p99 {r['p99_us']:7.1f} us")
    out = Path("benchmarks/results/planner_time.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
