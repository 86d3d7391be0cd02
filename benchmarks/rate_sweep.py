"""Request-rate sweep of speculation policies on the local stack: where fixed k stops helping.

    python benchmarks/rate_sweep.py [--draft smollm2-draft | --ngram] [--rates 0.25,0.5,1,2]
                                    [--policies off,fixed:1,fixed:3,fixed:5] [--repeats 1]

Starts `smartspec up` (proposer process + verifier process), then for each rate
runs `smartspec bench`'s load generator once per policy (a per-request
speculation override, so one stack serves all policies; the order rotates per
repetition), Poisson arrivals, the built-in prompts in the chat template.
Writes results.json and latency_vs_rate.png (mean and p99 end-to-end latency,
one line per policy) and prints a Markdown table of medians over repetitions.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smartspec.bench import run_benchmark  # noqa: E402
from smartspec.prompts import BUILTIN_PROMPTS  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402


def sweep(target: str, rates: list[float], policies: list[str], repeats: int, num_requests: int,
          max_new_tokens: int) -> list[dict]:
    points = []
    for rate in rates:
        for rep in range(repeats):
            order = policies[rep % len(policies):] + policies[:rep % len(policies)]
            for policy in order:
                result = asyncio.run(run_benchmark(target, BUILTIN_PROMPTS, rate, num_requests, max_new_tokens,
                                                   chat=True, speculation=policy, seed=rep, progress=False))
                s = result["summary"]
                points.append({"rate": rate, "policy": policy, "repeat": rep, "mean_e2e_ms": s["e2e_ms"]["mean"],
                               "p99_e2e_ms": s["e2e_ms"]["p99"], "acceptance": s["acceptance"],
                               "errors": s["errors"], "output_throughput": s["output_throughput"]})
                print(f"rate {rate}/s {policy:8} rep {rep}: mean {s['e2e_ms']['mean']:.0f} ms, "
                      f"p99 {s['e2e_ms']['p99']:.0f} ms, acceptance {s['acceptance']}", flush=True)
    return points


def medians(points: list[dict], key: str) -> dict[tuple[float, str], float]:
    groups: dict[tuple[float, str], list[float]] = {}
    for p in points:
        groups.setdefault((p["rate"], p["policy"]), []).append(p[key])
    return {k: statistics.median(v) for k, v in groups.items()}


def plot(points: list[dict], rates: list[float], policies: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, key, title in zip(axes, ("mean_e2e_ms", "p99_e2e_ms"), ("mean latency", "p99 latency")):
        m = medians(points, key)
        for policy in policies:
            ax.plot(rates, [m[(r, policy)] / 1e3 for r in rates], marker="o", label=policy)
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel(f"{title} (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--draft", default=None)
    kind.add_argument("--ngram", action="store_true")
    ap.add_argument("--rates", default="0.25,0.5,1,2")
    ap.add_argument("--policies", default="off,fixed:1,fixed:3,fixed:5")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=50691)
    ap.add_argument("--output-dir", default=None)
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    policies = args.policies.split(",")
    name = "ngram" if args.ngram else Path(args.draft or "smollm2-draft").name
    out = Path(args.output_dir or f"benchmarks/results/rate_sweep_{name}")
    kind = ["--ngram"] if args.ngram else ["--draft", args.draft or "smollm2-draft"]
    stack = subprocess.Popen([sys.executable, "-m", "smartspec.cli", "up", *kind, "--port", str(args.port),
                              "--proposer-port", str(args.port + 1), "--metrics-port", "0", "--policy", "off"])
    try:
        wait_serving(args.port, stack, 300)
        points = sweep(f"127.0.0.1:{args.port}", rates, policies, args.repeats, args.num_requests,
                       args.max_new_tokens)
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=120)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "proposer": name, "num_requests": args.num_requests, "max_new_tokens": args.max_new_tokens,
        "points": points}, indent=1))
    plot(points, rates, policies, out / "latency_vs_rate.png")
    mean, p99 = medians(points, "mean_e2e_ms"), medians(points, "p99_e2e_ms")
    print("\n| rate (req/s) | " + " | ".join(f"{p} mean / p99 (s)" for p in policies) + " |")
    print("|---|" + "---|" * len(policies))
    for r in rates:
        print(f"| {r} | " + " | ".join(f"{mean[(r, p)] / 1e3:.2f} / {p99[(r, p)] / 1e3:.2f}" for p in policies) + " |")


if __name__ == "__main__":
    main()
