"""Does the simulator predict the live stack? The same sweep, run live and simulated.

    python benchmarks/simulate_validate.py [--workload draft-chat-code|ngram-grounded|both]
        [--rates 0.5,2,4] [--repeats 3] [--num-requests 10] [--max-new-tokens 48] [--sim-seeds 3]
        [--resimulate] [--fit-on preceding|profiling|all]   # --resimulate: the simulated half only

Live: `smartspec up` (proposer, controller, verifier with --step-log) on this machine.
First a profiling load on other prompts and arrivals (seed 1000; off, fixed:2 and fixed:4,
8 requests each at 0.5 and at 4 req/s: batches from one request to many); then
`smartspec bench`'s sweep (every policy at every rate, repeated, set through the
controller), each request's speculative rounds traced.

Simulated: for every live point, `simulator.run.simulate` replays that point's requests
(send times, prompt and output tokens) through the engine's own step loop, with
- the target's step time, the proposer's cost and the host's work per step fitted
  (`simulator.trace.fit_step_log`) on the 600 steps the verifier logged just before the
  point started, under other policies and rates, never on the point's own: on shared
  cores the host's speed drifts by 10-30% within a sweep, and a profile from its start
  would misjudge its end (`--fit-on profiling` does that; `--fit-on all` fits on every
  step, a diagnostic); the verifier's cache and scheduler settings come from its log;
- each request's acceptance per draft position from its traced rounds, pooled over the
  sweep's points of that repetition (`simulator.trace.acceptance`): an input, like the
  cost; what is predicted is queueing, batching, the planner's choices and latency.
Each point is simulated with `--sim-seeds` seeds (the acceptance draws) and averaged.

Reported per point: live and simulated mean end-to-end latency and their ratio; per rate,
the ranking of policies by the median over repetitions, live and simulated. Writes
live.json, steps.jsonl.gz, results.json, table.md and validation.png per workload.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gzip
import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402

from controller.profile import StepLog, read_step_log  # noqa: E402
from simulator.run import simulate  # noqa: E402
from simulator.trace import acceptance, fit_step_log, replays  # noqa: E402
from smartspec import sweep  # noqa: E402
from smartspec.prompts import load_prompts  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402

WORKLOADS = {"draft-chat-code": (["--draft", "smollm2-draft"], "builtin"), "ngram-grounded": (["--ngram"], "grounded")}
POLICIES = ["off", "fixed:1", "fixed:3", "smartspec"]
PROFILE_POLICIES = ["off", "fixed:2", "fixed:4"]
PROFILE_RATES = [0.5, 4.0]
PROFILE_REQUESTS = 8
PROFILE_SEED = 1000  # other prompts and arrivals than the sweep's
TOLERANCE = 0.15
PRECEDING_STEPS = 600  # steps before a point that its costs are fitted on (--fit-on preceding)
# Live medians closer than this are a tie for the ranking: one point's repetitions spread wider.
TIE = 0.05
PROPOSER_DEADLINE_MS = 100.0  # the verifier's default --proposer-deadline-ms


def run_live(name: str, args, out: Path) -> None:
    up_args, prompts = WORKLOADS[name]
    port, log = args.port, out / "steps.jsonl"
    log.unlink(missing_ok=True)
    stack = subprocess.Popen(
        [sys.executable, "-m", "smartspec.cli", "up", *up_args, "--port", str(port), "--proposer-port",
         str(port + 1), "--controller-port", str(port + 2), "--metrics-port", "0", "--step-log", str(log)]
    )  # fmt: skip
    controller = f"127.0.0.1:{port + 2}"
    common = dict(num_requests=args.num_requests, max_new_tokens=args.max_new_tokens, chat=True, controller=controller)
    try:
        wait_serving(port, stack, 600)
        target = f"127.0.0.1:{port}"
        profiling = {**common, "num_requests": PROFILE_REQUESTS}
        asyncio.run(
            sweep.run_sweep(
                target, load_prompts(prompts), PROFILE_RATES, PROFILE_POLICIES, 1, seed=PROFILE_SEED, **profiling
            )
        )
        sweep_start = time.monotonic()
        rates = [float(r) for r in args.rates.split(",")]
        points = asyncio.run(sweep.run_sweep(target, load_prompts(prompts), rates, POLICIES, args.repeats, **common))
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=180)
    (out / "steps.jsonl.gz").write_bytes(gzip.compress(log.read_bytes()))
    log.unlink()
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": machine_info(),
        "workload": name,
        "rates": rates,
        "policies": POLICIES,
        "repeats": args.repeats,
        "num_requests": args.num_requests,
        "max_new_tokens": args.max_new_tokens,
        "sweep_start": sweep_start,
        "points": points,
    }
    (out / "live.json").write_text(json.dumps(record, indent=1) + "\n")


def steps_before(log: StepLog, before: float, last: int | None = None) -> StepLog:  # the last `last`
    keep = [i for i, end in enumerate(log.ends) if end < before][-last if last else None :]
    return StepLog(log.config, [log.steps[i] for i in keep], [log.ends[i] for i in keep])


def steps_for(point: dict, live: dict, log: StepLog, fit_on: str) -> StepLog:
    """What a point's costs are fitted on: the profiling load; every step of the run (a
    diagnostic, the point's own steps included); or the steps just before the point started,
    under other policies and rates, which follow a shared host's speed as it drifts."""
    if fit_on == "profiling":
        return steps_before(log, live["sweep_start"])
    if fit_on == "all":
        return log
    return steps_before(log, point["started_at"], PRECEDING_STEPS)


