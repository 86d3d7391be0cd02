"""The goodput sweep: request rates x policies on the local stack, for both workloads.

    python benchmarks/goodput_sweep.py [--workload ngram-grounded|draft-chat-code|both]
        [--rates 0.25,1,2] [--repeats 3] [--num-requests 10] [--max-new-tokens 48]

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
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from smartspec import sweep  # noqa: E402
from smartspec.prompts import load_prompts  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402

WORKLOADS = {
    "ngram-grounded": (["--ngram"], "grounded"),
    "draft-chat-code": (["--draft", "smollm2-draft"], "builtin"),
}
POLICIES = ["off", "fixed:1", "fixed:3", "fixed:5", "smartspec", "smartspec-uniform"]


def ratios(points: list[dict], rates: list[float]) -> list[dict]:
    """Per rate: smartspec's median mean latency over the best fixed policy's, and over off's."""
    mean = sweep.medians(points, "mean_e2e_ms")
    rows = []
    for r in rates:
        fixed = {p: mean[(r, p)] for p in ("off", "fixed:1", "fixed:3", "fixed:5") if mean.get((r, p))}
        best = min(fixed, key=fixed.get)
        rows.append({"rate": r, "best_fixed": best,
                     "smartspec_over_best": mean[(r, "smartspec")] / fixed[best],
                     "uniform_over_best": mean[(r, "smartspec-uniform")] / fixed[best],
                     "smartspec_over_uniform": mean[(r, "smartspec")] / mean[(r, "smartspec-uniform")],
                     "off_over_smartspec": fixed["off"] / mean[(r, "smartspec")]})
    return rows


def controller_view(port: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "smartspec.cli", "ctl", "--controller", f"127.0.0.1:{port}", "get"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def run_workload(name: str, args) -> None:
    up_args, prompts = WORKLOADS[name]
    port = args.port
    ctl_port = port + 2
    stack = subprocess.Popen([sys.executable, "-m", "smartspec.cli", "up", *up_args, "--port", str(port),
                              "--proposer-port", str(port + 1), "--controller-port", str(ctl_port),
                              "--metrics-port", "0", "--policy", "smartspec"])
    rates = [float(r) for r in args.rates.split(",")]
    try:
        wait_serving(port, stack, 300)
        points = asyncio.run(sweep.run_sweep(
            f"127.0.0.1:{port}", load_prompts(prompts), rates, POLICIES, args.repeats, args.num_requests,
            args.max_new_tokens, chat=True, controller=f"127.0.0.1:{ctl_port}"))
        controller = controller_view(ctl_port)
    finally:
        stack.send_signal(signal.SIGTERM)
        stack.wait(timeout=120)
    out = Path(args.output_dir) / f"goodput_sweep_{name}"
    out.mkdir(parents=True, exist_ok=True)
    table = sweep.markdown_table(points, rates, POLICIES)
    summary = ratios(points, rates)
    (out / "results.json").write_text(json.dumps({
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "command": " ".join(sys.argv),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "workload": name,
        "prompts": prompts, "rates": rates, "policies": POLICIES, "repeats": args.repeats,
        "num_requests": args.num_requests, "max_new_tokens": args.max_new_tokens, "points": points,
        "ratios": summary, "controller_at_end": controller}, indent=1))
    sweep.plot(points, rates, POLICIES, out)
    lines = [f"### {name}", "", table, "", "| rate | best fixed | smartspec / best | uniform / best | "
             "smartspec / uniform | off / smartspec |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['rate']} | {r['best_fixed']} | {r['smartspec_over_best']:.2f} | {r['uniform_over_best']:.2f} | "
              f"{r['smartspec_over_uniform']:.2f} | {r['off_over_smartspec']:.2f} |" for r in summary]
    cost = controller["cost_model"]
    lines += ["", f"Controller at the end: cost-model median relative error {cost['verify_relative_error']:.3f} "
                  f"over recent live steps ({cost['steps_fitted']} steps fitted), acceptance prior "
                  f"{controller['acceptance_prior']:.3f}."]
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
    args = ap.parse_args()
    for name in WORKLOADS if args.workload == "both" else [args.workload]:
        run_workload(name, args)


if __name__ == "__main__":
    main()
