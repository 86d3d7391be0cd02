"""The two front doors under the same load: one verifier process with gRPC and the OpenAI-compatible
HTTP API on loopback, the same rate sweep through each (`smartspec bench` and `--endpoint openai`).

    python benchmarks/front_doors.py [--rates 0.5,1,2] [--repeats 3] [--num-requests 16]

Latency through either door is mostly the engine's, and two runs never batch requests quite
alike, so the doors' own cost is measured per request as what the client saw beyond what the
server measured: client end-to-end minus the server's end-to-end (arrival in the engine to the
last chunk built). That difference covers transport, (de)serialization, validation and
tokenization, and delivering the last chunk. The door's added cost is the median of the HTTP
requests' difference minus the median of the gRPC requests', per (rate, repeat); the doors
alternate which goes first, after a warm-up run through each. Writes results.json and latency.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from machine import machine_info  # noqa: E402

from smartspec.bench import run_benchmark  # noqa: E402
from smartspec.prompts import load_prompts  # noqa: E402

DOORS = ("grpc", "openai")
# Short chat prompts: the doors' cost is per request, and long prompts would only make this CPU's
# engine the bottleneck (queueing that differs from run to run).
SHORT_PROMPTS = [
    "What is a KV cache?", "Name three prime numbers.", "Write a haiku about rain.", "What is 17 times 3?",
    "Say hello in French.", "Give me a synonym for fast.", "What colour is the sky?", "Define entropy briefly.",
    "Write a Python one-liner that sums a list.", "What is the capital of Japan?", "Tell me a fun fact.",
    "Translate 'good morning' to Spanish.",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_verifier(model: str, grpc_port: int, http_port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "smartspec.cli", "verifier", "--model", model, "--port", str(grpc_port),
           "--http-port", str(http_port), "--metrics-port", "0", "--cost-profile", "none"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "verifier ready" in line:
            return proc
    raise SystemExit(f"the verifier did not start (exit {proc.wait()})")


def door_overhead_ms(result: dict) -> float:
    """Median over requests of client end-to-end minus the server's own end-to-end."""
    return statistics.median(
        r["e2e_ms"] - r["server_timings"]["e2e_ms"] for r in result["requests"] if r["error"] is None
    )


def sweep(args, targets: dict[str, str]) -> list[dict]:
    prompts = load_prompts(args.prompts) if args.prompts else SHORT_PROMPTS
    for door in DOORS:  # warm-up (first forwards, the chat template's compilation), not recorded
        asyncio.run(run_benchmark(targets[door], prompts, 8.0, 8, 8, chat=True, progress=False, endpoint=door))
    points = []
    for rate in args.rates:
        for repeat in range(args.repeats):
            order = DOORS if repeat % 2 == 0 else DOORS[::-1]
            for door in order:
                result = asyncio.run(
                    run_benchmark(
                        targets[door], prompts, rate, args.num_requests, args.max_new_tokens, chat=True,
                        speculation="off", seed=args.seed + repeat, progress=False, endpoint=door,
                    )
                )  # fmt: skip
                s = result["summary"]
                point = {
                    "rate": rate, "repeat": repeat, "door": door, "errors": s["errors"],
                    "mean_e2e_ms": s["e2e_ms"]["mean"], "p50_e2e_ms": s["e2e_ms"]["p50"],
                    "p50_ttft_ms": s["ttft_ms"]["p50"], "door_overhead_ms": door_overhead_ms(result),
                }  # fmt: skip
                points.append(point)
                print(json.dumps(point), flush=True)
    return points


def summarize(points: list[dict], rates: list[float]) -> list[dict]:
    rows = []
    for rate in rates:
        at = [p for p in points if p["rate"] == rate]
        by = {d: [p for p in at if p["door"] == d] for d in DOORS}
        added = [
            h["door_overhead_ms"] - g["door_overhead_ms"]
            for g, h in zip(by["grpc"], by["openai"])  # same repeat: same prompts and arrivals
        ]
        row = {"rate": rate, "http_added_ms_median": statistics.median(added), "http_added_ms": added}
        for d in DOORS:
            row[f"{d}_door_overhead_ms_median"] = statistics.median(p["door_overhead_ms"] for p in by[d])
            row[f"{d}_mean_e2e_ms_median"] = statistics.median(p["mean_e2e_ms"] for p in by[d])
            row[f"{d}_p50_ttft_ms_median"] = statistics.median(p["p50_ttft_ms"] for p in by[d])
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    rates = [r["rate"] for r in rows]
    for door, label in (("grpc", "gRPC"), ("openai", "HTTP (OpenAI)")):
        left.plot(rates, [r[f"{door}_mean_e2e_ms_median"] for r in rows], marker="o", label=label)
        right.plot(rates, [r[f"{door}_door_overhead_ms_median"] for r in rows], marker="o", label=label)
    left.set(xlabel="request rate (req/s)", ylabel="mean end-to-end latency (ms)", title="Latency by front door")
    right.set(xlabel="request rate (req/s)", ylabel="client e2e - server e2e (ms)", title="The door's own cost")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 1.0, 2.0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument(
        "--prompts", default=None, help="a prompts file (`smartspec bench --prompts`); default: short ones"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="benchmarks/results/front_doors")
    args = parser.parse_args(argv)
    grpc_port, http_port = free_port(), free_port()
    proc = start_verifier(args.model, grpc_port, http_port)
    started = time.time()
    try:
        points = sweep(args, {"grpc": f"127.0.0.1:{grpc_port}", "openai": f"127.0.0.1:{http_port}"})
    finally:
        proc.terminate()
        proc.wait(60)
    rows = summarize(points, args.rates)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k != "output_dir"}
    result = {"machine": machine_info(), "config": config, "seconds": time.time() - started, "rows": rows}
    (out / "results.json").write_text(json.dumps(result | {"points": points}, indent=1))
    plot(rows, out / "latency.png")
    print(json.dumps(rows, indent=1))
    return 0 if all(p["errors"] == 0 for p in points) else 1


if __name__ == "__main__":
    sys.exit(main())
