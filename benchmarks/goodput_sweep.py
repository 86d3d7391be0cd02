"""The goodput sweep: request rates x policies on the local stack, for both workloads.

    python benchmarks/goodput_sweep.py [--workload ngram-grounded|draft-chat-code|both]
        [--rates 0.25,1,2] [--repeats 3] [--num-requests 10] [--max-new-tokens 48] [--tables-only]

For each workload it starts `smartspec up` (proposer, controller and verifier
processes), then runs `smartspec bench`'s sweep: every policy at every rate,
repeated, set through the controller so requests ask for nothing themselves.
Workloads: SmolLM2 + n-gram lookup on the grounded prompts (rewrites of a
passage in the prompt), and SmolLM2 + the built-in draft on the built-in
chat/code prompts. Writes, per workload, results.json, latency_vs_rate.png,
p99_vs_rate.png and table.md under benchmarks/results/goodput_sweep_<workload>/,
with the controller's cost-model error and the smartspec-vs-best ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import signal
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smartspec import sweep  # noqa: E402
from smartspec.prompts import load_prompts  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402

WORKLOADS = {"ngram-grounded": (["--ngram"], "grounded"), "draft-chat-code": (["--draft", "smollm2-draft"], "builtin")}
FIXED = ("off", "fixed:1", "fixed:3", "fixed:5")
POLICIES = [*FIXED, "smartspec", "smartspec-uniform"]


def ratios(points: list[dict], rates: list[float]) -> list[dict]:
    """Per rate: smartspec's median mean latency over the best fixed policy's, and over off's."""
    mean = sweep.medians(points, "mean_e2e_ms")
    rows = []
    for r in rates:
        fixed = {p: mean[(r, p)] for p in FIXED if mean.get((r, p))}
        best = min(fixed, key=fixed.get)
        rows.append(
            {
                "rate": r,
                "best_fixed": best,
                "smartspec_over_best": mean[(r, "smartspec")] / fixed[best],
                "uniform_over_best": mean[(r, "smartspec-uniform")] / fixed[best],
                "smartspec_over_uniform": mean[(r, "smartspec")] / mean[(r, "smartspec-uniform")],
                "off_over_smartspec": fixed["off"] / mean[(r, "smartspec")],
            }
        )
    return rows


def paired(points: list[dict], rates: list[float]) -> list[dict]:
    """Per rate: the median over repetitions of each repetition's ratio. A repetition runs every
    policy on the same arrivals, so this removes the swing of the arrivals between repetitions."""
    mean = {(p["rate"], p["policy"], p["repeat"]): p["mean_e2e_ms"] for p in points}
    rows = []
    for r in rates:
        reps = sorted({rep for rate, _, rep in mean if rate == r})
        best = {i: min(mean[(r, p, i)] for p in FIXED if (r, p, i) in mean) for i in reps}
        per_rep = [mean[(r, "smartspec", i)] / best[i] for i in reps]
        rows.append(
            {
                "rate": r,
                "smartspec_over_best": statistics.median(per_rep),
                "uniform_over_best": statistics.median(mean[(r, "smartspec-uniform", i)] / best[i] for i in reps),
                "smartspec_over_uniform": statistics.median(
                    mean[(r, "smartspec", i)] / mean[(r, "smartspec-uniform", i)] for i in reps
                ),
                "off_over_smartspec": statistics.median(mean[(r, "off", i)] / mean[(r, "smartspec", i)] for i in reps),
                "smartspec_over_best_per_repetition": per_rep,
            }
        )
    return rows


def controller_view(port: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "smartspec.cli", "ctl", "--controller", f"127.0.0.1:{port}", "get"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(out.stdout)


def run_workload(name: str, args) -> None:
    up_args, prompts = WORKLOADS[name]
    port = args.port
    ctl_port = port + 2
    stack = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartspec.cli",
            "up",
            *up_args,
            "--port",
            str(port),
            "--proposer-port",
            str(port + 1),
            "--controller-port",
            str(ctl_port),
            "--metrics-port",
            "0",
            "--policy",
            "smartspec",
        ]
    )
    rates = [float(r) for r in args.rates.split(",")]
    try:
        wait_serving(port, stack, 300)
        points = asyncio.run(
            sweep.run_sweep(
                f"127.0.0.1:{port}",
                load_prompts(prompts),
                rates,
                POLICIES,
                args.repeats,
                args.num_requests,
                args.max_new_tokens,
                chat=True,
                controller=f"127.0.0.1:{ctl_port}",
            )
        )
        controller = controller_view(ctl_port)
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=120)
    out = Path(args.output_dir) / f"goodput_sweep_{name}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
                "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
                "workload": name,
                "prompts": prompts,
                "rates": rates,
                "policies": POLICIES,
                "repeats": args.repeats,
                "num_requests": args.num_requests,
                "max_new_tokens": args.max_new_tokens,
                "points": points,
                "ratios": ratios(points, rates),
                "paired": paired(points, rates),
                "controller_at_end": controller,
            },
            indent=1,
        )
    )
    sweep.plot(points, rates, POLICIES, out)
    write_tables(out)


def write_tables(out: Path) -> None:
    """table.md from the results.json in `out`."""
    res = json.loads((out / "results.json").read_text())
    points, rates = res["points"], res["rates"]
    lines = [
        f"### {res['workload']}",
        "",
        sweep.markdown_table(points, rates, POLICIES),
        "",
        "Ratios of the medians:",
        "",
        "| rate | best fixed | smartspec / best | uniform / best | smartspec / uniform | off / smartspec |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rate']} | {r['best_fixed']} | {r['smartspec_over_best']:.2f} | {r['uniform_over_best']:.2f} | "
        f"{r['smartspec_over_uniform']:.2f} | {r['off_over_smartspec']:.2f} |"
        for r in ratios(points, rates)
    ]
    lines += [
        "",
        "Paired (the median over repetitions of each repetition's ratio):",
        "",
        "| rate | smartspec / best | uniform / best | smartspec / uniform | off / smartspec | "
        "smartspec / best per repetition |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['rate']} | {r['smartspec_over_best']:.2f} | {r['uniform_over_best']:.2f} | "
        f"{r['smartspec_over_uniform']:.2f} | {r['off_over_smartspec']:.2f} | "
        f"{', '.join(f'{x:.2f}' for x in r['smartspec_over_best_per_repetition'])} |"
        for r in paired(points, rates)
    ]
    controller = res["controller_at_end"]
    cost = controller["cost_model"]
    lines += [
        "",
        f"Controller at the end: cost-model median relative error {cost['verify_relative_error']:.3f} "
        f"over recent live steps ({cost['steps_fitted']} steps fitted), acceptance prior "
        f"{controller['acceptance_prior']:.3f}.",
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="both", choices=[*WORKLOADS, "both"])
    ap.add_argument("--rates", default="0.25,1,2")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-requests", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=50791)
    ap.add_argument("--output-dir", default="benchmarks/results")
    ap.add_argument("--tables-only", action="store_true", help="rewrite table.md from the saved results.json")
    args = ap.parse_args()
    if args.tables_only:
        for name in WORKLOADS if args.workload == "both" else [args.workload]:
            write_tables(Path(args.output_dir) / f"goodput_sweep_{name}")
        return
    for name in WORKLOADS if args.workload == "both" else [args.workload]:
        run_workload(name, args)


if __name__ == "__main__":
    main()
