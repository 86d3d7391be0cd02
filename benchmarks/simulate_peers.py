"""SmartSpec's policies against static k and the peers' rules, simulated on a GPU cost profile.

    python benchmarks/simulate_peers.py [--profile profiles/h200_transformers_eager.json#llama-7b]
        [--acceptances 0.5,0.6,0.7,0.8] [--rates 2,8,16] [--seeds 5] [--num-requests 200]

Every point is `simulator.run.simulate`: the engine's own step loop on a virtual clock, the
target's step time from the profile, each request's drafts kept with its own rate (Beta
around the mean acceptance, concentration 20), a draft step of `--draft-step-ms` per
lockstep step plus `--hop-ms`. For each acceptance and rate, every policy runs on the same
arrivals per seed; reported are the medians over seeds of mean end-to-end latency, and
per seed the ratio of `smartspec` to the best static policy (off or fixed:1..8, the best
chosen per seed in hindsight), to off and to each peer. Writes results.json and
simulate_peers.png into the output directory.
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

from machine import machine_info  # noqa: E402

from controller.policy import MAX_K  # noqa: E402
from controller.profile import load_profile  # noqa: E402
from simulator.acceptance import AcceptanceModel  # noqa: E402
from simulator.model import DraftCost  # noqa: E402
from simulator.peers import PEERS  # noqa: E402
from simulator.run import Workload, simulate  # noqa: E402

STATIC = ["off"] + [f"fixed:{k}" for k in range(1, MAX_K + 1)]
OURS = ["smartspec", "smartspec-uniform"]


def mean_e2e_s(requests) -> float:
    return float(np.mean([r.finish_s - r.arrival_s for r in requests]))


def plot(rows: list[dict], acceptances: list[float], rates: list[float], out: Path) -> None:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * len(acceptances), 4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(acceptances), squeeze=False)[0]
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    palette = matplotlib.colormaps["tab20"]  # 13 policies: the default cycle repeats after 10
    for ax, acc in zip(axes, acceptances):
        for i, policy in enumerate(policies):
            ys = [next(r["median_mean_e2e_s"] for r in rows if r["acceptance"] == acc and r["rate"] == rate
                       and r["policy"] == policy) for rate in rates]  # fmt: skip
            style = "-" if policy in OURS else (":" if policy in STATIC else "--")
            width = 2.5 if policy == "smartspec" else 1.2
            ax.plot(rates, ys, style, marker="o", color=palette(i), label=policy, linewidth=width)
        ax.set_title(f"mean acceptance {acc}")
        ax.set_xlabel("request rate (requests/s)")
        ax.set_ylabel("mean end-to-end latency (s)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7)
    fig.savefig(out / "simulate_peers.png", dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="profiles/h200_transformers_eager.json#llama-7b")
    ap.add_argument("--acceptances", default="0.5,0.6,0.7,0.8")
    ap.add_argument("--rates", default="2,8,16")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--draft-step-ms", type=float, default=1.0)
    ap.add_argument("--hop-ms", type=float, default=0.5)
    ap.add_argument("--output-dir", default="benchmarks/results/simulate_peers")
    args = ap.parse_args()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    acceptances = [float(a) for a in args.acceptances.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    profile = load_profile(args.profile)
    draft = DraftCost(args.draft_step_ms, 0.0, args.hop_ms)
    policies = STATIC + OURS + list(PEERS)
    rows, ratios = [], []
    start = time.perf_counter()
    for acc in acceptances:
        model = AcceptanceModel(acc, 20.0)
        for rate in rates:
            work = Workload(rate, args.num_requests)
            by_seed = [
                {p: mean_e2e_s(simulate(profile, work, p, model, draft, seed)[0]) for p in policies}
                for seed in range(args.seeds)
            ]
            for p in policies:
                rows.append({"acceptance": acc, "rate": rate, "policy": p,
                             "median_mean_e2e_s": statistics.median(s[p] for s in by_seed),
                             "per_seed": [s[p] for s in by_seed]})  # fmt: skip
            ratio = {"acceptance": acc, "rate": rate}
            for name, base in [("best_static", None), ("off", "off"), *[(p, p) for p in PEERS]]:
                per_seed = [s["smartspec"] / (min(s[q] for q in STATIC) if base is None else s[base]) for s in by_seed]
                ratio[name] = statistics.median(per_seed)
            ratios.append(ratio)
            print(
                f"acceptance {acc} rate {rate}: smartspec / best static {ratio['best_static']:.3f}, / off"
                f" {ratio['off']:.3f}; " + ", ".join(f"/{p} {ratio[p]:.2f}" for p in PEERS),
                flush=True,
            )
    results = {
        "machine": machine_info(),
        "profile": args.profile,
        "draft": {"step_ms": draft.step_ms, "hop_ms": draft.hop_ms},
        "workload": {
            "num_requests": args.num_requests,
            "prompt_len": Workload(1.0).prompt_len,
            "output_len": Workload(1.0).output_len,
            "arrivals": "Poisson",
        },  # fmt: skip
        "acceptance_concentration": 20.0,
        "seeds": args.seeds,
        "wall_s": time.perf_counter() - start,
        "rows": rows,
        "smartspec_ratios": ratios,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, acceptances, rates, out)
    print(f"wrote {out / 'results.json'}, {out / 'simulate_peers.png'} in {results['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