def run_simulated(live: dict, log: StepLog, seeds: int, fit_on: str = "preceding") -> tuple[list[dict], dict]:
    workloads = replays(live)
    traced = {rep: acceptance(live, rep) for rep in {p["repeat"] for p in live["points"]}}
    points, fits = [], []
    for p in live["points"]:
        fit = fit_step_log(steps_for(p, live, log, fit_on), PROPOSER_DEADLINE_MS)
        fits.append(fit)
        means = []
        for seed in range(seeds):
            requests, _ = simulate(
                fit.profile, workloads[(p["rate"], p["policy"], p["repeat"])], p["policy"],
                traced[p["repeat"]], fit.draft, seed, fit.cache, fit.scheduler, fit.host_ms,
            )  # fmt: skip
            means.append(np.mean([1e3 * (r.finish_s - r.arrival_s) for r in requests]))
        points.append(
            {
                **{k: p[k] for k in ("rate", "policy", "repeat")},
                "mean_e2e_ms": float(np.mean(means)),
                # The fitted batch-1 decode step: how fast the host was around this point.
                "decode_ms": float(fit.cost.verify_ms(1, 1, 200)),
            }
        )
    fitted = {
        "fit_on": fit_on,
        "profiling_steps": int(np.median([len(f.profile) for f in fits])),
        "host_ms": float(np.median([f.host_ms for f in fits])),
        "draft": {
            "step_ms": float(np.median([f.draft.step_ms for f in fits])),
            "per_token_ms": float(np.median([f.draft.per_token_ms for f in fits])),
            "hop_ms": float(np.median([f.draft.hop_ms for f in fits])),
        },
        "decode_ms_range": [min(p["decode_ms"] for p in points), max(p["decode_ms"] for p in points)],
    }
    return points, fitted


def compare(live: dict, simulated: list[dict]) -> dict:
    sim = {(p["rate"], p["policy"], p["repeat"]): p["mean_e2e_ms"] for p in simulated}
    per_point = [
        {
            "rate": p["rate"],
            "policy": p["policy"],
            "repeat": p["repeat"],
            "live_ms": p["mean_e2e_ms"],
            "sim_ms": sim[(p["rate"], p["policy"], p["repeat"])],
            "sim_over_live": sim[(p["rate"], p["policy"], p["repeat"])] / p["mean_e2e_ms"],
        }
        for p in live["points"]
    ]
    live_med = sweep.medians(live["points"], "mean_e2e_ms")
    sim_med = sweep.medians(simulated, "mean_e2e_ms")
    per_rate = []
    for r in live["rates"]:
        live_rank = sorted(live["policies"], key=lambda p: live_med[(r, p)])
        sim_rank = sorted(live["policies"], key=lambda p: sim_med[(r, p)])
        ratios = {p: sim_med[(r, p)] / live_med[(r, p)] for p in live["policies"]}
        # Pairs the live run separates by more than a tie: does the simulation order them alike?
        pairs = [(a, b) for i, a in enumerate(live_rank) for b in live_rank[i + 1 :]]
        separated = [(a, b) for a, b in pairs if live_med[(r, b)] > (1 + TIE) * live_med[(r, a)]]
        agree = [(a, b) for a, b in separated if sim_med[(r, a)] < sim_med[(r, b)]]
        per_rate.append(
            {
                "rate": r,
                "live_rank": live_rank,
                "sim_rank": sim_rank,
                "median_ratio": ratios,
                "separated_pairs": len(separated),
                "separated_pairs_same_order": len(agree),
            }
        )
    within = [abs(x["sim_over_live"] - 1) <= TOLERANCE for x in per_point]
    medians_within = [abs(v - 1) <= TOLERANCE for row in per_rate for v in row["median_ratio"].values()]
    return {
        "per_point": per_point,
        "per_rate": per_rate,
        "points_within": f"{sum(within)}/{len(within)}",
        "medians_within": f"{sum(medians_within)}/{len(medians_within)}",
        "same_ranking": [row["live_rank"] == row["sim_rank"] for row in per_rate],
        "separated_pairs_same_order": f"{sum(r['separated_pairs_same_order'] for r in per_rate)}"
        f"/{sum(r['separated_pairs'] for r in per_rate)}",
    }


