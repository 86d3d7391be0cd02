"""How fast the simulator runs: wall time against simulated requests, and simulated time per real second.

    python benchmarks/simulate_speed.py [--requests 1000,10000,100000] [--rate 8] [--policies off,smartspec]

One `simulator.run.simulate` per (requests, policy) on the H200 Llama-2-7B profile, Poisson
arrivals at `--rate`, mean acceptance 0.7. Reports wall seconds, simulated seconds, their
ratio (x real time) and wall microseconds per request: constant per request is cost linear
in requests. The bar is on wall time; the process's CPU time and the host's load average are
recorded beside it, because on shared cores other jobs' work shows up as wall time.
Writes results.json and simulate_speed.png into the output directory.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402

from controller.profile import load_profile  # noqa: E402
from simulator.run import Workload, simulate  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="profiles/h200_transformers_eager.json#llama-7b")
    ap.add_argument("--requests", default="1000,10000,100000")
    ap.add_argument("--rate", type=float, default=8.0)
    ap.add_argument("--policies", default="off,smartspec")
    ap.add_argument("--output-dir", default="benchmarks/results/simulate_speed")
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    profile = load_profile(args.profile)
    rows = []
    for n in (int(x) for x in args.requests.split(",")):
        for policy in args.policies.split(","):
            start, cpu = time.perf_counter(), time.process_time()
            _, totals = simulate(profile, Workload(args.rate, n), policy, seed=0)
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu
            rows.append({"requests": n, "policy": policy, "wall_s": wall, "simulated_s": totals["simulated_s"],
                         "x_real_time": totals["simulated_s"] / wall, "steps": totals["steps"],
                         "us_per_request": wall / n * 1e6, "cpu_s": cpu, "x_real_time_cpu": totals["simulated_s"] / cpu,
                         "load_avg_1m": os.getloadavg()[0]})  # fmt: skip
            r = rows[-1]
            print(
                f"{n:7d} requests {policy:10s}: {wall:7.1f} s wall, {r['simulated_s']:8.0f} s simulated,"
                f" {r['x_real_time']:5.0f}x real time, {r['us_per_request']:6.0f} us a request"
                f" ({r['x_real_time_cpu']:.0f}x on CPU time, load {r['load_avg_1m']:.1f})",
                flush=True,
            )
    results = {"machine": machine_info(), "profile": args.profile, "rate": args.rate, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for policy in args.policies.split(","):
        pts = [r for r in rows if r["policy"] == policy]
        ax.loglog([r["requests"] for r in pts], [r["wall_s"] for r in pts], "o-", label=policy)
    ax.set_xlabel("simulated requests")
    ax.set_ylabel("wall time (s)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.savefig(out / "simulate_speed.png", dpi=110)
    print(f"wrote {out / 'results.json'}, {out / 'simulate_speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
