"""Threads of a colocated draft proposer: what its thread count costs the verifier at batch 1.

    python benchmarks/proposer_threads.py [--threads 1,0] [--repeats 2] [--new-tokens 48]

`smartspec up` runs the proposer and the verifier on the same cores. For each
proposer thread count (0 = torch's default, all cores), a `smartspec proposer`
with the built-in draft is started as its own process and SmolLM2 in this
process decodes each prompt three times in a row: off, fixed k = 1 and fixed
k = 2. Time per output token of k = 1 and k = 2 is reported over off's, paired
per prompt (the three runs are seconds apart, so the drift of shared cores
cancels), as medians over prompts and repetitions.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculation import PROMPTS, run_engine  # noqa: E402

from drafting.builtin import builtin_draft_dir  # noqa: E402
from engine.config import CacheConfig, EngineConfig  # noqa: E402
from engine.engine import Engine  # noqa: E402
from runtime.models import load_model, load_tokenizer  # noqa: E402
from smartspec.up import wait_serving  # noqa: E402
from verifier_svc.proposer_client import ProposerClient  # noqa: E402

KS = (0, 1, 2)


def measure(threads: int, model, tok, ids: list[list[int]], repeats: int, new_tokens: int, port: int) -> dict:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "smartspec.cli",
            "proposer",
            "--draft",
            builtin_draft_dir(),
            "--port",
            str(port),
            "--threads",
            str(threads),
        ]
    )
    try:
        wait_serving(port, proc, 120)
        proposer = ProposerClient([f"127.0.0.1:{port}"], deadline_s=5.0)
        engine = Engine(model, tok, EngineConfig(CacheConfig(kv_cache_tokens=8192)), proposer)
        run_engine(engine, ids[:1], 8, 1)  # warm-up
        tpot = {k: [] for k in KS}
        for _ in range(repeats):
            for prompt in ids:
                for k in KS:
                    tpot[k].append(run_engine(engine, [prompt], new_tokens, k)["tpot_ms"])
    finally:
        proc.terminate()
        proc.wait()
    row = {"threads": threads, **{f"tpot_k{k}_ms": statistics.median(tpot[k]) for k in KS}}
    for k in KS[1:]:
        row[f"k{k}_over_off"] = statistics.median(a / b for a, b in zip(tpot[k], tpot[0]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,0", help="proposer thread counts to compare (0 = torch's default)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--port", type=int, default=50685)
    ap.add_argument("--output-dir", default="benchmarks/results/proposer_threads")
    args = ap.parse_args()
    tok = load_tokenizer("smollm2")
    model = load_model("smollm2")
    ids = [
        tok.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        for p in PROMPTS
    ]
    rows = [measure(int(t), model, tok, ids, args.repeats, args.new_tokens, args.port) for t in args.threads.split(",")]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(
        json.dumps(
            {
                "date": datetime.datetime.now().isoformat(timespec="seconds"),
                "command": " ".join(sys.argv),
                "repeats": args.repeats,
                "new_tokens": args.new_tokens,
                "rows": rows,
            },
            indent=1,
        )
    )
    _plot(rows, out / "proposer_threads.png")
    print(
        "| proposer threads | off TPOT (ms) | k = 1 TPOT (ms) | k = 2 TPOT (ms) | k = 1 / off (paired) "
        "| k = 2 / off (paired) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = r["threads"] or "default (all cores)"
        print(
            f"| {name} | {r['tpot_k0_ms']:.1f} | {r['tpot_k1_ms']:.1f} | {r['tpot_k2_ms']:.1f} | "
            f"{r['k1_over_off']:.2f} | {r['k2_over_off']:.2f} |"
        )


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    width = 0.8 / len(rows)
    for i, r in enumerate(rows):
        ax.bar(
            [k + i * width for k in KS[1:]],
            [r[f"k{k}_over_off"] for k in KS[1:]],
            width,
            label=f"proposer threads: {r['threads'] or 'default'}",
        )
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in KS[1:]], [f"k = {k}" for k in KS[1:]])
    ax.set_ylabel("TPOT / TPOT off (paired)")
    ax.set_title("Batch 1, SmolLM2 + built-in draft, shared cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