def write_table(out: Path, res: dict, name: str = "table.md") -> None:
    c, fit = res["comparison"], res["fitted"]
    lines = [
        f"### {res['workload']}",
        "",
        f"Costs fitted on {fit['fit_on']} steps ({fit['profiling_steps']} per point, median): host "
        f"{fit['host_ms']:.2f} ms/step, draft step {fit['draft']['step_ms']:.2f} ms + "
        f"{fit['draft']['per_token_ms']:.2f} ms/token, hop {fit['draft']['hop_ms']:.2f} ms; the batch-1 "
        f"decode step {fit['decode_ms_range'][0]:.1f}-{fit['decode_ms_range'][1]:.1f} ms across the points.",
        "",
        "| rate | policy | live mean (s), per repetition | simulated | simulated / live |",
        "|---|---|---|---|---|",
    ]
    rows: dict[tuple, list] = {}
    for x in c["per_point"]:
        rows.setdefault((x["rate"], x["policy"]), []).append(x)
    for (rate, policy), xs in rows.items():
        live_s = ", ".join(f"{x['live_ms'] / 1e3:.2f}" for x in xs)
        sim_s = ", ".join(f"{x['sim_ms'] / 1e3:.2f}" for x in xs)
        ratio = ", ".join(f"{x['sim_over_live']:.2f}" for x in xs)
        lines.append(f"| {rate} | {policy} | {live_s} | {sim_s} | {ratio} |")
    lines += [
        "",
        "| rate | live ranking (median) | simulated ranking | simulated / live, medians | pairs apart |",
        "|---|---|---|---|---|",
    ]
    for row in c["per_rate"]:
        ratios = ", ".join(f"{p} {v:.2f}" for p, v in row["median_ratio"].items())
        ranks = f"{' < '.join(row['live_rank'])} | {' < '.join(row['sim_rank'])}"
        apart = f"{row['separated_pairs_same_order']}/{row['separated_pairs']}"
        lines.append(f"| {row['rate']} | {ranks} | {ratios} | {apart} |")
    lines += [
        "",
        f"Points within {TOLERANCE:.0%}: {c['points_within']}; medians within: {c['medians_within']}; "
        f"same ranking per rate: {c['same_ranking']}; pairs of policies whose live medians differ by more "
        f"than {TIE:.0%}, ordered alike by the simulation: {c['separated_pairs_same_order']}.",
    ]
    (out / name).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(out: Path, live: dict, simulated: list[dict], name: str = "validation.png") -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    live_med, sim_med = sweep.medians(live["points"], "mean_e2e_ms"), sweep.medians(simulated, "mean_e2e_ms")
    rates = live["rates"]
    for i, policy in enumerate(live["policies"]):
        color = f"C{i}"
        ax.plot(rates, [live_med[(r, policy)] / 1e3 for r in rates], "o-", color=color, label=f"{policy} live")
        ax.plot(rates, [sim_med[(r, policy)] / 1e3 for r in rates], "s--", color=color, label=f"{policy} simulated")
    ax.set_xlabel("request rate (requests/s)")
    ax.set_ylabel("mean end-to-end latency (s)")
    ax.set_title(f"live vs simulated: {live['workload']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(out / name, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="both", choices=[*WORKLOADS, "both"])
    parser.add_argument("--rates", default="0.5,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--sim-seeds", type=int, default=3)
    parser.add_argument("--port", type=int, default=52051)
    parser.add_argument("--resimulate", action="store_true", help="reuse live.json and steps.jsonl")
    parser.add_argument(
        "--fit-on",
        default="preceding",
        choices=["preceding", "profiling", "all"],
        help="steps each point's costs are fitted on: the 600 before it started, the profiling load, or all",
    )
    parser.add_argument("--output-dir", default="benchmarks/results")
    args = parser.parse_args()
    for name in WORKLOADS if args.workload == "both" else [args.workload]:
        out = Path(args.output_dir) / f"simulate_validate_{name}"
        out.mkdir(parents=True, exist_ok=True)
        if not args.resimulate:
            run_live(name, args, out)
        live = json.loads((out / "live.json").read_text())
        start = time.perf_counter()
        simulated, fitted = run_simulated(live, read_step_log(str(out / "steps.jsonl.gz")), args.sim_seeds, args.fit_on)
        res = {
            "workload": name,
            "live_date": live["date"],
            "simulated_date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": live["machine"],
            "fitted": fitted,
            "simulated_points": simulated,
            "simulate_wall_s": time.perf_counter() - start,
            "comparison": compare(live, simulated),
        }
        suffix = "" if args.fit_on == "preceding" else f"_fit_on_{args.fit_on}"
        (out / f"results{suffix}.json").write_text(json.dumps(res, indent=1) + "\n")
        write_table(out, res, f"table{suffix}.md")
        plot(out, live, simulated, f"validation{suffix}.png")
        error = statistics.median(abs(x["sim_over_live"] - 1) for x in res["comparison"]["per_point"])
        print(f"median |simulated / live - 1|: {error:.3f}")


if __name__ == "__main__":
    main()
