"""A fleet on a GPU profile: goodput per GPU for N verifiers and M proposer replicas, and the
proposer count each policy's drafting demand implies.

    python benchmarks/simulate_fleet.py [--verifiers 4] [--proposers 1,2,4] [--rates 8,32,64]
        [--policies off,fixed:3,smartspec] [--seeds 3] [--requests-per-verifier 150]

Every point is `simulator.run.simulate` with a `Fleet`: N verifiers (the 7B target's step
time from the H200 profile) behind a round-robin balancer, sharing M proposer replicas.
A replica drafts one sub-batch at a time: a lockstep draft step costs what the profile's
Llama-68M decode step costs on the same card (3.3 ms, flat in batch: eager, launch-bound),
plus a 0.5 ms hop; the verifiers' 100 ms deadline applies. Acceptance: Beta around 0.7.
Each proposer replica holds a GPU of its own (`--proposer-gpus`), so goodput per GPU is
output tokens per second over N + M GPUs.

The demand: replica-seconds of drafting per second of the run (`proposer_demand`), read
where proposers are plentiful (M = N); the replicas it implies at 70% target use are
ceil(demand / 0.7), the number an autoscaler on that signal would hold. Then one replica
of two goes down for a third of a run; and drafting pinned per request (what the
verifier's proposer client does) is set against a verifier's whole batch on one replica.
Writes results.json, table.md and fleet.png.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402

from controller.profile import load_profile  # noqa: E402
from simulator.acceptance import AcceptanceModel  # noqa: E402
from simulator.model import DraftCost, Outage  # noqa: E402
from simulator.run import Fleet, Workload, simulate  # noqa: E402

PROFILE = "profiles/h200_transformers_eager.json#llama-7b"
DRAFT = DraftCost(step_ms=3.3, per_token_ms=0.0, hop_ms=0.5, deadline_ms=100.0)
TARGET_USE = 0.7


def run_point(profile, rate, policy, seed, verifiers, proposers, args, outages=(), pin="request") -> dict:
    """`proposers` 0: no replicas at all (off drafts nothing; the fleet's one idle replica is not counted)."""
    workload = Workload(rate, args.requests_per_verifier * verifiers, (64, 512), (64, 256))
    fleet = Fleet(verifiers, max(proposers, 1), outages, pin=pin)
    start = time.perf_counter()
    requests, totals = simulate(profile, workload, policy, AcceptanceModel(args.acceptance), DRAFT, seed, fleet=fleet)
    wall = time.perf_counter() - start
    span = max(r.finish_s for r in requests) - min(r.arrival_s for r in requests)
    tokens = sum(r.output_tokens for r in requests)
    return {
        "rate": rate,
        "policy": policy,
        "seed": seed,
        "verifiers": verifiers,
        "proposers": proposers,
        "pin": pin,
        "mean_e2e_ms": 1e3 * statistics.fmean(r.finish_s - r.arrival_s for r in requests),
        "goodput_per_gpu": tokens / span / (verifiers + proposers * args.proposer_gpus),
        "proposer_demand": totals["proposer_demand"],
        "proposer_utilisation": totals["proposer_utilisation"],
        "proposer_failures": totals["proposer_failures"],
        "proposed_tokens": sum(r.proposed for r in requests),
        "wall_s": wall,
    }


def median_of(points, key, **match) -> float:
    return statistics.median(p[key] for p in points if all(p[k] == v for k, v in match.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verifiers", type=int, default=4)
    parser.add_argument("--proposers", default="1,2,4")
    parser.add_argument("--rates", default="8,32,64", help="fleet-wide request rates (requests/s)")
    parser.add_argument("--policies", default="off,fixed:3,smartspec")
    parser.add_argument("--acceptance", type=float, default=0.7)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--requests-per-verifier", type=int, default=150)
    parser.add_argument("--proposer-gpus", type=float, default=1.0)
    parser.add_argument("--output-dir", default="benchmarks/results/simulate_fleet")
    args = parser.parse_args()
    profile = load_profile(PROFILE)
    n = args.verifiers
    replicas = [int(m) for m in args.proposers.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    policies = args.policies.split(",")
    points = []
    for seed in range(args.seeds):
        for rate in rates:
            for policy in policies:
                for m in [0] if policy == "off" else replicas:  # off drafts nothing: no proposers
                    p = run_point(profile, rate, policy, seed, n, m, args)
                    points.append(p)
                    print(
                        f"rate {rate} {policy:<10} M={m} seed {seed}: mean {p['mean_e2e_ms']:.0f} ms, "
                        f"{p['goodput_per_gpu']:.0f} tok/s/GPU, demand {p['proposer_demand']:.2f}",
                        flush=True,
                    )
    # Demand read where proposers are plentiful, and what it implies.
    implied = {}
    for rate in rates:
        for policy in policies:
            if policy == "off":
                continue
            demand = median_of(points, "proposer_demand", rate=rate, policy=policy, proposers=max(replicas))
            implied[f"{rate}/{policy}"] = {"demand": demand, "replicas": max(1, math.ceil(demand / TARGET_USE))}
    # An outage: one replica of two down for the middle third of each run.
    outage_points = []
    for seed in range(args.seeds):
        for rate in rates:
            span = args.requests_per_verifier * n / rate
            for outages in ((), (Outage(1, span / 3, 2 * span / 3),)):
                p = run_point(profile, rate, "smartspec", seed, n, 2, args, outages)
                p["outage"] = bool(outages)
                outage_points.append(p)
    # Pinning: the proposer client's rendezvous per request against a verifier's whole batch on one replica.
    pin_points = [
        run_point(profile, rate, "smartspec", seed, n, max(replicas), args, pin=pin)
        for seed in range(args.seeds)
        for rate in rates
        for pin in ("request", "verifier")
    ]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "profile": PROFILE,
        "draft": vars(DRAFT),
        "acceptance": args.acceptance,
        "points": points,
        "implied_replicas": implied,
        "outage": outage_points,
        "pinning": pin_points,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    write_table(out, points, implied, outage_points, pin_points, rates, policies, replicas, n)
    plot(out, points, rates, policies, replicas)


def write_table(out, points, implied, outage_points, pin_points, rates, policies, replicas, n) -> None:
    lines = [
        f"Mean end-to-end latency (s) / goodput per GPU (tokens/s), {n} verifiers, M proposer replicas; medians:",
        "",
        "| rate (req/s) | "
        + " | ".join(f"{p} M={m}" for p in policies for m in ([0] if p == "off" else replicas))
        + " |",
        "|---|" + "---|" * sum(1 if p == "off" else len(replicas) for p in policies),
    ]
    for rate in rates:
        cells = []
        for policy in policies:
            for m in [0] if policy == "off" else replicas:
                mean = median_of(points, "mean_e2e_ms", rate=rate, policy=policy, proposers=m)
                good = median_of(points, "goodput_per_gpu", rate=rate, policy=policy, proposers=m)
                cells.append(f"{mean / 1e3:.2f} / {good:.0f}")
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Drafting demand (replica-seconds per second, at M={max(replicas)}) and the replicas it implies "
        f"at {TARGET_USE:.0%} use:",
        "",
        "| rate | policy | demand | replicas |",
        "|---|---|---|---|",
    ]
    for key, v in implied.items():
        rate, policy = key.split("/")
        lines.append(f"| {rate} | {policy} | {v['demand']:.2f} | {v['replicas']} |")
    lines += [
        "",
        "smartspec, M=2, one replica down for the middle third of the run (medians):",
        "",
        "| rate | healthy mean (s) | outage mean (s) | failed proposals |",
        "|---|---|---|---|",
    ]
    for rate in rates:
        healthy = median_of(outage_points, "mean_e2e_ms", rate=rate, outage=False)
        down = median_of(outage_points, "mean_e2e_ms", rate=rate, outage=True)
        failed = median_of(outage_points, "proposer_failures", rate=rate, outage=True)
        lines.append(f"| {rate} | {healthy / 1e3:.2f} | {down / 1e3:.2f} | {failed:.0f} |")
    lines += [
        "",
        f"smartspec, M={max(replicas)}: drafting pinned per request (the proposer client) or per verifier (medians):",
        "",
        "| rate | per request: mean (s) / demand | per verifier: mean (s) / demand |",
        "|---|---|---|",
    ]
    for rate in rates:
        cells = [
            f"{median_of(pin_points, 'mean_e2e_ms', rate=rate, pin=pin) / 1e3:.2f} / "
            f"{median_of(pin_points, 'proposer_demand', rate=rate, pin=pin):.2f}"
            for pin in ("request", "verifier")
        ]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(out, points, rates, policies, replicas) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(fig)
    lat, good = fig.subplots(1, 2)
    for policy in policies:
        for m in [0] if policy == "off" else replicas:
            label = policy if policy == "off" else f"{policy} M={m}"
            kw = {"proposers": m, "policy": policy}
            lat.plot(rates, [median_of(points, "mean_e2e_ms", rate=r, **kw) / 1e3 for r in rates], "o-", label=label)
            good.plot(rates, [median_of(points, "goodput_per_gpu", rate=r, **kw) for r in rates], "o-", label=label)
    lat.set(xlabel="fleet request rate (requests/s)", ylabel="mean end-to-end latency (s)", title="latency")
    good.set(xlabel="fleet request rate (requests/s)", ylabel="tokens/s per GPU", title="goodput per GPU")
    for ax in (lat, good):
        ax.grid(alpha=0.3)
    good.legend(fontsize=7)
    fig.savefig(out / "fleet.png", dpi=110)


if __name__ == "__main__":
    main()
