"""Proposer hop overhead: what a verifier pays per step to get drafts over gRPC, beyond drafting.

    python benchmarks/proposer_hop.py [--steps 400] [--output-dir benchmarks/results/proposer_hop]

Starts `smartspec proposer --ngram` as its own process on loopback and drives it
with the verifier's ProposerClient: B requests with 512-token contexts, each
step appending 1-4 accepted tokens per request and asking for k = 4 drafts. The
overhead of a step is the client's wall time minus the drafting time the
proposer reports (gRPC, serialisation, state updates on both sides).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.draft import DraftRequest  # noqa: E402
from runtime.sampler import SamplingParams  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402
from verifier_svc.proposer_client import ProposerClient  # noqa: E402


async def measure(address: str, batch: int, steps: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    client = ProposerClient([address], deadline_s=5.0)
    contexts = [[rng.randrange(49152) for _ in range(512)] for _ in range(batch)]
    overheads, totals = [], []
    for step in range(steps + 20):
        for ctx in contexts:
            ctx.extend(rng.randrange(49152) for _ in range(rng.randint(1, 4)))
        requests = [DraftRequest(f"r{i}", ctx, 4, SamplingParams()) for i, ctx in enumerate(contexts)]
        start = time.perf_counter()
        proposal = await client.propose(requests)
        wall_ms = (time.perf_counter() - start) * 1e3
        assert all(d is not None for d in proposal.drafts), "a proposal failed"
        if step >= 20:  # the first steps send full contexts
            totals.append(wall_ms)
            overheads.append(wall_ms - proposal.draft_ms)
    await client.close()
    return {
        "batch": batch,
        "median_overhead_ms": statistics.median(overheads),
        "p90_overhead_ms": sorted(overheads)[int(0.9 * len(overheads))],
        "median_step_ms": statistics.median(totals),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--port", type=int, default=50671)
    ap.add_argument("--output-dir", default="benchmarks/results/proposer_hop")
    args = ap.parse_args()
    proc = subprocess.Popen([sys.executable, "-m", "smartspec.cli", "proposer", "--ngram", "--port", str(args.port)])
    try:
        wait_serving(args.port, proc, 60)
        rows = [asyncio.run(measure(f"127.0.0.1:{args.port}", b, args.steps)) for b in (1, 16, 64)]
    finally:
        proc.terminate()
        proc.wait()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "steps": args.steps,
        "rows": rows,
    }
    (out / "results.json").write_text(json.dumps(record, indent=1))
    print("| B | median overhead (ms) | p90 overhead (ms) | median step incl. drafting (ms) |")
    print("|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['batch']} | {r['median_overhead_ms']:.3f} | {r['p90_overhead_ms']:.3f} | {r['median_step_ms']:.3f} |"
        )
    _plot(rows, out / "proposer_hop.png")


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar([str(r["batch"]) for r in rows], [r["median_overhead_ms"] for r in rows])
    ax.axhline(1.0, color="red", linestyle="--", label="1 ms target at B = 16")
    ax.set_xlabel("requests per step (B)")
    ax.set_ylabel("median hop overhead (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
